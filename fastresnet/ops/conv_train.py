"""Training conv + BatchNorm fusion as autograd-capable torch ops.

A BatchNorm training chain conv -> bn -> relu -> conv -> bn ... becomes

    y1, stats1 = conv_stats(x, w1)                        # conv, statistics in the epilogue
    y2, stats2 = conv_stats(y1, w2, norm_input=stats1)    # bn1 + relu applied on load
    out = bn_act_stats(y2, *stats2, residual=identity)    # bn2 + add + relu, one pass

where stats = (mean, invstd, gamma, beta): the batch mean and 1/sqrt(var + eps)
of the raw output (fp32, non-differentiable outputs) and the BatchNorm's
affine parameters. Only raw conv outputs are ever written; a normalised
activation never is.

Backward. The mean and invstd an op receives are functions of its raw input,
so the op's backward is the *full* BatchNorm backward (issue 3's fused
kernels with batch_stats=True), which accounts for that dependence; autograd
never sees the statistics as differentiable. conv_stats' backward never has
the normalised input a = relu(bn(x)) saved: either it recomputes a in one
elementwise pass, runs cuDNN's dgrad and wgrad (aten.convolution_backward) and
then the BatchNorm + ReLU backward in two passes, or Triton's wgrad normalises
a on load and Triton's stride-1 dgrad leaves only the elementwise pass; the
choice is measured per shape (fastresnet.ops.conv_train_backward). The forward
kernel's tile is measured per shape too (fastresnet.ops.conv_train_tiles).

Paths. As in fastresnet.ops.bn_act, the path is chosen in Python before any
op is called (backend.use_triton): the Triton kernels as torch.library custom
ops (opaque to torch.compile, which sees their fake implementations), or the
eager reference, whose statistics are ordinary differentiable tensors, so
autograd through it gives the same gradients.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastresnet import backend
from fastresnet.ops import conv_train_backward, conv_train_tiles
from fastresnet.reference import affine_act_reference, normalise_act_reference

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    # Imported on first use: TRITON_INTERPRET must be set before the import.
    from fastresnet.kernels import bn_act, bn_stats, conv_train

    return bn_act, bn_stats, conv_train


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _out_shape(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int]) -> list[int]:
    n, _, h, w = x.shape
    out_c, _, kh, kw = weight.shape
    return [n, out_c, (h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1]


def _empty_output(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int]) -> Tensor:
    """The conv output's buffer, in x's dtype and memory format (what the fake implementation promises)."""
    return torch.empty(_out_shape(x, weight, stride, padding), device=x.device, dtype=x.dtype,
                       memory_format=_memory_format(x))


def _like(t: Tensor, template: Tensor) -> Tensor:
    """t with template's strides (copied into it when they differ): what an op returns must have the
    strides its fake implementation promised to torch.compile, and a weight gradient the strides of the
    weight (autograd's layout contract; DDP's buckets)."""
    return t if t.stride() == template.stride() else template.copy_(t)


def _rows(t: Tensor) -> Tensor:
    """t itself when issue 3's kernels can address it by strides, else a channels_last copy."""
    bn_act, _, _ = _kernels()
    return t if bn_act.has_row_strides(t) else t.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------
# conv_stats: y = conv(x or relu(bn(x))), with y's batch statistics
# ---------------------------------------------------------------------------


