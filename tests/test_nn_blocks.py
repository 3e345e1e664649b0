"""BatchNormAct2d against nn.BatchNorm2d (+ add + ReLU), and the fused
BasicBlock / Bottleneck and fuse_bn_act against torchvision's."""

import copy

import pytest
import torch
from torch import nn

from fastresnet.nn import BatchNormAct2d
from fastresnet.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def channels_last_input(*shape, mean=0.0):
    x = torch.randn(shape, device=DEVICE) + mean
    return x.contiguous(memory_format=torch.channels_last)


def randomize_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """Non-trivial parameters and running statistics, so that mix-ups show."""
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if bn.track_running_stats:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    return bn


def unfused(bn, x, residual, relu):
    y = bn(x)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


# ---------------------------------------------------------------------------
# BatchNormAct2d
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"momentum": None},
        {"track_running_stats": False},
        {"affine": False, "momentum": 0.5},
    ],
    ids=["default", "cumulative", "no-running-stats", "no-affine"],
)
@pytest.mark.parametrize("residual,relu", [(True, True), (False, False)])
def test_batchnorm_act_matches_batchnorm2d(kwargs, residual, relu):
    """Three training steps then eval: outputs, gradients, running statistics and
    num_batches_tracked follow nn.BatchNorm2d exactly."""
    c = 12
    torch_bn = randomize_bn(nn.BatchNorm2d(c, **kwargs).to(DEVICE))
    fused = BatchNormAct2d(c, **kwargs, act="relu" if relu else None).to(DEVICE)
    fused.load_state_dict(torch_bn.state_dict())
    for step in range(4):
        training = step < 3
        torch_bn.train(training)
        fused.train(training)
        x = channels_last_input(2, c, 3, 4, mean=step).requires_grad_()
        res = channels_last_input(2, c, 3, 4).requires_grad_() if residual else None
        y = fused(x, res)
        expected = unfused(torch_bn, x, res, relu)
        assert_close(y, expected, name=f"step {step} y")
        inputs = [x] + list(fused.parameters()) + ([res] if residual else [])
        ref_inputs = [x] + list(torch_bn.parameters()) + ([res] if residual else [])
        grad_y = torch.randn_like(y)
        for a, e in zip(torch.autograd.grad(y, inputs, grad_y), torch.autograd.grad(expected, ref_inputs, grad_y)):
            assert_close(a, e, atol=2e-4, rtol=2e-4, name=f"step {step} grad")
        for (name, a), (_, e) in zip(fused.state_dict().items(), torch_bn.state_dict().items()):
            assert_close(a.double(), e.double(), atol=1e-6, rtol=1e-5, name=f"step {step} {name}")


def test_batchnorm_act_state_dict_both_ways_and_errors():
    torch_bn = randomize_bn(nn.BatchNorm2d(6))
    fused = BatchNormAct2d(6)
    assert list(fused.state_dict()) == list(torch_bn.state_dict())
    fused.load_state_dict(torch_bn.state_dict(), strict=True)
    torch_bn.load_state_dict(fused.state_dict(), strict=True)
    shared = BatchNormAct2d.from_batchnorm(torch_bn, act=None)
    assert shared.weight is torch_bn.weight and shared.running_var is torch_bn.running_var
    assert "act=None" in repr(shared)

    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        fused.train()(torch.randn(1, 6, 1, 1))
    with pytest.raises(ValueError, match="expected 4D input"):
        fused(torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="act must be"):
        BatchNormAct2d(6, act="gelu")
