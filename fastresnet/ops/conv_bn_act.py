"""Inference conv + BatchNorm (+ residual) (+ ReLU) as one op, over several implementations.

    conv_bn_act(x, weight, scale, shift, stride, padding, residual=None, relu=True)
        = relu(conv2d(x, weight) * scale[c] + shift[c] + residual)
    conv_bn_act_modules(conv, bn, x, residual=None, relu=True)
        = relu(bn(conv(x)) + residual) in eval mode, from the modules' own tensors

Nothing derived is cached across calls: every call folds the BatchNorm's current statistics
(scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale, four small launches)
and derives the weight forms it needs from the live conv weight (views where the layout allows). So
a converted model can never run on stale weights: not after an optimizer step, a BatchNorm
recalibration (torch.optim.swa_utils.update_bn: BatchNorm's statistics update bumps no version
counter), a `.data` edit (which bypasses version counters by design), a DDP buffer broadcast, nor
under CUDA graphs, whose replays rerun the fold on the live tensors.

On a GPU the op runs whichever implementation is fastest for the problem (fastresnet.ops.tuning,
op "conv_bn_act"; each candidate timed with its own weight form):

  "triton"        the fused implicit-GEMM kernel (kernels/conv.py) with its fixed rule's tile: one
                  kernel, one write. groups == 1 only.
  "triton:<tile>" the same with another tile, e.g. "triton:128x128x64w8s4" (up to 4 more per shape
                  class, kernels.conv._tile_candidates).
  "cudnn_fused"   BN folded into the weight and a bias; cuDNN's torch.cudnn_convolution_relu /
                  cudnn_convolution_add_relu (F.conv2d with a bias where there is no ReLU).
  "cudnn_affine"  F.conv2d (channels_last), then the fused scale/shift/add/ReLU pass of
                  fastresnet.ops.bn_act.affine_act.
  "triton_gemm:<tile>" 1x1 stride-1 convs of channels_last fp16/bf16 input on sm_90+
                  (kernels/conv_gemm.py): a persistent GEMM over x viewed as [N*H*W, C] whose tiles
                  move by TMA into wgmma, the same epilogue (residual included) fused.
  "cublaslt_fused" 1x1 stride-1 convs of channels_last input without a residual, a plain GEMM over
                  x viewed as [N*H*W, C]: cuBLASLt with the folded bias (+ ReLU) in its epilogue.

The fixed rule (nothing timed) is cuDNN's conv with a one-pass epilogue, never slower than eager
PyTorch's conv + BN + ReLU. On the CPU the op runs the eager reference, or the Triton kernel
through the interpreter when TRITON_INTERPRET=1 (tests). Under torch.compile conv_bn_act_modules
is the custom op fastresnet::conv_bn_act_inference (opaque to the compiler: a converted model
compiles as one graph); its body is the eager call's.

Inference only: there is no backward, and a call that would need one raises. Under autocast the
op computes in autocast's dtype, like F.conv2d.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastresnet import backend
from fastresnet.ops import tuning
from fastresnet.ops.bn_act import affine_act
from fastresnet.ops.layout import FLOAT_DTYPES, conv_output_shape, layout_name, memory_format_of, pair
from fastresnet.reference import conv_bn_act_reference

TUNED = tuning.Tuned("conv_bn_act")
TRITON_TILE_PREFIX = "triton:"
TRITON_GEMM_PREFIX = "triton_gemm:"


def bn_scale_shift(running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5,
                   conv_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(scale, shift) in fp32 with bn(y + conv_bias) = y * scale + shift in eval mode (weight/bias None
    mean 1/0), from the statistics as they are now."""
    scale = torch.rsqrt(running_var.detach().float() + eps)
    if weight is not None:
        scale = scale.mul_(weight.detach())
    shift = torch.addcmul(bias.detach().float() if bias is not None else torch.zeros_like(scale),
                          running_mean.detach().float(), scale, value=-1)
    if conv_bias is not None:
        shift = shift.addcmul_(conv_bias.detach().float(), scale)
    return scale, shift