@torch.library.custom_op("fastresnet::conv_stats", mutates_args=())
def _conv_stats_op(
    x: Tensor,
    weight: Tensor,
    in_mean: Optional[Tensor],
    in_invstd: Optional[Tensor],
    in_gamma: Optional[Tensor],
    in_beta: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    eps: float,
    use_cudnn: bool,
    backward: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, unbiased var): the raw conv output and its per-channel statistics (fp32).
    backward: the backward path (fastresnet.ops.conv_train_backward), used by the autograd formula."""
    bn_act, bn_stats, _ = _kernels()
    if use_cudnn:  # the same op with cuDNN's conv: a transient normalised input, a statistics pass
        a = x if in_mean is None else bn_act.affine_act_fwd(
            x, in_gamma, in_beta, center=in_mean, invstd=in_invstd, relu=True
        )
        out = torch.ops.aten.convolution(a, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1)
        out = _like(out, _empty_output(x, weight, stride, padding))
        return (out, *bn_act.bn_stats(out, eps))
    out = _empty_output(x, weight, stride, padding)
    norm_input = None if in_mean is None else (in_mean, in_invstd, in_gamma, in_beta)
    packed = weight.permute(0, 2, 3, 1).contiguous()  # [Cout, KH, KW, Cin]: free for a channels_last weight
    # The tile: measured per shape here, where the inputs are real (torch.compile sees the fake).
    tile = conv_train_tiles.choose_stats_tile(x, packed, out, stride, padding, norm_input, eps)
    tile = None if tile is None else conv_train_tiles.tile_from_name(tile)
    mean, invstd, var_unbiased = conv_train_tiles.run_conv_stats(x, packed, out, stride, padding, norm_input, eps, tile)
    return out, mean, invstd, var_unbiased


@_conv_stats_op.register_fake
def _(x, weight, in_mean, in_invstd, in_gamma, in_beta, stride, padding, eps, use_cudnn, backward):
    out = _empty_output(x, weight, stride, padding)
    stat = x.new_empty(weight.shape[0], dtype=torch.float32)
    return out, stat, torch.empty_like(stat), torch.empty_like(stat)


@torch.library.custom_op("fastresnet::conv_stats_backward", mutates_args=())
def _conv_stats_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    in_mean: Optional[Tensor],
    in_invstd: Optional[Tensor],
    in_gamma: Optional[Tensor],
    in_beta: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    input_grad: bool,
    backward: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_gamma, grad_beta); grad_x empty unless input_grad, the last two
    empty without a prologue. grad_x is the gradient w.r.t. the *raw* x, through its BatchNorm.
    The path (cuDNN or Triton wgrad/dgrad) is chosen here, at run time, where the inputs are real:
    torch.compile sees only the fake implementation."""
    norm = None if in_mean is None else (in_mean, in_invstd, in_gamma, in_beta)
    path = conv_train_backward.choose_backward(backward, grad_y, x, weight, norm, stride, padding, input_grad)
    grad_x, grad_w, sum_g, sum_gxc = conv_train_backward.run_backward(
        path, grad_y, x, weight, norm, stride, padding, input_grad
    )
    grad_w = _like(grad_w, torch.empty_like(weight))
    if norm is None:
        no_channels = x.new_empty(0, dtype=torch.float32)
        grad_x = _like(grad_x, torch.empty_like(x)) if input_grad else x.new_empty(0)
        return grad_x, grad_w, no_channels, torch.empty_like(no_channels)
    return _like(grad_x, torch.empty_like(x)), grad_w, sum_gxc * in_invstd, sum_g


@_conv_stats_backward_op.register_fake
def _(grad_y, x, weight, in_mean, in_invstd, in_gamma, in_beta, stride, padding, input_grad, backward):
    norm = in_mean is not None
    grad_x = torch.empty_like(x) if (input_grad or norm) else x.new_empty(0)
    channel = torch.empty_like(in_mean) if norm else x.new_empty(0, dtype=torch.float32)
    return grad_x, torch.empty_like(weight), channel, torch.empty_like(channel)


def save_conv_stats_context(ctx, inputs, output, backward: str = "auto"):
    """setup_context of every op with conv_stats' leading inputs (x, weight, in_mean, in_invstd,
    in_gamma, in_beta, stride, padding, ...) and outputs (y, mean, invstd, var): the cuDNN-graph
    op of fastresnet.ops.cudnn_graph shares this backward (with the measured backward path)."""
    x, weight, in_mean, in_invstd, in_gamma, in_beta, stride, padding = inputs[:8]
    _, mean, invstd, var_unbiased = output
    ctx.save_for_backward(x, weight, in_mean, in_invstd, in_gamma, in_beta)
    ctx.stride, ctx.padding, ctx.backward = list(stride), list(padding), backward
    ctx.mark_non_differentiable(mean, invstd, var_unbiased)


