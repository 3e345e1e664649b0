"""NaN and Inf go where torch's own modules put them, and what torch's BatchNorm refuses is refused alike.

A diverging run must show: every BatchNorm (+ add) + ReLU path and the fused conv paths give NaN and Inf
in their outputs, batch statistics, running buffers and gradients exactly where nn.BatchNorm2d (+ add) +
torch.relu, and torchvision's blocks, give them, through the eager reference (the CPU path) and through
the Triton kernels (Triton's interpreter here). Property tests draw the shapes, layouts and BatchNorm
options and plant NaN, +-Inf and huge values (one whose square overflows fp32) in the inputs.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.resnet import BasicBlock

from fastresnet import convert
from fastresnet.nn import BatchNormAct2d
from fastresnet.ops import tuning
from fastresnet.ops.bn_act import affine_act, update_running_stats
from fastresnet.ops.conv_stats import conv_stats
from fastresnet.testing import assert_close

# numpy (Triton's interpreter) says so whenever it meets the planted values
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning")

NAN, INF = float("nan"), float("inf")
# 1e30: its square overflows fp32, so its channel's variance is +Inf (torch's too) and its invstd 0.
PLANTED = [NAN, INF, -INF, 1e18, -1e18, 1e30, -1e30]
PATHS = ["reference", "triton"]
# A few values per channel make BatchNorm's gradient ill-conditioned (tests/test_bn_act.py's tolerance).
GRAD_TOL = (1e-3, 1e-3)
# Derandomized: CI sees the same examples every run; a failure names its example.
PROPERTY = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def running_on(path: str):
    """The ops run the eager reference ("reference") or the Triton kernels ("triton", the interpreter)."""
    with mock.patch.dict(os.environ, {"FASTRESNET_FORCE_REFERENCE": "1" if path == "reference" else "0"}):
        yield


def planted(shape, plants, channels_last=False, scale=1.0):
    """A random tensor with plants = [(index, value)] written at flat indices (modulo its size)."""
    t = torch.randn(shape) * scale
    flat = t.view(-1)
    for index, value in plants:
        flat[index % flat.numel()] = value
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def assert_all_close(actual: dict, expected: dict, tol=(1e-4, 1e-4)):
    assert actual.keys() == expected.keys()
    for name in expected:
        a, e = actual[name], expected[name]
        if e is None:
            assert a is None, name
            continue
        atol, rtol = GRAD_TOL if name.startswith("grad") else tol
        assert_close(a.float(), e.float(), atol=atol, rtol=rtol, name=name, equal_nan=True)


plants = st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(PLANTED)), max_size=2)
# Through two convs a finite outlier (1e18) leaves BatchNorm's statistics to rounding (the other values
# vanish beside it in fp32) and its gradients too: there NaN, Inf and values that overflow the variance.
conv_plants = st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from([NAN, INF, -INF, 1e30, -1e30])), max_size=2)


# ---------------------------------------------------------------------------
# BatchNormAct2d against nn.BatchNorm2d + add + ReLU
# ---------------------------------------------------------------------------


def _torch_pair(c, eps, momentum, affine, track, relu):
    """(nn.BatchNorm2d, BatchNormAct2d) with the same non-trivial parameters and buffers."""
    ref = nn.BatchNorm2d(c, eps, momentum, affine, track)
    with torch.no_grad():
        if affine:
            ref.weight.uniform_(-1.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
        if track:
            ref.running_mean.uniform_(-0.5, 0.5)
            ref.running_var.uniform_(0.5, 1.5)
    fused = BatchNormAct2d(c, eps, momentum, affine, track, act="relu" if relu else None)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _step(module, x, residual, grad_y, relu, fused):
    """{output, gradients, buffers} of one forward (+ backward) of module on copies of x and residual."""
    x = x.clone().requires_grad_()
    residual = None if residual is None else residual.clone().requires_grad_()
    for p in module.parameters():
        p.grad = None
    if fused:
        y = module(x, residual)
    else:
        y = module(x)
        y = y + residual if residual is not None else y
        y = torch.relu(y) if relu else y
    y.backward(grad_y)
    out = {"y": y.detach(), "grad x": x.grad, "grad residual": None if residual is None else residual.grad}
    out.update({f"grad {name}": p.grad for name, p in module.named_parameters()})
    out.update({name: b.clone() for name, b in module.named_buffers()})
    return out


@pytest.mark.parametrize("path", PATHS)
@PROPERTY
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4)),
    channels_last=st.booleans(),
    momentum=st.sampled_from([0.1, None, 0.0, 0.5, 1.0]),
    eps=st.sampled_from([1e-5, 1e-3, 0.5]),
    affine=st.booleans(),
    track=st.booleans(),
    residual=st.booleans(),
    relu=st.booleans(),
    forward=st.sampled_from(["triton", "eager"]),
    steps=st.lists(st.tuples(st.booleans(), plants, plants, plants), min_size=1, max_size=3),
)
# Beside the drawn ones, each always: a NaN (an Inf) in channel 1 of a training batch, then a clean
# batch (the running statistics stay NaN / Inf as torch's), then eval on those statistics.
@example(shape=(4, 3, 4, 4), channels_last=True, momentum=0.1, eps=1e-5, affine=True, track=True, residual=False,
         relu=True, forward="triton", steps=[(True, [(75, NAN)], [], []), (True, [], [], []), (False, [], [], [])])
@example(shape=(2, 3, 3, 2), channels_last=False, momentum=None, eps=1e-5, affine=True, track=True, residual=True,
         relu=True, forward="triton", steps=[(True, [(7, INF), (8, 1e30)], [(20, -INF)], [(3, NAN)]),
                                             (True, [], [], []), (False, [(1, NAN)], [(2, INF)], [])])
@example(shape=(2, 2, 2, 2), channels_last=True, momentum=1.0, eps=0.5, affine=False, track=False, residual=True,
         relu=True, forward="eager", steps=[(True, [(0, -INF)], [(9, NAN)], []), (False, [(4, INF)], [], [])])
def test_batch_norm_act_puts_nan_and_inf_where_torch_does(path, shape, channels_last, momentum, eps, affine, track,
                                                          residual, relu, forward, steps):
    """Training and eval steps in turn, each with NaN/Inf/huge values planted in the input, the residual
    and the upstream gradient: every output, gradient and buffer as torch's. forward "eager" runs the
    kernels' backward after ATen's training forward (a choice the GPU's tuner can make)."""
    check_batch_norm_act_steps(path, f"batch_norm_act.forward={forward}", shape, channels_last, momentum, eps,
                               affine, track, residual, relu, steps)


def check_batch_norm_act_steps(path, pins, shape, channels_last, momentum, eps, affine, track, residual, relu, steps):
    """BatchNormAct2d, with the dispatch pinned by `pins`, against nn.BatchNorm2d (+ add) + ReLU over
    steps of (training, plants in x, in the residual, in the upstream gradient)."""
    n, c, h, w = shape
    ref, fused = _torch_pair(c, eps, momentum, affine, track, relu)
    tuning.override(pins)
    try:
        for training, x_plants, residual_plants, grad_plants in steps:
            if (training or not track) and n * h * w == 1:  # batch statistics of one value: refused
                continue
            x = planted(shape, x_plants, channels_last)
            res = planted(shape, residual_plants, channels_last) if residual else None
            grad_y = planted(shape, grad_plants)
            ref.train(training), fused.train(training)
            expected = _step(ref, x, res, grad_y, relu, fused=False)
            with running_on(path):
                actual = _step(fused, x, res, grad_y, relu, fused=True)
            assert_all_close(actual, expected)
    finally:
        tuning.override(None)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_one_non_finite_value_poisons_its_channel_as_in_torch(path, value):
    """The probe's case: channels_last, one NaN (or +Inf) in channel 1 of 64 values: all 64 outputs of
    that channel NaN, its running_var NaN (torch's BatchNorm2d + ReLU); the other channels untouched."""
    x = torch.randn(4, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    x[1, 1, 2, 3] = value
    bn = BatchNormAct2d(3)
    with running_on(path):
        y = bn(x)
    assert y[:, 1].isnan().sum() == 64 and not y[:, [0, 2]].isnan().any()
    assert bn.running_var[1].isnan() and bn.running_var[[0, 2]].isfinite().all()
    assert bn.running_mean[1].isnan() if math.isnan(value) else bn.running_mean[1] == INF


@pytest.mark.parametrize("path", PATHS)
def test_relu_keeps_nan_and_lets_the_gradient_through_nan(path):
    """relu(NaN) is NaN, relu(-Inf) 0; its gradient is 0 where the output is <= 0 and passes where it is NaN."""
    x = torch.tensor([-0.0, 0.0, NAN, INF, -INF, -2.0, 3.0]).view(1, 7, 1, 1).requires_grad_()
    with running_on(path):  # x * 1 + (-0.0) is x, -0.0 included
        y = affine_act(x, torch.ones(7), torch.full((7,), -0.0))
    expected = torch.relu(x.detach())
    assert torch.equal(y.detach().isnan(), expected.isnan())
    assert torch.equal(y.detach().nan_to_num(), expected.nan_to_num())
    (grad,) = torch.autograd.grad(y, x, torch.full_like(y, 5.0))
    assert grad.flatten().tolist() == [0.0, 0.0, 5.0, 5.0, 0.0, 0.0, 5.0]


@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0])
def test_running_statistics_update_as_torch_with_inf_on_either_side(momentum):
    """(1 - momentum) * running + momentum * batch, not a lerp: Inf stays Inf where torch keeps it."""
    running_mean, running_var = torch.tensor([INF, 1.0, 2.0]), torch.tensor([1.0, NAN, 3.0])
    mean, var = torch.tensor([1.0, INF, -INF]), torch.tensor([INF, 1.0, 5.0])
    expected = [(1 - momentum) * r + momentum * b for r, b in ((running_mean, mean), (running_var, var))]
    update_running_stats(running_mean, running_var, mean, var, momentum)
    assert_close(running_mean, expected[0], equal_nan=True, name="running_mean")
    assert_close(running_var, expected[1], equal_nan=True, name="running_var")