class ConvBN:
    """A conv's weight and its BN's scale/shift for one call, each weight form an implementation wants
    derived on first use (a view of the live weight where the layout allows, else computed)."""

    def __init__(self, weight, scale, shift, stride=1, padding=0, dilation=1, groups=1, dtype=None):
        if weight.dim() != 4:
            raise ValueError(f"conv_bn_act: weight must be [Cout, Cin/groups, KH, KW], got shape {tuple(weight.shape)}")
        for name, t in (("scale", scale), ("shift", shift)):
            if t.shape != (weight.shape[0],):
                raise ValueError(f"conv_bn_act: {name} must have shape ({weight.shape[0]},), got {tuple(t.shape)}")
            if t.device != weight.device:
                raise ValueError(f"conv_bn_act: {name} is on {t.device}, weight on {weight.device}")
        self.dtype = dtype or weight.dtype
        self.raw_weight = weight.detach()
        self.scale, self.shift = scale.detach().float().contiguous(), shift.detach().float().contiguous()
        self.stride, self.padding, self.dilation = pair(stride), pair(padding), pair(dilation)
        self.groups = int(groups)

    @property
    def out_channels(self) -> int:
        return self.raw_weight.shape[0]

    @functools.cached_property
    def weight(self) -> Tensor:
        """The unfolded weight in the compute dtype, channels_last (F.conv2d)."""
        return self.raw_weight.to(self.dtype).contiguous(memory_format=torch.channels_last)

    @functools.cached_property
    def packed_weight(self) -> Tensor:
        """[Cout, KH, KW, Cin] contiguous: the Triton kernel's B matrix, K ordered (kh, kw, cin); a view of a
        channels_last weight."""
        return self.raw_weight.to(self.dtype).permute(0, 2, 3, 1).contiguous()

    @functools.cached_property
    def folded_weight(self) -> Tensor:
        """weight * scale per output channel (in fp32, then cast), channels_last (cuDNN)."""
        folded = self.raw_weight.float() * self.scale.view(-1, 1, 1, 1)
        return folded.to(self.dtype).contiguous(memory_format=torch.channels_last)

    @functools.cached_property
    def folded_matrix(self) -> Tensor:
        """The folded weight of a 1x1 conv as [Cout, Cin] (a view): the GEMM's B^T for cuBLASLt."""
        return self.folded_weight.reshape(self.out_channels, -1)

    @functools.cached_property
    def bias(self) -> Tensor:
        return self.shift.to(self.dtype)

    def output_shape(self, x: Tensor) -> tuple[int, int, int, int]:
        return conv_output_shape(x.shape, self.raw_weight.shape, self.stride, self.padding, self.dilation)

    def fresh(self) -> "ConvBN":
        """The same conv without derived forms: a timed candidate derives its own, as a real call does."""
        return ConvBN(self.raw_weight, self.scale, self.shift, self.stride, self.padding, self.dilation, self.groups,
                      self.dtype)


# ---------------------------------------------------------------------------
# The implementations: f(x, p: ConvBN, residual, relu)
# ---------------------------------------------------------------------------


def _run_reference(x, p: ConvBN, residual, relu):
    return conv_bn_act_reference(x, p.weight, p.scale, p.shift, p.stride, p.padding, residual, relu, p.dilation,
                                 p.groups)


def _triton_supports(x, p: ConvBN) -> bool:
    # The kernel indexes in int32; grouped convs and float64 go to cuDNN (or the reference).
    return x.dtype in FLOAT_DTYPES and p.groups == 1 and x.numel() < 2**31 and math.prod(p.output_shape(x)) < 2**31