def conv_stats_input_grads(ctx, grad_y) -> tuple:
    """Gradients of (x, weight, in_mean, in_invstd, in_gamma, in_beta), None where not needed."""
    x, weight, in_mean, in_invstd, in_gamma, in_beta = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_w, grad_gamma, grad_beta = torch.ops.fastresnet.conv_stats_backward(
        grad_y, x, weight, in_mean, in_invstd, in_gamma, in_beta, ctx.stride, ctx.padding, needs[0], ctx.backward
    )
    norm = in_mean is not None
    return (
        grad_x if needs[0] else None,
        grad_w if needs[1] else None,
        None,
        None,
        grad_gamma if norm and needs[4] else None,
        grad_beta if norm and needs[5] else None,
    )


def _conv_stats_setup_context(ctx, inputs, output):
    save_conv_stats_context(ctx, inputs, output, backward=inputs[10])


def _conv_stats_backward(ctx, grad_y, _grad_mean, _grad_invstd, _grad_var):
    # No gradients for stride, padding, eps, use_cudnn and backward.
    return (*conv_stats_input_grads(ctx, grad_y), None, None, None, None, None)


torch.library.register_autograd(
    "fastresnet::conv_stats", _conv_stats_backward, setup_context=_conv_stats_setup_context
)


# ---------------------------------------------------------------------------
# bn_act_stats: act(bn(y) + residual) with y's statistics already known
# ---------------------------------------------------------------------------


@torch.library.custom_op("fastresnet::bn_act_stats", mutates_args=())
def _bn_act_stats_op(
    y: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, residual: Optional[Tensor], relu: bool
) -> Tensor:
    bn_act, _, _ = _kernels()
    return bn_act.affine_act_fwd(y, gamma, beta, center=mean, invstd=invstd, residual=residual, relu=relu)


@_bn_act_stats_op.register_fake
def _(y, mean, invstd, gamma, beta, residual, relu):
    return torch.empty_like(y)


