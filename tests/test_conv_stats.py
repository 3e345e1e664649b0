"""conv_stats and its backward (fastresnet/ops/conv_stats.py; kernels/conv_train.py, conv_train_bwd.py,
bn_stats.py) against the eager reference, and the per-shape choices of its tiles and backward path.

On the CPU the kernels run through Triton's interpreter: tiny shapes, large blocks; the choices are
tested with a fake H100 and a fake timer; on a GPU the tiles and paths are timed for real.
"""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
import triton

from fastresnet.kernels.bn_stats import finalize_stats
from fastresnet.kernels.conv import _TileConfig
from fastresnet.kernels.conv_train import _STATS_TILES, MAX_STATS_TILES, _stats_tile_candidates, conv_stats_fwd
from fastresnet.kernels.conv_train_bwd import (
    _DGRAD_TILES,
    _WGRAD_TILES,
    _dgrad_tile_candidates,
    _wgrad_tile_candidates,
    conv_dgrad_bn,
    conv_wgrad,
)
from fastresnet.ops import conv_stats as conv_stats_ops
from fastresnet.ops import tuning
from fastresnet.ops.bn_act import bn_act_stats
from fastresnet.ops.conv_stats import conv_stats
from fastresnet.reference import conv_stats_reference
from fastresnet.testing import assert_as_accurate_as, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
# (atol, rtol) for a conv output and for its gradients
CONV_TOL = {torch.float32: (1e-3, 1e-3), torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)}
GRAD_TOL = {torch.float32: (2e-3, 2e-3), torch.float16: (4e-2, 4e-2), torch.bfloat16: (6e-2, 6e-2)}