# ---------------------------------------------------------------------------
# The fused conv paths: a converted BasicBlock against torchvision's
# ---------------------------------------------------------------------------


def _block(inplanes, planes, stride):
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
    ref = BasicBlock(inplanes, planes, stride, downsample)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.5)
    return ref, convert(copy.deepcopy(ref), mode="train")


def _block_step(block, x, grad_y, path=None):
    x = x.clone().requires_grad_(block.training)
    run = block if path is None else lambda x: block(x, path)
    for p in block.parameters():
        p.grad = None
    if block.training:
        y = run(x)
        y.backward(grad_y)
    else:
        with torch.no_grad():
            y = run(x)
    out = {"y": y.detach(), "grad x": x.grad}
    out.update({f"grad {name}": p.grad for name, p in block.named_parameters()})
    out.update({name: b.clone() for name, b in block.named_buffers()})
    return out


@pytest.mark.parametrize("path", PATHS)
@settings(PROPERTY, max_examples=3)
@given(
    geometry=st.sampled_from([(4, 4, 1), (4, 8, 2)]),
    size=st.integers(3, 5),
    block_path=st.sampled_from(["triton", "mixed", "cudnn_bnact"]),
    steps=st.lists(st.tuples(st.booleans(), conv_plants, st.booleans()), min_size=1, max_size=2),
)
# Beside the drawn ones, each always: NaN, +-Inf and an overflowing value in training and in eval, and
# eval on a NaN running variance.
@example(geometry=(4, 4, 1), size=4, block_path="triton", steps=[(True, [(5, NAN)], False), (False, [(7, INF)], False)])
@example(geometry=(4, 8, 2), size=5, block_path="mixed", steps=[(True, [(30, 1e30)], False), (False, [(60, -INF)], True)])
@example(geometry=(4, 4, 1), size=3, block_path="cudnn_bnact", steps=[(True, [(11, -INF)], False), (False, [(4, NAN)], True)])
def test_fused_conv_paths_put_nan_and_inf_where_torch_does(path, geometry, size, block_path, steps):
    """Training through conv_stats (statistics in the conv's epilogue, the BatchNorm + ReLU applied on
    load, bn_act_stats + shortcut) and eval through conv_bn_act (the BatchNorm folded into the conv's
    epilogue), with NaN/Inf/huge values planted in the input, or a NaN/Inf running statistic met in eval:
    every output, gradient and buffer as torchvision's BasicBlock. block_path: the block's candidate ("mixed"
    and "cudnn_bnact" run ATen's convs beside the BatchNorm kernels)."""
    check_block_steps(path, None, geometry, size, steps, block_path)


