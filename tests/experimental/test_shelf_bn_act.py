"""The experimental shelf's BatchNorm variants (fastresnet.experimental.bn_act): each against the
reference, each competing in the measured dispatch, and each checked on its first call."""

import warnings

import pytest
import torch
from test_bn_act import (
    DEVICE, CountOps, Launcher, SHAPES, bn_state, check_batch_norm_act, check_chosen_separately, check_gpu_dispatch,
    check_inference, check_mixed_paths_bf16, make_input,
)

from fastresnet.experimental import bn_act as shelf
from fastresnet.experimental.common import checked
from fastresnet.ops import bn_act as ops
from fastresnet.ops import tuning
from fastresnet.reference import batch_norm_act_reference
from fastresnet.testing import assert_close


@pytest.fixture
def measured_on_cpu(fake_gpu_timing, monkeypatch):
    monkeypatch.delenv("FASTRESNET_DISPATCH", raising=False)
    fake_gpu_timing.default = "eager"
    return fake_gpu_timing


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual,relu,affine,channels_last", [
    (True, True, True, True), (False, False, True, True), (True, True, False, False),
])
def test_one_launch_eval_kernels_match_reference(shape, dtype, residual, relu, affine, channels_last):
    """The one-launch eval kernel (_bn_eval_act_fwd), which folds the running statistics itself, and the
    same with whole-row tiles: output like F.batch_norm's, in x's dtype and layout."""
    x = make_input(shape, dtype, channels_last=channels_last, mean=0.5, std=2.0, requires_grad=False)
    res = make_input(shape, dtype, channels_last=True, requires_grad=False) if residual else None
    state = bn_state(shape[1], affine=affine)
    expected = batch_norm_act_reference(x, *state, False, 0.1, 1e-5, res, relu)
    with torch.no_grad():
        for name in ("triton_one_launch", "triton_wide"):
            y = ops.EXPERIMENTAL[name](x, *state, 1e-5, res, relu)
            assert y.dtype == dtype and y.stride() == x.stride()
            assert_close(y, expected, name=f"y ({name})")


@pytest.mark.parametrize("shape", SHAPES[:4] + [(8, 16, 8, 8)])
@pytest.mark.parametrize("dtype,mean", [(torch.float32, 1e3), (torch.float16, 0.5), (torch.bfloat16, 0.5)])
def test_single_pass_forward_matches_reference(shape, dtype, mean):
    """The one-launch training forward (triton_single): output, the statistics for the running ones and
    the saved mean/invstd, the large-mean case included."""
    x = make_input(shape, dtype, channels_last=True, mean=mean, requires_grad=False)
    res = make_input(shape, dtype, channels_last=True, requires_grad=False)
    running_mean, running_var, weight, bias = bn_state(shape[1])
    ref_stats = (running_mean.clone(), running_var.clone())
    y, batch_mean, invstd, var_unbiased, _, _ = shelf._single(x, weight, bias, res, 1e-5, True)
    ops.update_running_stats(running_mean, running_var, batch_mean, var_unbiased, 0.1)
    expected = batch_norm_act_reference(x, *ref_stats, weight, bias, True, 0.1, 1e-5, res, True)
    tol = (1e-3, 1e-3) if mean > 1 else (None, None)
    assert_close(y, expected, atol=tol[0], rtol=tol[1], name="y")
    x64 = x.double()
    assert_close(batch_mean.double(), x64.mean((0, 2, 3)), atol=1e-3, rtol=1e-6, name="mean")
    exact_invstd = torch.rsqrt(x64.var((0, 2, 3), unbiased=False) + 1e-5)
    assert_close(invstd.double(), exact_invstd, atol=1e-4, rtol=1e-3, name="invstd")
    assert_close(running_mean, ref_stats[0], atol=1e-3, rtol=1e-5, name="running_mean")
    assert_close(running_var, ref_stats[1], atol=1e-4, rtol=1e-3, name="running_var")


@pytest.mark.parametrize("forward,backward", [("eager", "triton_pipelined"), ("triton_single", "triton"),
                                              ("triton_single", "eager")])
@pytest.mark.parametrize("affine,residual,relu", [(True, True, True), (False, False, False)])
def test_forward_and_backward_chosen_separately(measured_on_cpu, forward, backward, affine, residual, relu):
    """As tests/test_bn_act.py's, with the shelf's forward and backward among the candidates."""
    check_chosen_separately(measured_on_cpu, forward, backward, affine, residual, relu)


def off(run, index):
    """run, one of whose outputs is 1.5 times what it should be."""
    def wrong(*args):
        out = run(*args)
        if index is None:
            return out * 1.5
        out = list(out)
        out[index] = out[index] * 1.5
        return tuple(out)
    return wrong


