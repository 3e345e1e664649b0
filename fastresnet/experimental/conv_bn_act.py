"""conv_bn_act's candidates that have not run on a GPU:

  "triton:<tile>"       the implicit-GEMM kernel with another tile than its default (up to 4 more per shape
                        class, kernels/experimental/tiles.py _tile_candidates)
  "triton_gemm:<tile>"  1x1 stride-1 convs of channels_last fp16/bf16 input on sm_90+
                        (kernels/experimental/conv_gemm.py): a persistent GEMM over x viewed as [N*H*W, C]
                        whose tiles move by TMA into wgmma, the same epilogue (residual included) fused
  "cublaslt_fused"      1x1 stride-1 convs of channels_last input without a residual, a plain GEMM over x
                        viewed as [N*H*W, C]: cuBLASLt with the folded bias (+ ReLU) in its epilogue

Each is called as fastresnet::conv_bn_act's body would call it and checked on its first call of a problem
against the eager reference.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from fastresnet import backend
from fastresnet.experimental.common import checked, tiles_searched
from fastresnet.ops import conv_bn_act as ops
from fastresnet.ops.layout import FLOAT_DTYPES, conv_output_shape, fits_int32, kernels, memory_format_of
from fastresnet.reference import conv_bn_act_reference

TRITON_TILE_PREFIX = "triton:"
TRITON_GEMM_PREFIX = "triton_gemm:"


def _reference(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu):
    return conv_bn_act_reference(x, weight, scale, shift, stride, padding, residual, relu, dilation, groups)


def _pixel_rows(x) -> Optional[Tensor]:
    """x [N, C, H, W] as the matrix [N*H*W, C] without a copy, or None when its layout does not allow one."""
    rows = x.permute(0, 2, 3, 1)
    if not rows.is_contiguous():
        return None
    return rows.view(-1, x.shape[1])


def _is_pointwise(weight, stride, padding, groups) -> bool:
    """1x1, stride 1, unpadded, ungrouped: on channels_last input a GEMM over the pixels."""
    return tuple(weight.shape[2:]) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) and groups == 1


# ---------------------------------------------------------------------------
# cuBLASLt
# ---------------------------------------------------------------------------


def _cublaslt_applies(x, weight, residual, stride, padding, dilation, groups) -> bool:
    """A pointwise conv of a channels_last x without a residual: with one, cuBLASLt would need both
    C = residual and the bias epilogue, which torch does not expose as one call; the other
    implementations do that case in one kernel."""
    return (residual is None and _is_pointwise(weight, stride, padding, groups) and x.dtype in FLOAT_DTYPES
            and _pixel_rows(x) is not None)


def _cublaslt_fused(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu):
    """out[m, co] = relu(sum_c x[m, c] * folded_w[co, c] + bias[co]), m = (n, h, w): one GEMM.

    On CUDA, torch.addmm with a 1-D bias and a contiguous result takes its cuBLASLt path with the bias
    in the GEMM's epilogue, and torch._addmm_activation (the op inductor also emits for addmm + ReLU)
    the bias + ReLU epilogue; where that path does not apply (and on the CPU) they fall back to addmm
    and an in-place ReLU. The [N*H*W, Cout] result is returned as an NCHW-shaped channels_last view.
    """
    n, _, h, w = x.shape
    folded = (weight.float() * scale.view(-1, 1, 1, 1)).to(x.dtype).reshape(weight.shape[0], -1)
    bias = shift.to(x.dtype)
    rows = _pixel_rows(x)
    y = torch._addmm_activation(bias, rows, folded.t()) if relu else torch.addmm(bias, rows, folded.t())
    return y.view(n, h, w, weight.shape[0]).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------
# The TMA GEMM
# ---------------------------------------------------------------------------


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


def _gemm_applies(x, weight, residual, stride, padding, dilation, groups) -> bool:
    """The TMA GEMM applies: a pointwise conv of a channels_last fp16/bf16 x with C and Cout multiples of
    16, a residual (if any) laid out likewise, on a GPU with TMA (sm_90+). Under the interpreter (x on
    the CPU) fp32 runs too, and the GPU check is skipped: the tests."""
    if not backend.triton_available():
        return False
    if x.is_cuda:
        if x.dtype not in (torch.float16, torch.bfloat16) or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif x.dtype not in FLOAT_DTYPES:
        return False
    out_shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    return (_is_pointwise(weight, stride, padding, groups) and weight.shape[0] % 16 == 0
            and fits_int32(x.shape, out_shape) and _tma_matrix(x) and (residual is None or _tma_matrix(residual)))


def _triton_gemm(tile, x, weight, scale, shift, residual, stride, padding, dilation, groups, relu):
    """relu(x_rows @ w^T * scale + shift + residual_rows) as one persistent TMA GEMM; a channels_last output.

    The choice was made per (shape, strides) problem; a later call of that problem whose x or residual is
    no TMA matrix (a view that starts off 16-byte alignment) runs the implicit-GEMM kernel instead: the
    TMA descriptor would refuse the pointer."""
    from fastresnet.kernels.experimental.conv_gemm import _launch_conv1x1_gemm

    if not (_tma_ready(x) and _tma_ready(residual)):
        return ops._conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, "triton")
    out = torch.empty(conv_output_shape(x.shape, weight.shape, stride, padding, dilation), device=x.device,
                      dtype=x.dtype, memory_format=torch.channels_last)
    weight_rows = weight.permute(0, 2, 3, 1).contiguous().view(weight.shape[0], -1)  # [Cout, 1, 1, C] -> [Cout, C]
    residual_rows = None if residual is None else _pixel_rows(residual)
    _launch_conv1x1_gemm(_pixel_rows(x), weight_rows, scale, shift, residual_rows, _pixel_rows(out), relu, tile)
    return out


def _triton_tile(tile, x, weight, scale, shift, residual, stride, padding, dilation, groups, relu):
    out = torch.empty(conv_output_shape(x.shape, weight.shape, stride, padding, dilation), device=x.device,
                      dtype=x.dtype, memory_format=memory_format_of(x))
    packed = weight.permute(0, 2, 3, 1).contiguous()
    return kernels().conv.conv_bn_act_fwd(x, packed, scale, shift, residual, out, stride, padding, dilation, relu,
                                          tile)


@functools.lru_cache(maxsize=None)
def implementation(name: str):
    """The checked implementation a candidate name stands for, as the op's body calls it; "triton:<tile>" and
    "triton_gemm:<tile>" for any tile (kernels.conv._TileConfig names)."""
    if name == "cublaslt_fused":
        run = _cublaslt_fused
    elif name.startswith(TRITON_TILE_PREFIX):
        run = functools.partial(_triton_tile, kernels().conv._TileConfig.from_name(name.removeprefix(TRITON_TILE_PREFIX)))
    elif name.startswith(TRITON_GEMM_PREFIX):
        from fastresnet.kernels.experimental.conv_gemm import GROUP_M

        tile = kernels().conv._TileConfig.from_name(name.removeprefix(TRITON_GEMM_PREFIX), group_m=GROUP_M)
        run = functools.partial(_triton_gemm, tile)
    else:
        raise KeyError(f"conv_bn_act has no experimental implementation {name!r}")
    return checked("conv_bn_act", name, run, _reference)


def _registered(names: list[str]) -> list[str]:
    for name in names:
        ops.EXPERIMENTAL.setdefault(name, implementation(name))
    return names


def triton_tile_names(x, weight, residual, stride, padding, dilation, groups) -> list[str]:
    """"triton:<tile>" for each tile beside the default worth timing on x's GPU (none with
    FASTRESNET_TILES=default)."""
    from fastresnet.kernels.experimental.tiles import _tile_candidates

    if not (tiles_searched() and ops._triton_applies(x, weight, residual, stride, padding, dilation, groups)):
        return []
    out_shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    m, in_c = out_shape[0] * out_shape[2] * out_shape[3], x.shape[1]
    tiles = _tile_candidates(m, weight.shape[0], in_c, kernels().conv._uses_flat_k(in_c), residual is not None,
                             x.element_size(), x.device)
    return _registered([TRITON_TILE_PREFIX + tile.name for tile in tiles[1:]])


def triton_gemm_names(x, weight, residual, stride, padding, dilation, groups) -> list[str]:
    """"triton_gemm:<tile>" for each tile of the TMA GEMM worth timing on x's GPU (at most 4; with
    FASTRESNET_TILES=default the first)."""
    from fastresnet.kernels.experimental.conv_gemm import _gemm_tile_candidates

    if not _gemm_applies(x, weight, residual, stride, padding, dilation, groups):
        return []
    tiles = _gemm_tile_candidates(weight.shape[0], x.shape[1], residual is not None, x.element_size(), x.device)
    return _registered([TRITON_GEMM_PREFIX + tile.name for tile in tiles if tiles_searched() or tile is tiles[0]])


def _on_a_gpu(names_of):
    """The tile lists are a GPU's: on the CPU (Triton's interpreter) none is offered."""
    return lambda x, *args: names_of(x, *args) if x.is_cuda else []


ops.EXPERIMENTAL["cublaslt_fused"] = implementation("cublaslt_fused")
ops.CONV_BN_ACT.add_experimental("cublaslt_fused", _cublaslt_applies)
ops.CONV_BN_ACT.add_experimental(TRITON_TILE_PREFIX, _on_a_gpu(triton_tile_names))
ops.CONV_BN_ACT.add_experimental(TRITON_GEMM_PREFIX, _on_a_gpu(triton_gemm_names))
