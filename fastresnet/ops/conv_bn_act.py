"""Inference conv + BatchNorm (+ residual) (+ ReLU) as one op, over several implementations.

    conv_bn_act(input, weight, bias, stride, padding, dilation, groups, *, scale, shift, residual, relu)
        = relu((conv2d(input, weight, bias, stride, padding, dilation, groups)) * scale[c] + shift[c] + residual)

with F.conv2d's arguments first and the BatchNorm folded to scale = weight / sqrt(running_var + eps),
shift = bias - running_mean * scale (bn_scale_shift). The modules fold at every call, from the
BatchNorm's statistics as they are then (four small launches), and the op derives its weight forms from
the live conv weight: a converted model never runs on stale weights, not after an optimizer step, a
BatchNorm recalibration (torch.optim.swa_utils.update_bn: BatchNorm's statistics update bumps no version
counter), a `.data` edit (which bypasses version counters by design), a DDP buffer broadcast, nor under
CUDA graphs, whose replays rerun the fold on the live tensors.

On a GPU the op runs whichever implementation is fastest for the problem (op "conv_bn_act" of
fastresnet.ops.tuning):
  "triton"        the fused implicit-GEMM kernel (kernels/conv.py) with its default tile: one kernel, one
                  write; groups == 1 only.
  "cudnn_fused"   BN folded into the weight and a bias; cuDNN's torch.cudnn_convolution_relu /
                  cudnn_convolution_add_relu (F.conv2d with a bias where there is no ReLU).
  "cudnn_affine"  F.conv2d (channels_last), then the one-pass scale/shift/add/ReLU kernel of kernels/bn_act.py.
Without a measurement: cuDNN's conv with the folded bias where there is nothing more to add, else with the
one-pass epilogue, never slower than eager conv + BN + ReLU (cuDNN's fused conv-bias-ReLU is not trusted
blindly: it refuses some dtype/layout combinations). On the CPU the op runs the eager reference, or the
Triton kernel through the interpreter when TRITON_INTERPRET=1 (tests).

Inference only: there is no backward, and a call that would need one raises. Under autocast the op
computes in autocast's dtype, like F.conv2d.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastresnet import backend
from fastresnet.ops import tuning
from fastresnet.ops.layout import FLOAT_DTYPES, conv_output_shape, fits_int32, kernels, memory_format_of, pair
from fastresnet.reference import conv_bn_act_reference

# The experimental shelf's implementations by name (fastresnet.experimental.conv_bn_act fills it), each
# called as the op's body would be.
EXPERIMENTAL: dict[str, Callable] = {}


def bn_scale_shift(running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5,
                   conv_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(scale, shift) in fp32 with bn(y + conv_bias) = y * scale + shift in eval mode (weight/bias None mean
    1/0), from the statistics as they are now."""
    scale = torch.rsqrt(running_var.detach().float() + eps)
    if weight is not None:
        scale = scale.mul_(weight.detach())
    shift = torch.addcmul(bias.detach().float() if bias is not None else torch.zeros_like(scale),
                          running_mean.detach().float(), scale, value=-1)
    if conv_bias is not None:
        shift = shift.addcmul_(conv_bias.detach().float(), scale)
    return scale, shift


def _triton_applies(x, weight, residual, stride, padding, dilation, groups) -> bool:
    """The kernel indexes in int32 and takes no groups; float64 goes to cuDNN (or the reference)."""
    return (backend.triton_available() and x.dtype in FLOAT_DTYPES and groups == 1
            and fits_int32(x.shape, conv_output_shape(x.shape, weight.shape, stride, padding, dilation)))


CONV_BN_ACT = tuning.Op("conv_bn_act", {"cudnn_fused": None, "cudnn_affine": None, "triton": _triton_applies})  # run 1


def default_path(args: tuple, relu: bool) -> str:
    """Where nothing is timed: on a GPU cuDNN's conv with the folded bias alone, or with the one-pass
    epilogue; on the CPU (Triton's interpreter: the tests) the kernel where it applies."""
    x, residual = args[0], args[2]
    if not x.is_cuda:
        return "triton" if _triton_applies(*args) else "cudnn_affine"
    return "cudnn_fused" if residual is None and not relu else "cudnn_affine"