def test_a_new_variant_that_computes_wrong_never_wins(measured_on_cpu, monkeypatch):
    """triton_single, triton_pipelined, triton_wide and the one-launch eval kernel have not run on a GPU:
    each one's first call of a problem is compared with the main tree's path, and one that is off warns
    and is left out, however fast (here it is made 'fastest' and wrong); the call still computes right."""
    for name, op, run, expected, outputs in [
        ("triton_single", "batch_norm_act.forward", off(shelf._single, 0), shelf._forward, lambda o: (o[0], o[2])),
        ("triton_pipelined", "batch_norm_act.backward", off(shelf._pipelined, 1), shelf._backward, lambda o: o),
        ("triton_wide", "batch_norm_act.eval", off(shelf._wide, None), shelf._eval, lambda o: (o,)),
    ]:
        monkeypatch.setitem(ops.EXPERIMENTAL, name, checked(op, name, run, expected, outputs=outputs))
    measured_on_cpu.winners.update({"batch_norm_act.forward": "triton_single",
                                    "batch_norm_act.backward": "triton_pipelined",
                                    "batch_norm_act.step": "triton_single", "batch_norm_act.eval": "triton_wide"})
    x = make_input((2, 96, 3, 3), torch.float32, channels_last=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_batch_norm_act(x, *bn_state(96), True, None, True)
        check_inference(x, *bn_state(96))
    messages = " ".join(str(w.message) for w in caught)
    assert all(f"candidate {name} is off" in messages for name in ("triton_single", "triton_pipelined", "triton_wide"))
    chosen = {v for op in (ops.BN_FORWARD, ops.BN_BACKWARD, ops.BN_STEP, ops.BN_EVAL) for v in op.memo.values()}
    assert not chosen & {"triton_single", "triton_pipelined", "triton_wide"}


def test_with_the_switch_the_shelfs_variants_compete(measured_on_cpu, monkeypatch):
    """Without FASTRESNET_EXPERIMENTAL the shelf's variants are not even timed; with it they compete (and are
    checked on their first call)."""
    x = make_input((2, 96, 3, 3), torch.float32, channels_last=True)
    monkeypatch.delenv("FASTRESNET_EXPERIMENTAL")
    check_batch_norm_act(x, *bn_state(96), True, None, True)
    check_inference(x, *bn_state(96))
    timed = {name for entry in tuning.decisions() for name in entry["times_ms"]}
    assert timed == {"triton", "eager"}
    monkeypatch.setenv("FASTRESNET_EXPERIMENTAL", "1")
    tuning.clear()
    check_batch_norm_act(x, *bn_state(96), True, None, True)
    check_inference(x, *bn_state(96))
    timed = {name for entry in tuning.decisions() for name in entry["times_ms"]}
    assert timed == {"triton", "triton_single", "triton_pipelined", "triton_wide", "triton_one_launch", "eager"}


def test_one_launch_eval_issues_one_aten_op(monkeypatch):
    """Host time decides the small stages: once the dispatch has decided, an inference call of
    BatchNormAct2d on the one-launch kernel allocates its output and launches one kernel, nothing else (no
    folded-scale ops: the kernel folds the running statistics itself)."""
    from fastresnet.kernels.experimental import bn_act as kernels
    from fastresnet.nn import BatchNormAct2d

    tuning.override("batch_norm_act.eval=triton_one_launch")
    bn = BatchNormAct2d(8).to(DEVICE).eval()
    x = make_input((2, 8, 3, 3), torch.float32, channels_last=True, requires_grad=False)
    res = make_input((2, 8, 3, 3), torch.float32, channels_last=True, requires_grad=False)
    launches = []
    with torch.no_grad():
        bn(x, res)  # the first call decides the path and checks the kernel
        monkeypatch.setattr(kernels, "_bn_eval_act_fwd", Launcher("_bn_eval_act_fwd", launches))
        with CountOps() as counted:
            bn(x, res)
    assert counted.ops == ["aten.empty_like.default"] and launches == ["_bn_eval_act_fwd"]


@pytest.mark.cuda
@pytest.mark.parametrize("training", [True, False])
def test_gpu_dispatch_measures_and_runs_the_faster_path(tmp_path, monkeypatch, training):
    """On the GPU, every candidate let in (the shelf's too): every stage is timed at a real ResNet-50 shape
    (bf16), and the result is right whichever won."""
    check_gpu_dispatch(tmp_path, monkeypatch, training)


@pytest.mark.cuda
@pytest.mark.parametrize("forward,backward", [("triton", "triton_pipelined"), ("triton_single", "eager")])
def test_gpu_mixed_paths_bf16(measured_on_cpu, forward, backward):
    """The shelf's pipelined backward and one-launch forward, each beside another stage's path."""
    check_mixed_paths_bf16(measured_on_cpu, forward, backward)
