"""conv_stats and its backward (fastresnet/ops/conv_stats.py; kernels/conv_train.py, bn_stats.py) against
the eager reference (the experimental shelf's tiles and Triton backward: tests/experimental/test_shelf_conv_stats.py).

On the CPU the kernels run through Triton's interpreter: tiny shapes, large blocks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastresnet.kernels.bn_stats import finalize_stats
from fastresnet.kernels.conv_train import conv_stats_fwd
from fastresnet.ops import tuning
from fastresnet.ops.bn_act import bn_act_stats
from fastresnet.ops.conv_stats import conv_stats
from fastresnet.reference import conv_stats_reference
from fastresnet.testing import assert_close

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
    """(mean, invstd, weight, bias) of a previous BatchNorm; bias < 0 for some channels so the
    ReLU and the zero padding after normalisation both matter."""
    return (torch.randn(c, device=DEVICE) + 2.0, torch.rand(c, device=DEVICE) + 0.5,
            torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE))


def _raw_conv(x, weight, stride, padding, norm_input):
    out_shape = conv_stats_reference(x, weight, stride, padding, norm_input)[0].shape
    out = _channels_last(torch.empty(out_shape, device=x.device, dtype=x.dtype))
    mean_part, m2_part, rows = conv_stats_fwd(
        x, weight.permute(0, 2, 3, 1).contiguous(), out, (stride, stride), (padding, padding), norm_input)
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
    y1, m1, i1, _ = conv_stats(x, w1, None, 1, 1, eps=EPS, use_cudnn=use_cudnn)
    y2, m2, i2, _ = conv_stats(y1, w2, None, 2, 0, eps=EPS, input_norm=(m1, i1, g1, b1), use_cudnn=use_cudnn)
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
    names = ["x", "w1", "w2", "weight1", "bias1", "weight2", "bias2", "residual"]
    for name, a, b in zip(names, fused_args, eager_args):
        scale = b.grad.abs().max().item() + 1e-6  # gradients of whole-tensor sums: compare relative to their size
        assert_close(a.grad.float() / scale, b.grad / scale, atol=atol, rtol=rtol, name=f"grad {name}")


def test_bad_inputs_name_the_problem():
    x = torch.randn(2, 8, 5, 5, device=DEVICE)
    with pytest.raises(ValueError, match="8 channels"):
        conv_stats(x, torch.randn(4, 6, 1, 1, device=DEVICE))
    with pytest.raises(TypeError, match="float"):
        conv_stats(x, torch.randn(4, 8, 1, 1, device=DEVICE).half())
    with pytest.raises(ValueError, match="input_norm mean"):
        conv_stats(x, torch.randn(4, 8, 1, 1, device=DEVICE), input_norm=_input_stats(5))
    with pytest.raises(ValueError, match="no bias"):
        conv_stats(x, torch.randn(4, 8, 1, 1, device=DEVICE), torch.zeros(4, device=DEVICE))
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

PATHS = ("cudnn",)  # the main tree's (tests/experimental has the shelf's Triton paths)

# (N, Cin, H, W, Cout, kernel, stride): the ResNet conv kinds scaled down, plus odd sizes
BWD_SHAPES = [
    (2, 16, 6, 6, 32, 1, 1),  # bottleneck 1x1
    (2, 24, 7, 7, 20, 1, 2),  # projection shortcut: odd H/W, Cout not a power of 2
    (2, 20, 7, 7, 12, 3, 1),  # 3x3, Cin and Cout not multiples of 16
    (1, 16, 9, 7, 16, 3, 2),  # strided 3x3, batch 1, non-square
]


def _bwd_problem(shape, normalise_input):
    """fp32 leaves: raw x, weight, the input norm's weight and bias (bias < 0 for some channels: the ReLU
    matters) and grad_y."""
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
    """conv_stats with (mean, invstd) of x as its input_norm, as the previous conv_stats gives them; the
    backward through `path` (pinned), or the tuned choice for "auto"."""
    leaves = [x.detach().to(dtype).requires_grad_(), weight.detach().to(dtype).requires_grad_()]
    input_norm = None
    if affine is not None:
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
        leaves += [t.detach().clone().requires_grad_() for t in affine]
        input_norm = (mean, torch.rsqrt(var + EPS), leaves[2], leaves[3])
    tuning.override(None if path == "auto" else f"conv_stats.backward={path}")
    y, *_ = conv_stats(leaves[0], leaves[1], None, stride, padding, eps=EPS, input_norm=input_norm)
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
    _compare(actual, expected, dtype, ["x", "weight", "norm weight", "norm bias"])
    assert actual[1].stride() == weight.stride(), "grad_w must have the weight's strides"


def test_backward_op_passes_opcheck():
    """Schema, fake implementation (what torch.compile sees) and real outputs agree."""
    x, weight, affine, grad_y = _bwd_problem(BWD_SHAPES[0], normalise_input=True)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    args = (grad_y, x, weight, mean, torch.rsqrt(var + EPS), *affine, [1, 1], [0, 0], True, "cudnn")
    torch.library.opcheck(torch.ops.fastresnet.conv_stats_backward.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_forward_op_passes_opcheck():
    x, weight, _ = _bwd_problem(BWD_SHAPES[2], normalise_input=False)[:3]
    norm = tuple(t.detach() for t in _input_stats(x.shape[1]))
    for path in ("triton", "cudnn"):
        args = (x, weight, *norm, [1, 1], [1, 1], EPS, path)
        torch.library.opcheck(torch.ops.fastresnet.conv_stats.default, args,
                              test_utils=("test_schema", "test_faketensor"))