@torch.library.custom_op("fastresnet::bn_act_stats_backward", mutates_args=())
def _bn_act_stats_backward_op(
    grad_out: Tensor, y: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor,
    residual: Optional[Tensor], relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_y, grad_gamma, grad_beta, grad_residual), the last empty without a residual."""
    bn_act, _, _ = _kernels()
    grad_y, sum_g, sum_gyc, grad_res = bn_act.affine_act_bwd(
        grad_out, y, gamma, beta, center=mean, invstd=invstd, residual=residual, relu=relu,
        param_grads=True, batch_stats=True,
    )
    return grad_y, sum_gyc * invstd, sum_g, grad_res if grad_res is not None else y.new_empty(0)


@_bn_act_stats_backward_op.register_fake
def _(grad_out, y, mean, invstd, gamma, beta, residual, relu):
    grad_res = torch.empty_like(residual) if residual is not None else y.new_empty(0)
    return torch.empty_like(y), torch.empty_like(mean), torch.empty_like(mean), grad_res


def _bn_act_stats_setup_context(ctx, inputs, output):
    y, mean, invstd, gamma, beta, residual, relu = inputs
    ctx.save_for_backward(y, mean, invstd, gamma, beta, residual)
    ctx.relu = relu


def _bn_act_stats_backward(ctx, grad_out):
    y, mean, invstd, gamma, beta, residual = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_y, grad_gamma, grad_beta, grad_res = torch.ops.fastresnet.bn_act_stats_backward(
        _rows(grad_out), y, mean, invstd, gamma, beta, residual, ctx.relu
    )
    return (
        grad_y if needs[0] else None,
        None,
        None,
        grad_gamma if needs[3] else None,
        grad_beta if needs[4] else None,
        grad_res if needs[5] else None,
        None,
    )


torch.library.register_autograd(
    "fastresnet::bn_act_stats", _bn_act_stats_backward, setup_context=_bn_act_stats_setup_context
)


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------

Stats = tuple[Tensor, Tensor, Tensor, Tensor]  # (mean, invstd, gamma, beta) of a raw conv output


def _check_conv_inputs(x: Tensor, weight: Tensor, norm_input: Optional[Stats]) -> None:
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv_stats: x and weight must be 4-D, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in _FLOAT_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"conv_stats: x ({x.dtype}) and weight ({weight.dtype}) must share one float dtype")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv_stats: x has {x.shape[1]} channels, weight {tuple(weight.shape)} expects {weight.shape[1]}")
    if norm_input is not None:
        for name, v in zip(("mean", "invstd", "gamma", "beta"), norm_input):
            if v.shape != (x.shape[1],):
                raise ValueError(f"conv_stats: norm_input {name} must have shape ({x.shape[1]},), got {tuple(v.shape)}")


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(v[0]), int(v[1])]


def conv_stats(x: Tensor, weight: Tensor, stride=1, padding=0, eps: float = 1e-5,
               norm_input: Optional[Stats] = None, use_cudnn: bool = False,
               backward: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, unbiased var) with y = conv2d(a, weight, stride, padding) (no bias,
    groups 1, dilation 1), a = x, or relu((x - mean) * invstd * gamma + beta) for
    norm_input = (mean, invstd, gamma, beta), the previous conv_stats' statistics.

    y has x's dtype and memory format; mean, invstd (1/sqrt(biased var + eps))
    and the unbiased variance (for running_var) are y's per-channel batch
    statistics, fp32. Gradients flow to x (through its BatchNorm, with batch
    statistics), weight, gamma and beta.

    use_cudnn: run the conv with cuDNN instead of the Triton kernel (the
    normalised input is then written, used and freed, and the statistics take
    a pass of issue 3's kernels); the backward, and what is saved for it, are
    the same. Where cuDNN's 3x3 beats the Triton one, a block mixes the two.

    backward: "auto" (measured per shape on a GPU; cuDNN's dgrad and wgrad where nothing is
    measured) or a path of fastresnet.ops.conv_train_backward.BACKWARD_PATHS: "cudnn",
    "triton_wgrad", "triton_dgrad", "triton_bwd" (Triton wgrad with normalise-on-load and
    stride-1 dgrad with the BatchNorm backward's sums in its epilogue).
    """
    _check_conv_inputs(x, weight, norm_input)
    conv_train_backward.check_backward_path(backward)
    stride, padding = _pair(stride), _pair(padding)
    if not backend.use_triton(x):
        return _conv_stats_reference_path(x, weight, stride, padding, eps, norm_input)
    mean_in = invstd_in = gamma_in = beta_in = None
    if norm_input is not None:
        mean_in, invstd_in, gamma_in, beta_in = (v.float() for v in norm_input)
    return torch.ops.fastresnet.conv_stats(
        x, weight, mean_in, invstd_in, gamma_in, beta_in, stride, padding, eps, use_cudnn, backward
    )


def _conv_stats_reference_path(x, weight, stride, padding, eps, norm_input):
    """Eager and differentiable: the statistics are ordinary tensors of y, so autograd gives the
    full BatchNorm backward through the next op's use of them."""
    a = x if norm_input is None else normalise_act_reference(x, *norm_input)
    y = torch.nn.functional.conv2d(a, weight, None, stride, padding)
    var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), unbiased=False)
    m = y.numel() // y.shape[1]
    if m <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {y.size()}")
    return y, mean, torch.rsqrt(var + eps), (var * (m / (m - 1))).detach()


def bn_act_stats(y: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor,
                 residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """act((y - mean) * invstd * gamma + beta + residual), y's statistics from conv_stats.

    The training BatchNorm's output pass without a statistics pass: gradients
    flow to y (with batch statistics), gamma, beta and the residual.
    """
    if residual is not None and residual.shape != y.shape:
        raise ValueError(f"bn_act_stats: residual shape {tuple(residual.shape)} != {tuple(y.shape)}")
    if not backend.use_triton(y):
        return affine_act_reference(y, invstd * gamma, beta, residual, relu, center=mean)
    residual = _rows(residual) if residual is not None else None
    return torch.ops.fastresnet.bn_act_stats(_rows(y), mean, invstd, gamma.float(), beta.float(), residual, relu)