@pytest.fixture(autouse=True)
def _full_fp32_convs():
    """fp32 convs in full precision on a GPU (tf32 would round the large-mean test's inputs)."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------
# The forward: conv with statistics, and bn_act_stats after it
# ---------------------------------------------------------------------------

# (N, Cin, H, W, Cout, kernel, stride): ResNet conv kinds scaled down, plus odd sizes
FWD_SHAPES = [
    (2, 16, 6, 6, 32, 1, 1),  # bottleneck 1x1
    (2, 16, 7, 7, 24, 1, 2),  # projection shortcut, odd H/W
    (2, 8, 7, 7, 12, 3, 1),  # 3x3, Cin < 16, Cout not a power of 2
    (3, 16, 9, 9, 16, 3, 2),  # strided 3x3, odd
    (1, 20, 3, 5, 8, 3, 1),  # batch 1, non-square, Cin not a multiple of 16
]


def _input_stats(c):
    """(mean, invstd, gamma, beta) of a previous BatchNorm; beta < 0 for some channels so the
    ReLU and the zero padding after normalisation both matter."""
    return (torch.randn(c, device=DEVICE) + 2.0, torch.rand(c, device=DEVICE) + 0.5,
            torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE))


def _raw_conv(x, weight, stride, padding, norm_input):
    out_shape = conv_stats_reference(x, weight, stride, padding, norm_input)[0].shape
    out = _channels_last(torch.empty(out_shape, device=x.device, dtype=x.dtype))
    mean_part, m2_part, rows = conv_stats_fwd(
        x, weight.permute(0, 2, 3, 1).contiguous(), out, (stride, stride), (padding, padding), norm_input,
        interpreted=x.device.type == "cpu",
    )
    m = out.numel() // out.shape[1]
    return out, finalize_stats(mean_part, m2_part, m, rows, EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("normalise_input", [False, True])
@pytest.mark.parametrize("shape", FWD_SHAPES, ids=str)
def test_conv_stats_kernel_matches_reference(shape, normalise_input, dtype):
    n, c, h, w, out_c, k, stride = shape
    x = _channels_last(torch.randn(n, c, h, w, device=DEVICE).mul(2).add(1).to(dtype))
    weight = (torch.randn(out_c, c, k, k, device=DEVICE) / (c * k * k) ** 0.5).to(dtype)
    norm_input = _input_stats(c) if normalise_input else None
    out, (mean, invstd, var_unbiased) = _raw_conv(x, weight, stride, k // 2, norm_input)
    ref, ref_mean, _, _ = conv_stats_reference(x, weight, stride, k // 2, norm_input)
    atol, rtol = CONV_TOL[dtype]
    assert_close(out, ref, atol=atol, rtol=rtol, name="raw output")
    # Statistics of the stored output: compare against the reference's statistics of our own output.
    own_var, own_mean = torch.var_mean(out.float(), dim=(0, 2, 3), unbiased=False)
    assert_close(mean, own_mean, atol=1e-5, rtol=1e-5, name="mean")
    assert_close(invstd, torch.rsqrt(own_var + EPS), atol=1e-4, rtol=1e-4, name="invstd")
    m = out.numel() // out_c
    assert_close(var_unbiased, own_var * m / (m - 1), atol=1e-4, rtol=1e-4, name="unbiased var")
    assert_close(mean, ref_mean, atol=atol, rtol=rtol, name="mean vs reference")
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_statistics_stay_accurate_for_a_large_mean():
    # y = x (an identity 1x1 conv) with mean 1e3 and std 1: E[y^2] - E[y]^2 in fp32 would lose the variance.
    c = 8
    x = _channels_last(torch.randn(4, c, 16, 16, device=DEVICE, dtype=torch.float64).add(1e3))
    weight = torch.eye(c, device=DEVICE).view(c, c, 1, 1)
    _, (mean, invstd, var_unbiased) = _raw_conv(x.float(), weight, 1, 0, None)
    true_var, true_mean = torch.var_mean(x.float().double(), dim=(0, 2, 3), unbiased=True)
    assert_close(mean.double(), true_mean, atol=1e-4, rtol=0, name="mean")
    assert_close(var_unbiased.double(), true_var, atol=0, rtol=1e-3, name="variance")


def test_parallel_merge_of_many_partials_is_exact():
    # 50 partials merged in groups of 32 (max_parts=4) must give the same statistics as one pass.
    rows, parts, c = 7, 50, 5
    m = rows * parts - 3  # the last partial is short
    values = torch.randn(m, c, device=DEVICE, dtype=torch.float64) * 3 + 500
    mean_part = torch.stack([values[p * rows:(p + 1) * rows].mean(0) for p in range(parts)]).float()
    m2_part = torch.stack(
        [((values[p * rows:(p + 1) * rows] - values[p * rows:(p + 1) * rows].mean(0)) ** 2).sum(0) for p in range(parts)]
    ).float()
    mean, invstd, var_unbiased = finalize_stats(mean_part, m2_part, m, rows, EPS, max_parts=4)
    true_var, true_mean = torch.var_mean(values, dim=0, unbiased=True)
    assert_close(mean.double(), true_mean, atol=1e-4, rtol=0, name="mean")
    assert_close(var_unbiased.double(), true_var, atol=0, rtol=1e-4, name="variance")


def _chain(x, w1, w2, g1, b1, g2, b2, residual, use_cudnn=False):
    """conv3x3 -> bn1 -> relu -> conv1x1 (stride 2) -> bn2 -> + residual -> relu, through the fused ops."""
    y1, m1, i1, _ = conv_stats(x, w1, 1, 1, EPS, use_cudnn=use_cudnn)
    y2, m2, i2, _ = conv_stats(y1, w2, 2, 0, EPS, norm_input=(m1, i1, g1, b1), use_cudnn=use_cudnn)
    return bn_act_stats(y2, m2, i2, g2, b2, residual=residual)


def _eager_chain(x, w1, w2, g1, b1, g2, b2, residual):
    a1 = F.relu(F.batch_norm(F.conv2d(x, w1, None, 1, 1), None, None, g1, b1, True, 0.0, EPS))
    y2 = F.conv2d(a1, w2, None, 2, 0)
    return F.relu(F.batch_norm(y2, None, None, g2, b2, True, 0.0, EPS) + residual)


@pytest.mark.parametrize("impl", ["triton", "cudnn", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chain_forward_and_every_gradient_match_eager(dtype, impl, monkeypatch):
    if impl == "reference":
        monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1")
    if impl == "cudnn" and dtype == torch.float16 and DEVICE == "cpu":
        pytest.skip("fp16 convs on the CPU: the triton and reference cases cover fp16")
    n, c, h, mid, out_c = 2, 8, 9, 12, 16
    x = _channels_last(torch.randn(n, c, h, h, device=DEVICE))
    args = [
        x, torch.randn(mid, c, 3, 3, device=DEVICE) * 0.3, torch.randn(out_c, mid, 1, 1, device=DEVICE) * 0.3,
        torch.rand(mid, device=DEVICE) + 0.5, torch.randn(mid, device=DEVICE),
        torch.rand(out_c, device=DEVICE) + 0.5, torch.randn(out_c, device=DEVICE),
        _channels_last(torch.randn(n, out_c, 5, 5, device=DEVICE)),
    ]
    fused_args = [t.detach().clone().to(dtype if t.dim() == 4 else torch.float32).requires_grad_() for t in args]
    eager_args = [t.detach().clone().requires_grad_() for t in args]
    fused, eager = _chain(*fused_args, use_cudnn=impl == "cudnn"), _eager_chain(*eager_args)
    grad = torch.randn_like(eager)
    fused.backward(grad.to(dtype))
    eager.backward(grad)
    atol, rtol = GRAD_TOL[dtype]
    assert fused.dtype == dtype
    assert_close(fused.float(), eager, atol=atol, rtol=rtol, name="output")
    names = ["x", "w1", "w2", "gamma1", "beta1", "gamma2", "beta2", "residual"]
    for name, a, b in zip(names, fused_args, eager_args):
        scale = b.grad.abs().max().item() + 1e-6  # gradients of whole-tensor sums: compare relative to their size
        assert_close(a.grad.float() / scale, b.grad / scale, atol=atol, rtol=rtol, name=f"grad {name}")


def test_bad_inputs_name_the_problem():
    x = torch.randn(2, 8, 5, 5, device=DEVICE)
    with pytest.raises(ValueError, match="8 channels"):
        conv_stats(x, torch.randn(4, 6, 1, 1, device=DEVICE))
    with pytest.raises(TypeError, match="float"):
        conv_stats(x, torch.randn(4, 8, 1, 1, device=DEVICE).half())
    with pytest.raises(ValueError, match="norm_input mean"):
        conv_stats(x, torch.randn(4, 8, 1, 1, device=DEVICE), norm_input=_input_stats(5))
    with pytest.raises(ValueError, match="residual shape"):
        bn_act_stats(x, *_input_stats(8), residual=torch.randn(2, 8, 4, 4, device=DEVICE))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv_stats_on_gpu_at_a_resnet50_shape(dtype):
    x = _channels_last(torch.randn(32, 64, 56, 56, device="cuda", dtype=dtype))
    weight = (torch.randn(64, 64, 3, 3, device="cuda") / 24).to(dtype)
    norm_input = _input_stats(64)
    out, (mean, invstd, _) = _raw_conv(x, weight, 1, 1, norm_input)
    ref, *_ = conv_stats_reference(x, weight, 1, 1, norm_input)
    assert_close(out.float(), ref.float(), atol=5e-2, rtol=5e-2, name="raw output")
    own_var, own_mean = torch.var_mean(out.float(), dim=(0, 2, 3), unbiased=False)
    assert_close(mean, own_mean, atol=1e-4, rtol=1e-4, name="mean")
    assert_close(invstd, torch.rsqrt(own_var + EPS), atol=1e-3, rtol=1e-3, name="invstd")

# ---------------------------------------------------------------------------
# The backward paths against eager autograd through conv(relu(batch_norm(x)))
# ---------------------------------------------------------------------------

PATHS = conv_stats_ops.BACKWARD_PATHS

# (N, Cin, H, W, Cout, kernel, stride): the ResNet conv kinds scaled down, plus odd sizes
BWD_SHAPES = [
    (2, 16, 6, 6, 32, 1, 1),  # bottleneck 1x1
    (2, 24, 7, 7, 20, 1, 2),  # projection shortcut: odd H/W, Cout not a power of 2
    (2, 20, 7, 7, 12, 3, 1),  # 3x3, Cin and Cout not multiples of 16
    (1, 16, 9, 7, 16, 3, 2),  # strided 3x3, batch 1, non-square
]


def _bwd_problem(shape, normalise_input):
    """fp32 leaves: raw x, weight, gamma, beta (beta < 0 for some channels: the ReLU matters) and grad_y."""
    n, c, h, w, out_c, k, stride = shape
    x = _channels_last(torch.randn(n, c, h, w, device=DEVICE) * 2 + 1)
    weight = _channels_last(torch.randn(out_c, c, k, k, device=DEVICE) / (c * k * k) ** 0.5)
    gamma, beta = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
    oh, ow = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    grad_y = _channels_last(torch.randn(n, out_c, oh, ow, device=DEVICE))
    return x, weight, (gamma, beta) if normalise_input else None, grad_y


def _eager_grads(x, weight, affine, grad_y, stride, padding):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, *(affine or ()))]
    a = leaves[0]
    if affine is not None:
        a = F.relu(F.batch_norm(a, None, None, leaves[2], leaves[3], True, 0.0, EPS))
    F.conv2d(a, leaves[1], None, stride, padding).backward(grad_y)
    return [t.grad for t in leaves]


def _fused_grads(x, weight, affine, grad_y, stride, padding, dtype, path):
    """conv_stats with (mean, invstd) of x as its norm_input, as the previous conv_stats gives them."""
    leaves = [x.detach().to(dtype).requires_grad_(), weight.detach().to(dtype).requires_grad_()]
    norm_input = None
    if affine is not None:
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
        leaves += [t.detach().clone().requires_grad_() for t in affine]
        norm_input = (mean, torch.rsqrt(var + EPS), leaves[2], leaves[3])
    y, *_ = conv_stats(leaves[0], leaves[1], stride, padding, EPS, norm_input, backward=path)
    y.backward(grad_y.to(dtype))
    return [t.grad for t in leaves]


def _compare(actual, expected, dtype, names):
    atol, rtol = GRAD_TOL[dtype]
    for name, a, b in zip(names, actual, expected):
        assert a.dtype == (dtype if name in ("x", "weight") else torch.float32), name
        scale = b.abs().max().item() + 1e-6  # gradients of sums: compare relative to their size
        assert_close(a.float() / scale, b / scale, atol=atol, rtol=rtol, name=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=str)
def test_every_backward_path_matches_eager(shape, path, dtype):
    k, stride = shape[5], shape[6]
    x, weight, affine, grad_y = _bwd_problem(shape, normalise_input=True)
    expected = _eager_grads(x, weight, affine, grad_y, stride, k // 2)
    actual = _fused_grads(x, weight, affine, grad_y, stride, k // 2, dtype, path)
    _compare(actual, expected, dtype, ["x", "weight", "gamma", "beta"])
    assert actual[1].stride() == weight.stride(), "grad_w must have the weight's strides"


@pytest.mark.parametrize("path", ["triton_bwd", "triton_wgrad"])
@pytest.mark.parametrize("shape", [BWD_SHAPES[0], BWD_SHAPES[2]], ids=str)
def test_backward_without_an_input_batchnorm(shape, path):
    """The block's first conv: a = x, grad_x is dgrad alone."""
    k, stride = shape[5], shape[6]
    x, weight, _, grad_y = _bwd_problem(shape, normalise_input=False)
    expected = _eager_grads(x, weight, None, grad_y, stride, k // 2)
    actual = _fused_grads(x, weight, None, grad_y, stride, k // 2, torch.float32, path)
    _compare(actual, expected, torch.float32, ["x", "weight"])


def test_triton_backward_of_contiguous_nchw_tensors():
    """Kernels address every tensor by strides: NCHW (autograd may hand one over) is correct, only slower."""
    shape = BWD_SHAPES[2]
    x, weight, affine, grad_y = _bwd_problem(shape, normalise_input=True)
    x, weight, grad_y = x.contiguous(), weight.contiguous(), grad_y.contiguous()
    expected = _eager_grads(x, weight, affine, grad_y, 1, 1)
    actual = _fused_grads(x, weight, affine, grad_y, 1, 1, torch.float32, "triton_bwd")
    _compare(actual, expected, torch.float32, ["x", "weight", "gamma", "beta"])
    assert actual[0].is_contiguous() and actual[1].is_contiguous()


@pytest.mark.parametrize("k", [1, 3])
def test_wgrad_split_over_pixels_sums_the_partials(k):
    # 288 output pixels in two row ranges (256 + 32): the loop over pixel blocks and the partial sum.
    x, weight, affine, grad_y = _bwd_problem((2, 16, 12, 12, 16, k, 1), normalise_input=True)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    norm = (mean, torch.rsqrt(var + EPS), *affine)
    one = conv_wgrad(grad_y, x, 16, (k, k), (1, 1), (k // 2, k // 2), norm, DEVICE == "cpu", split=1)
    two = conv_wgrad(grad_y, x, 16, (k, k), (1, 1), (k // 2, k // 2), norm, DEVICE == "cpu", split=2)
    expected = _eager_grads(x, weight, affine, grad_y, 1, k // 2)[1]
    assert_close(one.permute(0, 3, 1, 2), expected, atol=1e-4, rtol=1e-4, name="grad_w, one range")
    assert_close(two, one, atol=1e-4, rtol=1e-4, name="grad_w, two ranges")


def test_dgrad_rejects_a_strided_shape():
    x, weight, _, grad_y = _bwd_problem(BWD_SHAPES[1], normalise_input=False)
    with pytest.raises(ValueError, match="stride-1 shapes"):
        conv_dgrad_bn(grad_y, weight, x, (0, 0), None, DEVICE == "cpu")


def test_the_choice_follows_the_switches(monkeypatch):
    x, weight, affine, grad_y = _bwd_problem(BWD_SHAPES[0], normalise_input=True)
    args = (grad_y, x, weight, None, (1, 1), (0, 0), True)
    assert conv_stats_ops.choose_backward("triton_dgrad", *args) == "triton_dgrad"
    tuning.override("conv_stats.backward=triton_wgrad")
    assert conv_stats_ops.choose_backward("auto", *args) == "triton_wgrad"
    tuning.override("conv_bn_act=triton")  # another op's pin: this op keeps its rule (nothing to time here)
    assert conv_stats_ops.choose_backward("auto", *args) == "cudnn"
    monkeypatch.setenv("FASTRESNET_DISPATCH", "conv_stats.backward=triton_bwd")
    tuning.override(None)  # back to the environment, which is read when a problem is first met
    assert conv_stats_ops.choose_backward("auto", *args) == "triton_bwd"
    monkeypatch.setenv("FASTRESNET_DISPATCH", "conv_stats.backward=fastest")
    tuning.clear()
    with pytest.raises(ValueError, match="'fastest'"):
        conv_stats_ops.choose_backward("auto", *args)
    with pytest.raises(ValueError, match="'cudnn_v8'"):
        conv_stats(x, weight, backward="cudnn_v8")
    strided = (grad_y[:, :, ::2, ::2].contiguous(), x, weight, None, (2, 2), (0, 0), True)
    tuning.override("conv_stats.backward=triton_bwd")  # at stride 2: Triton's wgrad, cuDNN's dgrad
    assert conv_stats_ops.choose_backward("auto", *strided) == "triton_bwd"


def test_a_triton_path_with_wrong_gradients_never_wins(monkeypatch, tmp_path):
    """The Triton wgrad/dgrad have not run on a GPU: each path's first timed call is compared with cuDNN's
    gradients; a path that is off (here every one with the Triton wgrad) warns and is left out."""
    x, weight, affine, grad_y = _bwd_problem(BWD_SHAPES[0], normalise_input=True)
    norm = (x.mean((0, 2, 3)), torch.rsqrt(x.var((0, 2, 3)) + EPS), *affine)
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "can_measure", lambda device: True)
    monkeypatch.setattr(tuning, "time_ms", lambda fn, device: [fn() for _ in range(2)] and 1.0)
    tuning.override("conv_wgrad.tile=fixed,conv_dgrad.tile=fixed")  # the kernels' tiles: their rules
    args = (grad_y, x, weight, norm, (1, 1), (0, 0), True)
    conv_stats_ops.choose_backward("auto", *args)
    (decision,) = tuning.decisions()
    assert set(decision["times_ms"]) == set(PATHS)  # all agree with cuDNN's gradients
    real_wgrad = conv_stats_ops._triton_weight_grad
    monkeypatch.setattr(conv_stats_ops, "_triton_weight_grad", lambda *a: real_wgrad(*a) * 1.5)
    tuning.clear()
    for path in tmp_path.glob("*.json"):
        path.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conv_stats_ops.choose_backward("auto", *args)
    (decision,) = tuning.decisions()
    assert set(decision["times_ms"]) == {"cudnn", "triton_dgrad"}
    messages = " ".join(str(w.message) for w in caught)
    assert "candidate triton_wgrad is off" in messages and "candidate triton_bwd is off" in messages


def test_a_cuda_graph_capture_records_the_measured_choice(fake_gpu_timing, monkeypatch):
    """torch.compile(mode="reduce-overhead") runs the op once uncaptured (measured there), then captures
    it: the capture must run that measured path, not the fixed rule; a problem first met inside a capture
    (no sync allowed for timing) gets the fixed rule and is not remembered."""
    fake_gpu_timing.winners["conv_stats.backward"] = "triton_wgrad"
    tuning.override("conv_wgrad.tile=fixed,conv_dgrad.tile=fixed")  # the kernels' tiles: their rules
    x, weight, affine, grad_y = _bwd_problem(BWD_SHAPES[0], normalise_input=True)
    args = (grad_y, x, weight, None, (1, 1), (0, 0), True)
    capturing = [False]
    monkeypatch.setattr(tuning, "capturing", lambda device: capturing[0])
    assert conv_stats_ops.choose_backward("auto", *args) == "triton_wgrad"  # the warm-up: measured
    capturing[0] = True
    assert conv_stats_ops.choose_backward("auto", *args) == "triton_wgrad"  # the capture
    assert len(fake_gpu_timing.timed) == 1
    other = (grad_y, x, weight, None, (1, 1), (0, 0), False)
    assert conv_stats_ops.choose_backward("auto", *other) == "cudnn"
    capturing[0] = False
    assert conv_stats_ops.choose_backward("auto", *other) == "triton_wgrad" and len(fake_gpu_timing.timed) == 2


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the fixed rule is not what 'auto' gives")
def test_auto_runs_the_fixed_cudnn_rule_where_nothing_is_measured(monkeypatch):
    ran = []
    real = conv_stats_ops.run_backward
    monkeypatch.setattr(conv_stats_ops, "run_backward", lambda path, *a: ran.append(path) or real(path, *a))
    x, weight, affine, grad_y = _bwd_problem(BWD_SHAPES[0], normalise_input=True)
    _fused_grads(x, weight, affine, grad_y, 1, 0, torch.float32, "auto")
    assert ran == ["cudnn"]


def test_backward_op_passes_opcheck():
    """Schema, fake implementation (what torch.compile sees) and real outputs agree."""
    x, weight, affine, grad_y = _bwd_problem(BWD_SHAPES[0], normalise_input=True)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    args = (grad_y, x, weight, mean, torch.rsqrt(var + EPS), *affine, [1, 1], [0, 0], True, "triton_bwd")
    torch.library.opcheck(torch.ops.fastresnet.conv_stats_backward.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def _block_pair(cls, inplanes, planes, stride):
    """A torchvision block with random BatchNorm affines, and its convert(mode="train") copy."""
    import copy

    from fastresnet import convert

    out = planes * cls.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = torch.nn.Sequential(torch.nn.Conv2d(inplanes, out, 1, stride, bias=False),
                                         torch.nn.BatchNorm2d(out))
    ref = cls(inplanes, planes, stride, downsample).to(DEVICE).to(memory_format=torch.channels_last)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.5)
    return ref, convert(copy.deepcopy(ref), mode="train")


@pytest.mark.parametrize("block", ["Bottleneck-s2-projection", "BasicBlock-s1"])
def test_whole_block_trains_through_the_triton_backward(block, monkeypatch):
    """Every conv of a fused block's Triton path with Triton's wgrad and (stride 1) dgrad:
    input and parameter gradients as torchvision's block gives them."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    tuning.override("conv_stats.backward=triton_bwd")
    cls, inplanes, planes, stride = (Bottleneck, 16, 8, 2) if block.startswith("Bottleneck") else (BasicBlock, 8, 8, 1)
    ref, fused = _block_pair(cls, inplanes, planes, stride)
    ran = []
    real = conv_stats_ops.run_backward
    monkeypatch.setattr(conv_stats_ops, "run_backward", lambda path, *a: ran.append(path) or real(path, *a))
    x = _channels_last(torch.randn(2, inplanes, 8, 8, device=DEVICE))
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_f, out_r = fused.run_path("triton", xf), ref(xr)
    grad = torch.randn_like(out_r)
    out_f.backward(grad)
    out_r.backward(grad)
    assert ran and set(ran) == {"triton_bwd"}
    pairs = [("x", xf.grad, xr.grad)] + [
        (name, p.grad, q.grad) for (name, p), q in zip(fused.named_parameters(), ref.parameters())
    ]
    for name, a, b in pairs:
        scale = b.abs().max().item() + 1e-6
        assert_close(a / scale, b / scale, atol=2e-3, rtol=2e-3, name=f"grad {name}")


# ---------------------------------------------------------------------------
# GPU: real compilation, ResNet-50 shapes, the measured choice
# ---------------------------------------------------------------------------

# (N, Cin, H, W, Cout, kernel, stride): ResNet-50 stage convs at batch 8
GPU_SHAPES = [
    (8, 64, 56, 56, 64, 3, 1),  # layer1 conv2
    (8, 256, 56, 56, 64, 1, 1),  # layer1 conv1
    (8, 128, 56, 56, 128, 3, 2),  # layer2.0 conv2 (strided 3x3)
    (8, 512, 28, 28, 1024, 1, 2),  # layer3.0 downsample
    (8, 512, 7, 7, 2048, 1, 1),  # layer4 conv3
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_triton_paths_are_as_accurate_as_cudnn(shape, dtype):
    """Each Triton path's gradients, judged against the fp32 truth, are about as accurate as the
    cuDNN path's in the same dtype (elementwise bf16-vs-bf16 comparisons are the wrong test)."""
    k, stride = shape[5], shape[6]
    x, weight, affine, grad_y = _bwd_problem(shape, normalise_input=True)
    exact = _eager_grads(x, weight, affine, grad_y, stride, k // 2)
    baseline = _fused_grads(x, weight, affine, grad_y, stride, k // 2, dtype, "cudnn")
    for path in PATHS[1:]:
        actual = _fused_grads(x, weight, affine, grad_y, stride, k // 2, dtype, path)
        for name, a, b, e in zip(("x", "weight", "gamma", "beta"), actual, baseline, exact):
            assert_as_accurate_as(a.float(), b.float(), e, name=f"{path} grad {name}")


@pytest.mark.cuda
def test_gpu_measured_choice_is_recorded_and_runs(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("FASTRESNET_EXPERIMENTAL", "1")
    monkeypatch.delenv(tuning.DISPATCH_ENV, raising=False)
    shape = GPU_SHAPES[0]
    x, weight, affine, grad_y = _bwd_problem(shape, normalise_input=True)
    expected = _eager_grads(x, weight, affine, grad_y, 1, 1)
    actual = _fused_grads(x, weight, affine, grad_y, 1, 1, torch.bfloat16, "auto")
    baseline = _fused_grads(x, weight, affine, grad_y, 1, 1, torch.bfloat16, "cudnn")
    for name, a, b, e in zip(("x", "weight", "gamma", "beta"), actual, baseline, expected):
        assert_as_accurate_as(a.float(), b.float(), e, name=f"measured choice grad {name}")
    entries = [d for d in tuning.decisions() if d["op"] == "conv_stats.backward"]
    assert len(entries) == 1 and set(entries[0]["times_ms"]) == set(PATHS), entries


@pytest.mark.cuda
def test_gpu_compiled_block_with_the_triton_backward(monkeypatch):
    """The backward op stays opaque to torch.compile(fullgraph=True): the compiled Triton path with
    the Triton backward forced gives torchvision's gradients (bf16, against the fp32 block)."""
    import copy

    from torchvision.models.resnet import Bottleneck

    from fastresnet.nn import tune_dispatch

    tuning.override("fused_block=triton,conv_stats.backward=triton_bwd")
    ref, fused = _block_pair(Bottleneck, 256, 64, 1)
    x = _channels_last(torch.randn(16, 256, 28, 28, device="cuda"))
    exact = copy.deepcopy(ref)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        tune_dispatch(fused, x)
        out_c = torch.compile(fused, fullgraph=True)(x)
        out_r = ref(x)
    out_e = exact(x)
    grad = torch.randn_like(out_e)
    for out in (out_c, out_r, out_e):
        out.float().backward(grad)
    for (name, p), q, e in zip(fused.named_parameters(), ref.parameters(), exact.parameters()):
        assert_as_accurate_as(p.grad.float(), q.grad.float(), e.grad, name=f"grad {name}")

# ---------------------------------------------------------------------------
# The tiles of the forward, wgrad and dgrad kernels, and their choice
# ---------------------------------------------------------------------------

def _names(table):
    return sorted({_TileConfig(bm, bn, bk, 8, w, s).name for tiles in table.values() for bm, bn, bk, w, s in tiles})


OFFERED = _names(_STATS_TILES)

# (N, Cin, H, W, Cout, kernel, stride): M = 162 rows (3 blocks of 64, the last short) and 72
# channels (two 64-wide column blocks, one masked 128/256-wide one); a strided 1x1 with odd sizes
TILE_SHAPES = [(2, 20, 9, 9, 72, 3, 1), (3, 16, 11, 11, 40, 1, 2)]


def _tile_problem(shape, dtype, normalise_input=True):
    n, c, h, w, out_c, k, stride = shape
    x = _channels_last(torch.randn(n, c, h, w, device=DEVICE).mul(2).add(1).to(dtype))
    weight = (torch.randn(out_c, c, k, k, device=DEVICE) / (c * k * k) ** 0.5).to(dtype)
    norm_input = None
    if normalise_input:  # beta < 0 for some channels: the ReLU and the padding after normalisation matter
        norm_input = (torch.randn(c, device=DEVICE) + 2.0, torch.rand(c, device=DEVICE) + 0.5,
                      torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE))
    return x, weight, norm_input


def _check_against_reference(x, weight, stride, padding, norm_input, out, stats):
    mean, invstd, var_unbiased = stats
    ref, ref_mean, _, _ = conv_stats_reference(x, weight, stride, padding, norm_input)
    atol, rtol = CONV_TOL[x.dtype]
    assert_close(out.float(), ref.float(), atol=atol, rtol=rtol, name="raw output")
    # The statistics describe the stored output exactly: compare with its own statistics.
    own_var, own_mean = torch.var_mean(out.float(), dim=(0, 2, 3), unbiased=False)
    m = out.numel() // out.shape[1]
    assert_close(mean, own_mean, atol=1e-5, rtol=1e-5, name="mean")
    assert_close(invstd, torch.rsqrt(own_var + EPS), atol=1e-4, rtol=1e-4, name="invstd")
    assert_close(var_unbiased, own_var * m / (m - 1), atol=1e-4, rtol=1e-4, name="unbiased var")
    assert_close(mean, ref_mean, atol=atol, rtol=rtol, name="mean vs reference")


@pytest.mark.parametrize("shape, dtype", [(TILE_SHAPES[0], torch.float32), (TILE_SHAPES[1], torch.float16)], ids=str)
@pytest.mark.parametrize("tile", OFFERED)
def test_every_offered_tile_matches_the_reference(tile, shape, dtype):
    n, c, h, w, out_c, k, stride = shape
    x, weight, norm_input = _tile_problem(shape, dtype, normalise_input=k == 3)
    cfg = _TileConfig.from_name(tile)
    ref_shape = conv_stats_reference(x, weight, stride, k // 2, norm_input)[0].shape
    out = _channels_last(torch.empty(ref_shape, device=DEVICE, dtype=dtype))
    mean_part, m2_part, rows = conv_stats_fwd(
        x, weight.permute(0, 2, 3, 1).contiguous(), out, (stride, stride), (k // 2, k // 2), norm_input,
        interpreted=DEVICE == "cpu", tile=cfg,
    )
    m = out.numel() // out_c
    # One partial per row block of the chosen tile: the merge must use its BLOCK_M.
    assert rows == cfg.block_m and mean_part.shape == (triton.cdiv(m, cfg.block_m), out_c)
    stats = finalize_stats(mean_part, m2_part, m, rows, EPS)
    _check_against_reference(x, weight, stride, k // 2, norm_input, out, stats)


def _backward_problem(shape, dtype):
    """x (raw), weight, norm_input (x's own batch statistics and an affine), grad_y; and eager's
    grad_w and grad_a = dgrad(grad_y) * relu mask, in fp64 from the same values."""
    n, c, h, w, out_c, k, stride = shape
    x, weight, norm = _tile_problem(shape, dtype)
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
    norm = (mean, torch.rsqrt(var + EPS), norm[2], norm[3])
    scale, shift = (norm[1] * norm[2]).double(), (norm[3] - norm[0] * norm[1] * norm[2]).double()
    a = torch.relu(x.double() * scale[:, None, None] + shift[:, None, None]).requires_grad_()
    w = weight.double().requires_grad_()
    y = torch.nn.functional.conv2d(a, w, None, stride, k // 2)
    grad_y = _channels_last(torch.randn(y.shape, device=DEVICE).to(dtype))
    grad_a, grad_w = torch.autograd.grad(y, [a, w], grad_y.double())
    return x, weight, norm, grad_y, grad_w, grad_a * (a > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tile", _names(_WGRAD_TILES))
def test_every_offered_wgrad_tile_matches_eager(tile, dtype):
    shape = (2, 20, 7, 7, 24, 3, 2)  # strided 3x3, odd sizes, channels not multiples of 16
    x, weight, norm, grad_y, grad_w, _ = _backward_problem(shape, dtype)
    packed = conv_wgrad(grad_y, x, 24, (3, 3), (2, 2), (1, 1), norm, DEVICE == "cpu",
                        tile=_TileConfig.from_name(tile))
    atol, rtol = CONV_TOL[dtype]
    scale = grad_w.abs().max().item()
    assert_close(packed.permute(0, 3, 1, 2).double() / scale, grad_w / scale, atol=atol, rtol=rtol, name="grad_w")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tile", _names(_DGRAD_TILES))
def test_every_offered_dgrad_tile_matches_eager(tile, dtype):
    shape = (2, 20, 9, 9, 24, 3, 1)  # 162 input pixels: 3 row blocks of 64, the last short
    x, weight, norm, grad_y, _, grad_a = _backward_problem(shape, dtype)
    cfg = _TileConfig.from_name(tile)
    g, sum_g_part, sum_gx_part = conv_dgrad_bn(grad_y, weight, x, (1, 1), norm, DEVICE == "cpu", tile=cfg)
    assert sum_g_part.shape == (triton.cdiv(162, cfg.block_m), 20)  # partials per row block of the tile
    atol, rtol = CONV_TOL[dtype]
    scale = grad_a.abs().max().item()
    assert_close(g.double() / scale, grad_a / scale, atol=atol, rtol=rtol, name="g")
    xc = x.double() - norm[0].double()[:, None, None]
    # The sums describe g as stored: compare with the sums of the stored g.
    assert_close(sum_g_part.sum(0).double(), g.double().sum((0, 2, 3)), atol=1e-3, rtol=1e-4, name="sum g")
    assert_close(sum_gx_part.sum(0).double(), (g.double() * xc).sum((0, 2, 3)), atol=1e-3, rtol=1e-4,
                 name="sum g (x - mean)")


# ---------------------------------------------------------------------------
# The candidates and the choice, on a fake H100
# ---------------------------------------------------------------------------


def _fake_gpu(monkeypatch, major=9, shared=227 * 1024):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    props = types.SimpleNamespace(shared_memory_per_block_optin=shared, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


def test_candidates_per_shape_class(monkeypatch):
    _fake_gpu(monkeypatch)
    # ResNet-50 layer1 3x3 at batch 256: the fixed rule's 128x64x64w4s4 first, then the narrow list.
    narrow = [t.name for t in _stats_tile_candidates(256 * 56 * 56, 64, 64, 2, "cuda")]
    assert narrow == ["128x64x64w4s4", "128x64x64w8s4", "64x64x64w4s4", "128x64x32w4s4"]
    wide = [t.name for t in _stats_tile_candidates(256 * 14 * 14, 1024, 256, 2, "cuda")]
    assert wide == ["128x128x64w8s4", "64x128x64w4s4", "64x256x64w8s4", "128x128x64w8s3"]
    # 128 channels: no 256-wide tile (half of it masked); a small problem's fixed rule is 64 tall.
    small = [t.name for t in _stats_tile_candidates(64 * 64, 128, 128, 2, "cuda")]
    assert small == ["64x128x64w4s4", "128x128x64w8s4", "128x128x64w8s3"]
    # fp32 operands: half the K step (the same bytes); 20 input channels: K steps of 32.
    assert all(t.block_k == 32 for t in _stats_tile_candidates(256 * 196, 1024, 256, 4, "cuda"))
    assert all(t.block_k <= 32 for t in _stats_tile_candidates(4096, 64, 20, 2, "cuda"))
    for m, out_c, in_c in ((10**6, 64, 64), (10**6, 512, 2048), (500, 72, 20)):
        tiles = _stats_tile_candidates(m, out_c, in_c, 2, "cuda")
        assert 1 <= len(tiles) <= MAX_STATS_TILES and len(set(tiles)) == len(tiles)


def test_backward_candidates_per_shape(monkeypatch):
    _fake_gpu(monkeypatch)
    # ResNet-50 layer3 3x3 (256 -> 256) at batch 256: the fixed rules first, at most three each.
    wgrad = [t.name for t in _wgrad_tile_candidates(256 * 14 * 14, 256, 256, 2, "cuda")]
    assert wgrad == ["128x128x64w8s4", "128x128x128w8s3", "64x128x64w4s4"]
    dgrad = [t.name for t in _dgrad_tile_candidates(256 * 14 * 14, 256, 256, 2, True, "cuda")]
    assert dgrad == ["128x64x64w8s4", "128x64x64w4s4", "64x128x64w4s4"]
    plain = [t.name for t in _dgrad_tile_candidates(256 * 14 * 14, 256, 256, 2, False, "cuda")]
    assert plain == ["128x128x64w8s4", "64x128x64w4s4", "128x128x64w8s3"]
    # 64 channels (layer1): nothing wider than 64 columns; fp32 halves the K steps.
    assert [t.name for t in _wgrad_tile_candidates(256 * 56 * 56, 64, 64, 4, "cuda")] == [
        "64x64x32w4s4", "64x64x64w4s3"]
    narrow = _dgrad_tile_candidates(256 * 56 * 56, 64, 64, 2, True, "cuda")
    assert all(t.block_n == 64 for t in narrow) and len(narrow) <= 3
    assert [t.name for t in _dgrad_tile_candidates(256 * 56 * 56, 64, 256, 2, False, "cuda")] == [
        "128x64x64w4s4", "64x64x64w4s4"]


def test_candidates_before_hopper_fit_its_pipeline_and_shared_memory(monkeypatch):
    _fake_gpu(monkeypatch, major=8, shared=99 * 1024)
    tiles = _stats_tile_candidates(256 * 14 * 14, 1024, 256, 2, "cuda")
    assert tiles and all(t.num_stages <= 3 and t.shared_bytes(2) <= 99 * 1024 for t in tiles)


class _FakeTimer:
    """tuning.measure with made-up times (the second candidate wins); runs every candidate once."""

    def __init__(self):
        self.calls = []

    def __call__(self, candidates, device):
        self.calls.append(list(candidates))
        times = {}
        for i, (name, fn) in enumerate(candidates.items()):
            fn()
            times[name] = 1.0 if i == 1 else 2.0 + i
        return times


@pytest.fixture
def fake_measurement(monkeypatch, tmp_path):
    """A CPU that the tile choices believe they can measure on: fake H100 properties, a fake timer,
    a private disk cache."""
    _fake_gpu(monkeypatch)
    monkeypatch.setattr(tuning, "can_measure", lambda device: True)
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(tuning.DISPATCH_ENV, raising=False)
    timer = _FakeTimer()
    monkeypatch.setattr(tuning, "measure", timer)
    return timer


def _conv_stats(x, weight, norm_input, stride=1, padding=1):
    return conv_stats(x, weight, stride, padding, EPS, norm_input)


@pytest.mark.skipif(DEVICE == "cuda", reason="the fake timer stands in for a GPU")
def test_the_measured_tile_is_chosen_cached_and_runs(fake_measurement):
    shape = (2, 20, 9, 9, 72, 1, 1)
    x, weight, norm_input = _tile_problem(shape, torch.float32)
    y, *stats = _conv_stats(x, weight, norm_input, padding=0)
    # 162 rows: the small-problem rule first (64x128x32w4s4); fp32 and 20 channels: K steps of 32
    names = ["rule", "tile:128x128x32w8s4", "tile:128x128x32w8s3"]
    assert fake_measurement.calls == [names]
    key = "conv_stats.tile:72x20k1x1s1x1p0x0:x2x20x9x9:float32:norm1:cl"
    entry = tuning.decision(key)
    assert entry["choice"] == names[1] and entry["source"] == "measured" and set(entry["times_ms"]) == set(names)
    _check_against_reference(x, weight, 1, 0, norm_input, y, stats)  # the op ran the chosen tile
    _conv_stats(x, weight, norm_input, padding=0)  # the same problem again: the in-process choice, no timing
    assert len(fake_measurement.calls) == 1
    tuning.clear()
    _conv_stats(x, weight, norm_input, padding=0)  # a new process: the disk cache, no timing
    assert len(fake_measurement.calls) == 1 and tuning.decision(key)["source"] == "disk cache"
    _conv_stats(x, weight, None, padding=0)  # without the prologue: another problem
    assert len(fake_measurement.calls) == 2


@pytest.mark.skipif(DEVICE == "cuda", reason="the fake timer stands in for a GPU")
def test_the_switches_override_measurement(fake_measurement, monkeypatch):
    x, weight, norm_input = _tile_problem((2, 20, 9, 9, 72, 3, 1), torch.float32)
    packed = weight.permute(0, 2, 3, 1).contiguous()
    out = _channels_last(torch.empty(2, 72, 9, 9))

    def choose():
        tile = conv_stats_ops.stats_tile(x, packed, out, (1, 1), (1, 1), norm_input, EPS)
        return None if tile is None else tile.name

    for spec in ("fixed", "conv_stats.tile=fixed"):  # no timing: the fixed rule
        tuning.override(spec)
        assert choose() is None
    tuning.override("conv_stats.tile=tile:128x128x32w8s3")  # a tile this problem offers
    assert choose() == "128x128x32w8s3"
    tuning.override("conv_stats.tile=tile:64x256x32w8s4")  # one it does not (72 channels): the fixed rule
    assert choose() is None
    assert fake_measurement.calls == []
    tuning.override("conv_stats.backward=triton_bwd,fused_block=triton")  # other ops' pins: this one is timed
    assert choose() == "128x128x32w8s4" and len(fake_measurement.calls) == 1
    monkeypatch.setattr(tuning, "can_measure", lambda device: False)  # the CPU as it is
    tuning.override(None)
    assert choose() is None and len(fake_measurement.calls) == 1


@pytest.mark.skipif(DEVICE == "cuda", reason="the fake timer stands in for a GPU")
def test_the_backward_tiles_are_measured_in_a_second_step(fake_measurement):
    """conv_stats' Triton backward chooses its wgrad and dgrad tiles (two more keys), runs them, and
    gives eager's gradients."""
    shape = (2, 20, 9, 9, 72, 1, 1)
    x, weight, norm, grad_y, grad_w, grad_a = _backward_problem(shape, torch.float32)
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    y, *_ = conv_stats(leaves[0], leaves[1], 1, 0, EPS, norm, backward="triton_bwd")
    y.backward(grad_y)
    ops = sorted(d["op"] for d in tuning.decisions())
    assert ops == ["conv_dgrad.tile", "conv_stats.tile", "conv_wgrad.tile"], ops
    wgrad = next(d for d in tuning.decisions() if d["op"] == "conv_wgrad.tile")
    assert wgrad["key"] == "conv_wgrad.tile:72x20k1x1s1x1p0x0:x2x20x9x9:float32:norm1:cl"
    assert wgrad["choice"] == list(wgrad["times_ms"])[1] and wgrad["choice"].startswith("tile:")
    scale = grad_w.abs().max().item()
    assert_close(leaves[1].grad.double() / scale, grad_w / scale, atol=1e-3, rtol=1e-3, name="grad_w")
    calls = len(fake_measurement.calls)
    y, *_ = conv_stats(leaves[0], leaves[1], 1, 0, EPS, norm, backward="triton_bwd")
    y.backward(grad_y)
    assert len(fake_measurement.calls) == calls  # chosen once per problem


# ---------------------------------------------------------------------------
# GPU: the tiles timed for real
# ---------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(32, 64, 56, 56, 64, 3, 1), (32, 256, 28, 28, 512, 1, 1)], ids=str)
def test_gpu_tiles_are_measured_and_the_choice_recorded(shape, monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("FASTRESNET_EXPERIMENTAL", "1")
    monkeypatch.delenv(tuning.DISPATCH_ENV, raising=False)
    n, c, h, w, out_c, k, stride = shape
    x, weight, norm_input = _tile_problem(shape, torch.bfloat16)
    y, *stats = _conv_stats(x, weight, norm_input, stride, k // 2)
    (entry,) = [d for d in tuning.decisions() if d["op"] == "conv_stats.tile"]
    m = y.shape[0] * y.shape[2] * y.shape[3]
    names = conv_stats_ops._tile_names(_stats_tile_candidates(m, out_c, c, 2, x.device))
    assert entry["source"] == "measured", tuning.decisions()
    assert set(entry["times_ms"]) == set(names) and entry["choice"] in names, entry  # every tile ran
    own_var, own_mean = torch.var_mean(y.float(), dim=(0, 2, 3), unbiased=False)
    assert_close(stats[0], own_mean, atol=1e-3, rtol=1e-3, name="mean")
    assert_close(stats[1], torch.rsqrt(own_var + EPS), atol=1e-3, rtol=1e-3, name="invstd")
    ref = conv_stats_reference(x.float(), weight.float(), stride, k // 2, norm_input)[0]
    assert_close(y.float(), ref, atol=6e-2, rtol=6e-2, name="raw output")


@pytest.mark.cuda
def test_gpu_backward_tiles_are_measured_and_recorded(monkeypatch, tmp_path):
    """conv_stats' Triton backward at a ResNet-50 layer2 3x3 (bf16): the wgrad and dgrad tiles timed
    (every candidate ran) and the gradients as eager's within bf16's tolerance."""
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("FASTRESNET_EXPERIMENTAL", "1")
    monkeypatch.delenv(tuning.DISPATCH_ENV, raising=False)
    shape = (16, 128, 28, 28, 128, 3, 1)
    x, weight, norm, grad_y, grad_w, grad_a = _backward_problem(shape, torch.bfloat16)
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    y, *_ = conv_stats(leaves[0], leaves[1], 1, 1, EPS, norm, backward="triton_bwd")
    y.backward(grad_y)
    m = 16 * 28 * 28
    wgrad_names = conv_stats_ops._tile_names(_wgrad_tile_candidates(m, 128, 128, 2, x.device))
    dgrad_names = conv_stats_ops._tile_names(_dgrad_tile_candidates(m, 128, 128, 2, True, x.device))
    for kind, names in (("wgrad", wgrad_names), ("dgrad", dgrad_names)):
        entries = [d for d in tuning.decisions() if d["op"] == f"conv_{kind}.tile"]
        assert len(entries) == 1 and entries[0]["source"] == "measured", tuning.decisions()
        assert set(entries[0]["times_ms"]) == set(names) and entries[0]["choice"] in names, entries
    scale = grad_w.abs().max().item()
    assert_close(leaves[1].grad.double() / scale, grad_w / scale, atol=6e-2, rtol=6e-2, name="grad_w")


@pytest.mark.skipif(DEVICE == "cuda", reason="the fake timer stands in for a GPU")
def test_tiles_fixed_switch_times_no_tile_and_runs_the_rule(fake_measurement, monkeypatch):
    monkeypatch.setenv(tuning.TILES_ENV, "fixed")
    x, weight, norm_input = _tile_problem((2, 20, 9, 9, 72, 1, 1), torch.float32)
    y, *stats = _conv_stats(x, weight, norm_input, padding=0)
    assert fake_measurement.calls == []  # no tile was timed
    _check_against_reference(x, weight, 1, 0, norm_input, y, stats)


def test_tiles_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv(tuning.TILES_ENV, "fast")
    with pytest.raises(ValueError, match="FASTRESNET_TILES='fast'"):
        tuning.settings()
    monkeypatch.setenv(tuning.TILES_ENV, "search")
    assert not tuning.settings().tiles_fixed