def _run_triton(x, p: ConvBN, residual, relu, tile=None):
    from fastresnet.kernels.conv import _launch_conv_bn_act

    out = torch.empty(p.output_shape(x), device=x.device, dtype=x.dtype, memory_format=memory_format_of(x))
    return _launch_conv_bn_act(x, p.packed_weight, p.scale, p.shift, residual, out, p.stride, p.padding,
                               p.dilation, relu, x.device.type == "cpu", tile)


def _run_cudnn_fused(x, p: ConvBN, residual, relu):
    args = (p.stride, p.padding, p.dilation, p.groups)
    if relu and residual is None:
        return torch.cudnn_convolution_relu(x, p.folded_weight, p.bias, *args)
    if relu:
        return torch.cudnn_convolution_add_relu(x, p.folded_weight, residual, 1.0, p.bias, *args)
    y = F.conv2d(x, p.folded_weight, p.bias, *args)
    return y if residual is None else y.add_(residual)


def _run_cudnn_affine(x, p: ConvBN, residual, relu):
    y = F.conv2d(x, p.weight, None, p.stride, p.padding, p.dilation, p.groups)
    return affine_act(y, p.scale, p.shift, residual=residual, relu=relu)


def _pixel_rows(x) -> Optional[Tensor]:
    """x [N, C, H, W] as the matrix [N*H*W, C] without a copy, or None when its layout does not allow one."""
    rows = x.permute(0, 2, 3, 1)
    if not rows.is_contiguous():
        return None
    return rows.view(-1, x.shape[1])


def _is_pointwise(p: ConvBN) -> bool:
    """1x1, stride 1, unpadded, ungrouped: on channels_last input a GEMM over the pixels."""
    return p.raw_weight.shape[2:] == (1, 1) and p.stride == (1, 1) and p.padding == (0, 0) and p.groups == 1


def _cublaslt_supports(x, p: ConvBN, residual) -> bool:
    """A pointwise conv of a channels_last x without a residual: with one, cuBLASLt would need both
    C = residual and the bias epilogue, which torch does not expose as one call; the other
    implementations do that case in one kernel."""
    return residual is None and _is_pointwise(p) and x.dtype in FLOAT_DTYPES and _pixel_rows(x) is not None


def _run_cublaslt_fused(x, p: ConvBN, residual, relu):
    """out[m, co] = relu(sum_c x[m, c] * folded_w[co, c] + bias[co]), m = (n, h, w): one GEMM.

    On CUDA, torch.addmm with a 1-D bias and a contiguous result takes its cuBLASLt path with the bias
    in the GEMM's epilogue, and torch._addmm_activation (the op inductor also emits for addmm + ReLU)
    the bias + ReLU epilogue; where that path does not apply (and on the CPU) they fall back to addmm
    and an in-place ReLU. The [N*H*W, Cout] result is returned as an NCHW-shaped channels_last view.
    """
    n, _, h, w = x.shape
    rows = _pixel_rows(x)
    if relu:
        y = torch._addmm_activation(p.bias, rows, p.folded_matrix.t())
    else:
        y = torch.addmm(p.bias, rows, p.folded_matrix.t())
    return y.view(n, h, w, p.out_channels).permute(0, 3, 1, 2)


def _tma_matrix(t: Optional[Tensor]) -> bool:
    """t's [N*H*W, C] view exists, starts 16-byte aligned and has C a multiple of 16 (TMA's alignment)."""
    return t is not None and _pixel_rows(t) is not None and t.data_ptr() % 16 == 0 and t.shape[1] % 16 == 0


def _tma_ready(t: Optional[Tensor]) -> bool:
    """_tma_matrix on the hot path: absent, or channels_last-dense and 16-byte aligned, checked without
    building a view (~0.3 us, against ~2.5 us for the general test it falls back to)."""
    if t is None:
        return True
    _, c, h, w = t.shape
    if t.stride()[1:] == (1, w * c, c) and t.stride()[0] == h * w * c:
        return t.data_ptr() % 16 == 0 and c % 16 == 0
    return _tma_matrix(t)


