"""Training conv + BatchNorm fusion: a conv that emits its output's BatchNorm statistics, as a torch op.

A BatchNorm training chain conv -> bn -> relu -> conv -> bn ... becomes

    y1, mean1, invstd1, var1 = conv_stats(x, w1)                                          # statistics in the epilogue
    y2, mean2, invstd2, var2 = conv_stats(y1, w2, input_norm=(mean1, invstd1, weight1, bias1))  # bn1 + relu on load
    out = bn_act_stats(y2, mean2, invstd2, weight2, bias2, residual=identity)            # bn2 + add + relu, one pass

(bn_act_stats: fastresnet.ops.bn_act). Only raw conv outputs are written; a normalised activation never
is. mean and invstd (1 / sqrt(biased var + eps)) are fp32 and non-differentiable outputs: the next op's
backward is the *full* BatchNorm backward, which accounts for their dependence on the raw input. The
unbiased variance is for running_var.

The backward needs grad_w = wgrad(grad_y, a) and grad_a = dgrad(grad_y, w), then grad_x and the input
BatchNorm's weight and bias gradients through its BatchNorm + ReLU: a is recomputed and written (one
elementwise pass), cuDNN's dgrad and wgrad run in one call, then the BatchNorm backward's two passes
(op "conv_stats.backward", "cudnn"; the experimental shelf times Triton kernels that never write a).

As every op here, the path is chosen before the custom op is called: the Triton kernels as torch.library
custom ops (opaque to torch.compile, which sees their fake implementations), or the eager reference, whose
statistics are ordinary differentiable tensors, so autograd through it gives the same gradients.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from fastresnet import backend
from fastresnet.ops import tuning
from fastresnet.ops.layout import (
    FLOAT_DTYPES, as_rows, conv_output_shape, empty_conv_output, fits_int32, kernels, pair, with_strides_of,
)
from fastresnet.reference import conv_stats_reference

# "triton": the kernel with its default tile (the experimental shelf times others).
CONV_STATS_FORWARD = tuning.Op("conv_stats.forward", {"triton": None})  # run 2
CONV_STATS_BACKWARD = tuning.Op("conv_stats.backward", {"cudnn": None})  # run 2
# The experimental shelf's paths by name (fastresnet.experimental.conv_stats fills it): forwards called as
# the forward op's body, backwards as f(grad_y, x, weight, input_norm, stride, padding, input_grad) ->
# (grad_x or None, grad_weight, grad of the input norm's weight and bias or None).
EXPERIMENTAL: dict[str, Callable] = {}

Norm = Optional[tuple[Tensor, Tensor, Tensor, Tensor]]  # (mean, invstd, weight, bias) of the input's BatchNorm


@torch.library.custom_op("fastresnet::conv_stats", mutates_args=())
def _conv_stats(x: Tensor, weight: Tensor, norm_mean: Optional[Tensor], norm_invstd: Optional[Tensor],
                norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], stride: list[int], padding: list[int],
                eps: float, path: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, unbiased var). path "cudnn": cuDNN's conv on a transient normalised input, then a
    statistics pass; "triton": the kernel, statistics from its epilogue."""
    if path not in ("cudnn", "triton"):
        return EXPERIMENTAL[path](x, weight, norm_mean, norm_invstd, norm_weight, norm_bias, stride, padding, eps)
    k = kernels()
    out = empty_conv_output(x, weight, stride, padding)
    if path == "cudnn":
        a = x if norm_mean is None else k.bn_act.affine_act_fwd(x, norm_weight, norm_bias, center=norm_mean,
                                                                invstd=norm_invstd, relu=True)
        y = torch.ops.aten.convolution(a, weight, None, stride, padding, [1, 1], False, [0, 0], 1)
        out = with_strides_of(y, out)
        mean_part, m2_part, rows = k.bn_stats.stats_partials(out)
    else:
        norm = None if norm_mean is None else (norm_mean, norm_invstd, norm_weight, norm_bias)
        packed = weight.permute(0, 2, 3, 1).contiguous()  # [Cout, KH, KW, Cin]: free for a channels_last weight
        mean_part, m2_part, rows = k.conv_train.conv_stats_fwd(x, packed, out, stride, padding, norm)
    return (out, *k.bn_stats.finalize_stats(mean_part, m2_part, out.numel() // out.shape[1], rows, eps))


@_conv_stats.register_fake
def _(x, weight, norm_mean, norm_invstd, norm_weight, norm_bias, stride, padding, eps, path):
    stat = x.new_empty(weight.shape[0], dtype=torch.float32)
    return empty_conv_output(x, weight, stride, padding), stat, torch.empty_like(stat), torch.empty_like(stat)


@torch.library.custom_op("fastresnet::conv_stats_backward", mutates_args=())
def _conv_stats_backward(grad_y: Tensor, x: Tensor, weight: Tensor, norm_mean: Optional[Tensor],
                         norm_invstd: Optional[Tensor], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                         stride: list[int], padding: list[int], input_grad: bool, path: str
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_norm_weight, grad_norm_bias) through `path`: grad_x w.r.t. the raw x
    (through its BatchNorm with batch statistics), empty unless input_grad or an input norm; the last two
    empty without an input norm."""
    norm = None if norm_mean is None else (norm_mean, norm_invstd, norm_weight, norm_bias)
    if path == "cudnn":
        k = kernels()
        a = x if norm is None else k.bn_act.affine_act_fwd(x, norm_weight, norm_bias, center=norm_mean,
                                                           invstd=norm_invstd, relu=True)
        needs_grad_a = input_grad or norm is not None  # cuDNN's wgrad needs a in memory; dgrad comes with it
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_y, a, weight, None, stride, padding, [1, 1], False, [0, 0], 1, [needs_grad_a, True, False])
        grad_norm_weight = grad_norm_bias = None
        if norm is not None:
            grad_x, sum_g, sum_gx, _ = k.bn_act.affine_act_bwd(
                as_rows(grad_x), x, norm_weight, norm_bias, center=norm_mean, invstd=norm_invstd, relu=True,
                param_grads=True, batch_stats=True)
            grad_norm_weight, grad_norm_bias = sum_gx * norm_invstd, sum_g
    else:
        grad_x, grad_w, grad_norm_weight, grad_norm_bias = EXPERIMENTAL[path](grad_y, x, weight, norm, stride,
                                                                              padding, input_grad)
    if norm is None:  # each output a tensor of its own: a custom op's outputs may not alias
        grad_norm_weight, grad_norm_bias = x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    return (with_strides_of(grad_x, torch.empty_like(x)) if grad_x is not None else x.new_empty(0),
            with_strides_of(grad_w, torch.empty_like(weight)), grad_norm_weight, grad_norm_bias)


@_conv_stats_backward.register_fake
def _(grad_y, x, weight, norm_mean, norm_invstd, norm_weight, norm_bias, stride, padding, input_grad, path):
    norm = norm_mean is not None
    grad_x = torch.empty_like(x) if (input_grad or norm) else x.new_empty(0)
    channel = torch.empty_like(norm_mean) if norm else x.new_empty(0, dtype=torch.float32)
    return grad_x, torch.empty_like(weight), channel, torch.empty_like(channel)


def conv_stats_setup(ctx, inputs, output):
    """setup_context of every op with conv_stats' leading inputs (x, weight, the input norm's four, stride,
    padding) and outputs (y, mean, invstd, var): the shelf's cuDNN-graph op shares this backward."""
    x, weight, norm_mean, norm_invstd, norm_weight, norm_bias, stride, padding = inputs[:8]
    ctx.save_for_backward(x, weight, norm_mean, norm_invstd, norm_weight, norm_bias)
    ctx.stride, ctx.padding, ctx.inputs = list(stride), list(padding), len(inputs)
    ctx.mark_non_differentiable(*output[1:])


def choose_backward(grad_y: Tensor, x: Tensor, weight: Tensor, norm: tuple, stride: list[int], padding: list[int],
                    input_grad: bool) -> str:
    """The backward path for this problem (norm: the input norm's four tensors, or four Nones)."""
    problem = (x.shape, x.stride(), x.dtype, weight.shape, grad_y.stride(), tuple(stride), tuple(padding),
               norm[0] is not None, input_grad)
    return CONV_STATS_BACKWARD.choose(
        problem, x.device, "cudnn", args=(x, weight, stride, norm[0] is not None),
        timed=lambda name: lambda: torch.ops.fastresnet.conv_stats_backward(grad_y, x, weight, *norm, stride, padding,
                                                                            input_grad, name))


def conv_stats_grads(ctx, grad_y, *_):
    """Gradients of (x, weight, the input norm's mean, invstd, weight, bias), None where not needed, then
    None for each further input; the backward path is chosen here, where the inputs are real."""
    x, weight, *norm = ctx.saved_tensors
    needs, has_norm = ctx.needs_input_grad, norm[0] is not None
    path = choose_backward(grad_y, x, weight, norm, ctx.stride, ctx.padding, needs[0])
    grad_x, grad_w, grad_nw, grad_nb = torch.ops.fastresnet.conv_stats_backward(
        grad_y, x, weight, *norm, ctx.stride, ctx.padding, needs[0], path)
    return (grad_x if needs[0] else None, grad_w if needs[1] else None, None, None,
            grad_nw if has_norm and needs[4] else None, grad_nb if has_norm and needs[5] else None,
            *(None,) * (ctx.inputs - 6))


torch.library.register_autograd("fastresnet::conv_stats", conv_stats_grads, setup_context=conv_stats_setup)


def validate(x: Tensor, weight: Tensor, bias, input_norm: Norm, stride, padding) -> None:
    """conv_stats' checks (and those of the ops that share its meaning: the shelf's cuDNN graph)."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv_stats: x and weight must be 4-D, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in FLOAT_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"conv_stats: x ({x.dtype}) and weight ({weight.dtype}) must share one float dtype")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv_stats: x has {x.shape[1]} channels, weight {tuple(weight.shape)} expects "
                         f"{weight.shape[1]}")
    if bias is not None:
        raise ValueError("conv_stats: a conv followed by BatchNorm has no bias (the BatchNorm's mean removes it)")
    if input_norm is not None:
        for name, v in zip(("mean", "invstd", "weight", "bias"), input_norm):
            if v.shape != (x.shape[1],):
                raise ValueError(f"conv_stats: input_norm {name} must have shape ({x.shape[1]},), "
                                 f"got {tuple(v.shape)}")
    if not fits_int32(x.shape, conv_output_shape(x.shape, weight.shape, stride, padding)):
        raise ValueError(f"conv_stats: input {tuple(x.shape)} or its output has >= 2**31 elements; split the batch")


def conv_stats(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, *,
               eps: float = 1e-5, input_norm: Norm = None, use_cudnn: bool = False
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, unbiased var) with y = conv2d(a, weight, None, stride, padding) (no bias, groups
    1, dilation 1), a = input, or relu((input - mean) * invstd * weight + bias) for input_norm = (mean,
    invstd, weight, bias): the previous conv_stats' statistics and its BatchNorm's affine parameters.

    y has the input's dtype and memory format; mean, invstd (1/sqrt(biased var + eps)) and the unbiased
    variance are y's per-channel batch statistics, fp32. Gradients flow to the input (through its
    BatchNorm, with batch statistics), weight and the input norm's weight and bias.

    use_cudnn: cuDNN's conv instead of the Triton kernel (the normalised input is then written, used and
    freed, and the statistics take a pass of their own); the backward is the same. Where cuDNN's 3x3 beats
    the Triton one, a block mixes the two.
    """
    stride, padding = list(pair(stride)), list(pair(padding))
    validate(input, weight, bias, input_norm, stride, padding)
    if not backend.use_triton(input):
        return conv_stats_reference(input, weight, stride, padding, input_norm, eps)
    norm = (None,) * 4 if input_norm is None else tuple(v.float() for v in input_norm)
    path = "cudnn" if use_cudnn else CONV_STATS_FORWARD.choose(
        (input.shape, input.stride(), input.dtype, weight.shape, tuple(stride), tuple(padding), input_norm is not None),
        input.device, "triton", args=(input, weight, stride, padding),
        timed=lambda name: lambda: torch.ops.fastresnet.conv_stats(input, weight, *norm, stride, padding, eps, name))
    return torch.ops.fastresnet.conv_stats(input, weight, *norm, stride, padding, eps, path)