@torch.library.custom_op("fastresnet::conv_bn_act", mutates_args=())
def _conv_bn_act(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                 stride: list[int], padding: list[int], dilation: list[int], groups: int, relu: bool,
                 path: str) -> Tensor:
    """relu(conv(x) * scale + shift + residual) through `path`, in x's dtype and memory format."""
    if path == "triton":
        out = torch.empty(conv_output_shape(x.shape, weight.shape, stride, padding, dilation), device=x.device,
                          dtype=x.dtype, memory_format=memory_format_of(x))
        packed = weight.permute(0, 2, 3, 1).contiguous()  # [Cout, KH, KW, Cin]: a view of a channels_last weight
        return kernels().conv.conv_bn_act_fwd(x, packed, scale, shift, residual, out, stride, padding, dilation, relu)
    if path == "cudnn_affine":
        y = F.conv2d(x, weight.contiguous(memory_format=torch.channels_last), None, stride, padding, dilation, groups)
        y = kernels().bn_act.affine_act_fwd(y, scale, shift, residual=residual, relu=relu)
    elif path == "cudnn_fused":
        folded = (weight.float() * scale.view(-1, 1, 1, 1)).to(x.dtype).contiguous(memory_format=torch.channels_last)
        bias, args = shift.to(x.dtype), (stride, padding, dilation, groups)
        if relu and residual is None:
            y = torch.cudnn_convolution_relu(x, folded, bias, *args)
        elif relu:
            y = torch.cudnn_convolution_add_relu(x, folded, residual, 1.0, bias, *args)
        else:
            y = F.conv2d(x, folded, bias, *args)
            y = y if residual is None else y.add_(residual)
    else:
        y = EXPERIMENTAL[path](x, weight, scale, shift, residual, stride, padding, dilation, groups, relu)
    # The layout the fake implementation promises: a no-op except where cuDNN picked channels_last for an
    # NCHW input (the weight is channels_last).
    return y.contiguous(memory_format=memory_format_of(x))


@_conv_bn_act.register_fake
def _(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, path):
    shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


def problem(x, weight, residual, stride, padding, dilation, groups, relu) -> tuple:
    """What the choice depends on. The residual's strides too: which candidates apply (the shelf's TMA
    GEMM's) depends on its layout."""
    return (x.shape, x.stride(), x.dtype, weight.shape, stride, padding, dilation, groups,
            None if residual is None else residual.stride(), relu)


def compute_dtype(x: Tensor) -> torch.dtype:
    """x's dtype, or autocast's when autocast is on for x's device (as F.conv2d would compute)."""
    if x.dtype.is_floating_point and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _validate(x, weight, scale, shift, residual, stride, padding, dilation, groups) -> None:
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv_bn_act: input and weight must be 4-D, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"conv_bn_act: input has {x.shape[1]} channels, weight {tuple(weight.shape)} with "
                         f"groups={groups} expects {weight.shape[1] * groups}")
    for name, t in (("weight", weight), ("scale", scale), ("shift", shift), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"conv_bn_act: {name} is on {t.device}, input on {x.device}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t.shape != (weight.shape[0],):
            raise ValueError(f"conv_bn_act: {name} must have shape ({weight.shape[0]},), got {tuple(t.shape)}")
    out_shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"conv_bn_act: residual has shape {tuple(residual.shape)}, output is {out_shape}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, scale, shift, residual)):
        raise RuntimeError("conv_bn_act is inference-only (no backward): call it under torch.no_grad() or "
                           "torch.inference_mode(), or pass detached tensors")


def conv_bn_act(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                groups: int = 1, *, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None,
                relu: bool = True) -> Tensor:
    """relu(conv2d(input, weight, bias, stride, padding, dilation, groups) * scale[c] + shift[c] + residual).

    Inference only. input is best channels_last; the output has its memory format and dtype (autocast's
    dtype under autocast). scale, shift: the BatchNorm folded (bn_scale_shift), fp32.
    """
    dtype = compute_dtype(input)
    x, residual = input.to(dtype), residual.to(dtype) if residual is not None else None
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    _validate(x, weight, scale, shift, residual, stride, padding, dilation, groups)
    weight = weight.to(dtype)
    scale, shift = scale.float(), shift.float()
    if bias is not None:  # conv(x) + bias, then the affine map: the bias folds into the shift
        shift = torch.addcmul(shift, bias.detach().float(), scale)
    if not backend.use_triton(x):
        return conv_bn_act_reference(x, weight, scale, shift, stride, padding, residual, relu, dilation, groups)
    args = (x, weight, residual, stride, padding, dilation, groups)
    path = CONV_BN_ACT.choose(
        problem(*args, relu), x.device, default_path(args, relu), args=args,
        timed=lambda name: lambda: torch.ops.fastresnet.conv_bn_act(x, weight, scale, shift, residual, list(stride),
                                                                    list(padding), list(dilation), groups, relu, name))
    return torch.ops.fastresnet.conv_bn_act(x, weight, scale, shift, residual, list(stride), list(padding),
                                            list(dilation), groups, relu, path)