def check_block_steps(path, pins, geometry, size, steps, block_path="triton"):
    """A converted BasicBlock through block_path in training (and in eval for "cudnn_bnact", folded
    otherwise), the dispatch pinned by `pins`, against torchvision's over steps of (training, plants in x,
    whether bn2's running variance turns NaN before the step)."""
    tuning.override(pins)
    try:
        _block_steps(path, geometry, size, steps, block_path)
    finally:
        tuning.override(None)


def _block_steps(path, geometry, size, steps, block_path):
    # oneDNN's AVX2 1x1 weight-gradient kernel now and then returns a wrong gradient for a channels_last
    # input with fewer channels than its 8-channel block and a stride of 2 (uxlfoundation/oneDNN#6035):
    # the 4-channel projection here, in torchvision's block and in the ATen conv beside the fused kernels.
    # ATen's own convolution computes both sides instead (the flags also set oneDNN's TF32 switch, which
    # warns that only Intel GPUs have it).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TF32 acceleration on top of oneDNN", UserWarning)
        with torch.backends.mkldnn.flags(enabled=False):
            _compare_block_steps(path, geometry, size, steps, block_path)


def _compare_block_steps(path, geometry, size, steps, block_path):
    inplanes, planes, stride = geometry
    ref, fused = _block(inplanes, planes, stride)
    shape = (2, inplanes, size, size)
    for training, x_plants, poison_running_var in steps:
        if poison_running_var and not training:  # a running statistic gone bad in an earlier run
            for block in (ref, fused):
                block.bn2.running_var[0] = NAN
        x = planted(shape, x_plants, channels_last=True)
        ref.train(training), fused.train(training)
        grad_y = torch.randn(2, planes, (size - 1) // stride + 1, (size - 1) // stride + 1)
        expected = _block_step(ref, x, grad_y)
        with running_on(path):
            actual = _block_step(fused, x, grad_y, block_path if training or block_path == "cudnn_bnact" else None)
        # Gradients of BatchNorm over 2 x 3 x 3 values, through two convs, are ill-conditioned: their
        # tolerance scales with the largest finite one.
        for name in expected:
            if name.startswith("grad") and expected[name] is not None:
                finite = expected[name][expected[name].isfinite()]
                scale = finite.abs().max().item() + 1e-6 if finite.numel() else 1.0
                expected[name], actual[name] = expected[name] / scale, actual[name] / scale
        assert_all_close(actual, expected, tol=(2e-3, 2e-3))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("value", [NAN, INF, 1e30], ids=["nan", "inf", "huge"])
def test_conv_stats_statistics_and_normalise_on_load_carry_non_finite_values(path, value):
    """conv_stats' statistics (the kernel's epilogue and their merge) and the input BatchNorm + ReLU it
    applies on load: a non-finite or overflowing input gives the values and statistics torch's conv2d,
    var_mean and relu give."""
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    x[1, 2, 3, 3] = value
    w1 = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    w2 = torch.randn(8, 8, 1, 1).contiguous(memory_format=torch.channels_last)
    affine = (torch.rand(8) + 0.5, torch.randn(8))
    with running_on(path):
        y1, mean1, invstd1, var1 = conv_stats(x, w1, padding=1)
        y2, mean2, invstd2, var2 = conv_stats(y1, w2, input_norm=(mean1, invstd1, *affine))
    expected_y1 = nn.functional.conv2d(x, w1, padding=1)
    a = torch.relu((expected_y1 - mean1.view(1, -1, 1, 1)) * (invstd1 * affine[0]).view(1, -1, 1, 1)
                   + affine[1].view(1, -1, 1, 1))
    for y, mean, invstd, var, expected_y in ((y1, mean1, invstd1, var1, expected_y1),
                                             (y2, mean2, invstd2, var2, nn.functional.conv2d(a, w2))):
        expected_var, expected_mean = torch.var_mean(expected_y, dim=(0, 2, 3), unbiased=False)
        assert_close(y, expected_y, equal_nan=True, name="y")
        assert_close(mean, expected_mean, equal_nan=True, name="mean")
        assert_close(invstd, torch.rsqrt(expected_var + 1e-5), equal_nan=True, name="invstd")
        assert_close(var, expected_var * 50 / 49, equal_nan=True, name="unbiased var")
    # The planted value reached the statistics: an overflowing variance, or a non-finite mean.
    assert (var1.isinf().any() and mean1.isfinite().all()) if value == 1e30 else not mean1.isfinite().all()