def _gemm_supports(x, p: ConvBN, residual) -> bool:
    """The TMA GEMM (kernels/conv_gemm.py) applies: a pointwise conv of a channels_last fp16/bf16 x with C
    and Cout multiples of 16, a residual (if any) laid out likewise, on a GPU with TMA (sm_90+). Under the
    interpreter (x on the CPU) fp32 runs too, and the GPU check is skipped: the tests."""
    if x.is_cuda:
        if x.dtype not in (torch.float16, torch.bfloat16) or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif x.dtype not in FLOAT_DTYPES:
        return False
    fits_int32 = x.numel() < 2**31 and math.prod(p.output_shape(x)) < 2**31
    return (_is_pointwise(p) and p.out_channels % 16 == 0 and fits_int32 and _tma_matrix(x)
            and (residual is None or _tma_matrix(residual)))


def _run_triton_gemm(x, p: ConvBN, residual, relu, tile=None):
    """relu(x_rows @ w^T * scale + shift + residual_rows) as one persistent TMA GEMM; a channels_last output.

    The choice was made per (shape, strides) signature; a later call of that signature whose x or
    residual is no TMA matrix (a view that starts off 16-byte alignment) runs the implicit-GEMM kernel
    instead: the TMA descriptor would refuse the pointer."""
    from fastresnet.kernels.conv_gemm import _launch_conv1x1_gemm

    if not (_tma_ready(x) and _tma_ready(residual)):
        return _run_triton(x, p, residual, relu)
    out = torch.empty(p.output_shape(x), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    weight_rows = p.packed_weight.view(p.out_channels, -1)  # [Cout, 1, 1, C] contiguous -> [Cout, C]
    residual_rows = None if residual is None else _pixel_rows(residual)
    _launch_conv1x1_gemm(_pixel_rows(x), weight_rows, p.scale, p.shift, residual_rows, _pixel_rows(out), relu, tile)
    return out


IMPLEMENTATIONS = {
    "triton": _run_triton,
    "cudnn_fused": _run_cudnn_fused,
    "cudnn_affine": _run_cudnn_affine,
    "cublaslt_fused": _run_cublaslt_fused,
}


@functools.lru_cache(maxsize=None)
def implementation(name: str):
    """The function(x, p, residual, relu) that a candidate name stands for ("triton:<tile>" included)."""
    if name in IMPLEMENTATIONS:
        return IMPLEMENTATIONS[name]
    from fastresnet.kernels.conv import _TileConfig

    if name.startswith(TRITON_TILE_PREFIX):
        return functools.partial(_run_triton, tile=_TileConfig.from_name(name.removeprefix(TRITON_TILE_PREFIX)))
    if name.startswith(TRITON_GEMM_PREFIX):
        from fastresnet.kernels.conv_gemm import GROUP_M

        tile = _TileConfig.from_name(name.removeprefix(TRITON_GEMM_PREFIX), group_m=GROUP_M)
        return functools.partial(_run_triton_gemm, tile=tile)
    raise KeyError(f"conv_bn_act has no implementation {name!r}; it has {sorted(IMPLEMENTATIONS)}, "
                   "triton:<tile> and triton_gemm:<tile>")


def triton_tile_names(x, p: ConvBN, residual) -> list[str]:
    """"triton" (the fixed rule's tile), then "triton:<tile>" for each other tile worth timing on x's GPU."""
    from fastresnet.kernels.conv import _tile_candidates, _uses_flat_k

    m = math.prod(p.output_shape(x)) // p.out_channels
    in_c = x.shape[1]
    tiles = _tile_candidates(m, p.out_channels, in_c, _uses_flat_k(in_c), residual is not None, x.element_size(),
                             x.device)
    return ["triton"] + [TRITON_TILE_PREFIX + tile.name for tile in tiles[1:]]


def triton_gemm_names(x, p: ConvBN, residual) -> list[str]:
    """"triton_gemm:<tile>" for each tile of the TMA GEMM worth timing on x's GPU (at most 4)."""
    from fastresnet.kernels.conv_gemm import _gemm_tile_candidates

    tiles = _gemm_tile_candidates(p.out_channels, x.shape[1], residual is not None, x.element_size(), x.device)
    return [TRITON_GEMM_PREFIX + tile.name for tile in tiles]


def candidates(x, p: ConvBN, residual) -> list[str]:
    """The implementations that can run this problem on x's device."""
    names = ["cudnn_fused", "cudnn_affine"]
    if _triton_supports(x, p) and backend.triton_available():
        names += triton_tile_names(x, p, residual) if x.is_cuda else ["triton"]
        if x.is_cuda and _gemm_supports(x, p, residual):
            names += triton_gemm_names(x, p, residual)
    if _cublaslt_supports(x, p, residual):
        names.append("cublaslt_fused")
    return names


def fixed_choice(residual, relu: bool) -> str:
    """The rule without measurement: never slower than eager conv + BN + ReLU, and always runnable. A conv
    without epilogue beyond the BN is cuDNN's conv with the folded bias (one call); otherwise cuDNN's
    conv and the one-pass epilogue kernel, which replaces eager's two or three passes (cuDNN's own fused
    conv-bias-ReLU is not trusted blindly: it refuses some dtype/layout combinations)."""
    return "cudnn_fused" if residual is None and not relu else "cudnn_affine"


def problem_key(x, p: ConvBN, residual, relu) -> str:
    n, c, h, w = x.shape
    _, _, kh, kw = p.raw_weight.shape
    return (f"conv_bn_act:n{n}c{c}h{h}w{w}:k{p.out_channels}x{kh}x{kw}:s{p.stride[0]}x{p.stride[1]}"
            f":p{p.padding[0]}x{p.padding[1]}:d{p.dilation[0]}x{p.dilation[1]}:g{p.groups}"
            f":{str(x.dtype).removeprefix('torch.')}:{layout_name(x)}:res{int(residual is not None)}:relu{int(relu)}")


def _choose(x, p: ConvBN, residual, relu) -> str:
    # The residual's strides too: which candidates apply (the TMA GEMM's) depends on its layout.
    signature = (x.shape, x.stride(), x.dtype, x.device, p.raw_weight.shape, p.stride, p.padding, p.dilation,
                 p.groups, None if residual is None else residual.stride(), relu)
    return TUNED.memo.get(signature) or TUNED.choose(
        signature, x.device, names=lambda: candidates(x, p, residual), fixed=fixed_choice(residual, relu),
        key=lambda: problem_key(x, p, residual, relu),
        runs=lambda names: {name: (lambda n=name: implementation(n)(x, p.fresh(), residual, relu)) for name in names},
        expected=functools.partial(_run_reference, x, p, residual, relu),
    )


# ---------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------


def _check_inputs(x, p: ConvBN, residual):
    if x.dim() != 4:
        raise ValueError(f"conv_bn_act: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != p.raw_weight.shape[1] * p.groups:
        raise ValueError(f"conv_bn_act: x has {x.shape[1]} channels, weight {tuple(p.raw_weight.shape)} with "
                         f"groups={p.groups} expects {p.raw_weight.shape[1] * p.groups}")
    if x.device != p.raw_weight.device:
        raise ValueError(f"conv_bn_act: x is on {x.device}, weight on {p.raw_weight.device}")
    if residual is not None and tuple(residual.shape) != p.output_shape(x):
        raise ValueError(f"conv_bn_act: residual has shape {tuple(residual.shape)}, output is {p.output_shape(x)}")
    if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)):
        raise RuntimeError("conv_bn_act is inference-only (no backward): call it under torch.no_grad() or "
                           "torch.inference_mode(), or detach the inputs")


