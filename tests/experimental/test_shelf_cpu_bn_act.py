"""The shelf's CPU BatchNorm (fastresnet.experimental.cpu_bn_act, "inductor"): it computes what plain
PyTorch's BatchNorm + add + ReLU compute, running statistics and gradients included, and competes in the
CPU's timed choice only with FASTRESNET_EXPERIMENTAL=1; without the switch a CPU runs plain PyTorch's."""

import pytest
import torch

from fastresnet.experimental import cpu_bn_act as shelf
from fastresnet.ops import bn_act as ops
from fastresnet.ops import tuning
from fastresnet.testing import assert_close

SHAPE = (4, 8, 5, 6)


@pytest.fixture
def cpu_route(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(tuning.ROUNDS, "cpu", (1, 1))
    tuning.clear()
    yield
    tuning.clear()


def _inputs(residual=True):
    x = torch.randn(SHAPE).contiguous(memory_format=torch.channels_last).requires_grad_()
    r = torch.randn(SHAPE).contiguous(memory_format=torch.channels_last).requires_grad_() if residual else None
    weight, bias = (torch.rand(SHAPE[1]) + 0.5).requires_grad_(), torch.randn(SHAPE[1]).requires_grad_()
    return x, r, weight, bias


def test_the_compiled_path_matches_plain_pytorch(residual=True, relu=True):
    """One problem (each compiles for seconds here); the timing test below reuses its compiled code."""
    x, r, weight, bias = _inputs(residual)
    stats = [torch.zeros(SHAPE[1]), torch.ones(SHAPE[1])]
    expected_stats = [s.clone() for s in stats]
    got = shelf._inductor(x, *stats, weight, bias, True, 0.1, 1e-5, r, relu)
    expected = ops._eager(x, *expected_stats, weight, bias, True, 0.1, 1e-5, r, relu)
    assert_close(got, expected, atol=1e-5, rtol=1e-5, name="output")
    for s, e in zip(stats, expected_stats):
        assert_close(s, e, atol=1e-6, rtol=1e-5, name="running statistics")
    wrt = [t for t in (x, weight, bias, r) if t is not None]
    grad = torch.randn(SHAPE)
    for a, b in zip(torch.autograd.grad(got, wrt, grad), torch.autograd.grad(expected, wrt, grad)):
        assert_close(a, b, atol=1e-4, rtol=1e-4, name="gradient")


def test_the_cpu_times_it_only_from_the_shelf(cpu_route, monkeypatch):
    x, r, weight, bias = _inputs()
    ops.batch_norm_act(x, torch.zeros(8), torch.ones(8), weight, bias, True, 0.1, 1e-5, r, True)
    (decision,) = tuning.decisions()
    assert decision["op"] == "batch_norm_act.step" and set(decision["times_ms"]) == {"eager", "inductor"}

    monkeypatch.setenv("FASTRESNET_EXPERIMENTAL", "0")
    tuning.clear()
    ops.batch_norm_act(x[:2], torch.zeros(8), torch.ones(8), weight, bias, True, 0.1, 1e-5, r[:2], True)
    assert not tuning.decisions()  # plain PyTorch's, nothing to choose between