def compute_dtype(x: Tensor) -> torch.dtype:
    """x's dtype, or autocast's when autocast is on for x's device (as F.conv2d would compute)."""
    if x.dtype.is_floating_point and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def run(x: Tensor, p: ConvBN, residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """relu(conv(x) * scale + shift + residual) through the implementation chosen for this problem."""
    x = x.to(p.dtype)
    residual = residual.to(p.dtype) if residual is not None else None
    _check_inputs(x, p, residual)
    if not backend.use_triton(x):
        return _run_reference(x, p, residual, relu)
    if x.device.type == "cpu":  # Triton's interpreter (tests): the kernel where it applies
        return (_run_triton if _triton_supports(x, p) else _run_reference)(x, p, residual, relu)
    return implementation(_choose(x, p, residual, relu))(x, p, residual, relu)


def conv_bn_act(x, weight, scale, shift, stride=1, padding=0, residual=None, relu=True, dilation=1,
                groups=1) -> Tensor:
    """relu(conv2d(x, weight, stride, padding, dilation, groups) * scale[c] + shift[c] + residual).

    Inference only. x is best channels_last; the output has x's memory format and dtype (autocast's
    dtype under autocast).
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (weight, scale, shift)):
        raise RuntimeError("conv_bn_act is inference-only (no backward): weight/scale/shift require grad; call it "
                           "under torch.no_grad() or torch.inference_mode(), or pass detached tensors")
    return run(x, ConvBN(weight, scale, shift, stride, padding, dilation, groups, dtype=compute_dtype(x)), residual,
               relu)


def _folded(weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding, dilation,
            groups, dtype) -> ConvBN:
    """The conv with its BatchNorm's statistics as they are now."""
    scale, shift = bn_scale_shift(running_mean, running_var, bn_weight, bn_bias, eps, conv_bias)
    return ConvBN(weight, scale, shift, stride, padding, dilation, groups, dtype=dtype)


@torch.library.custom_op("fastresnet::conv_bn_act_inference", mutates_args=())
def _conv_bn_act_inference(x: Tensor, residual: Optional[Tensor], weight: Tensor, conv_bias: Optional[Tensor],
                           bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], running_mean: Tensor,
                           running_var: Tensor, eps: float, stride: list[int], padding: list[int],
                           dilation: list[int], groups: int, relu: bool) -> Tensor:
    """relu(bn(conv(x)) + residual) in x's dtype and memory format; inference only."""
    p = _folded(weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding, dilation,
                groups, x.dtype)
    # The layout the fake implementation promises: a no-op except where cuDNN picked channels_last for an
    # NCHW input (the folded weight is channels_last).
    return run(x, p, residual, relu).contiguous(memory_format=memory_format_of(x))


@_conv_bn_act_inference.register_fake
def _(x, residual, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding, dilation,
      groups, relu):
    shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


def conv_bn_act_modules(conv: nn.Conv2d, bn: nn.Module, x: Tensor, residual=None, relu=True) -> Tensor:
    """relu(bn(conv(x)) + residual) in eval mode: BatchNorm2d, SyncBatchNorm or FrozenBatchNorm2d, from
    their tensors as they are now. Under torch.compile one custom op; eagerly the same body, called
    directly (an op dispatch costs host time)."""
    dtype = compute_dtype(x)
    x = x.to(dtype)
    residual = residual.to(dtype) if residual is not None else None
    args = (x, residual, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
            float(getattr(bn, "eps", 1e-5)), list(conv.stride), list(conv.padding), list(conv.dilation),
            conv.groups, relu)
    if not backend.use_triton(x):
        scale, shift = bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, args[8], conv.bias)
        return conv_bn_act_reference(x, conv.weight.to(dtype), scale, shift, conv.stride, conv.padding, residual,
                                     relu, conv.dilation, conv.groups)
    if torch.compiler.is_compiling():
        return torch.ops.fastresnet.conv_bn_act_inference(*args)
    return run(x, _folded(*args[2:13], dtype), residual, relu)
