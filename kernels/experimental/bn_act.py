"""BatchNorm kernel variants that have not run on a GPU: the one-launch eval pass (and its whole-row
tiles), the one-launch training forward for small activations, and a software-pipelined row loop for
the backward's reduction. Row addressing, strides and the shared helpers are kernels/bn_act.py's; each
is a candidate of fastresnet.experimental.bn_act.
"""

from __future__ import annotations

import triton
import triton.language as tl

import torch

from fastresnet.kernels.bn_act import (
    _add_residual, _bwd_reduce_tile, _cdiv, _elementwise_blocks, _next_power_of_2, _row_offsets, affine_act_bwd,
    row_strides,
)


# Eval BatchNorm folded inside the kernel, for calls without gradients:
#     y = act((x - running_mean[c]) * weight[c] / sqrt(running_var[c] + eps) + bias[c] + residual)
# Each program recomputes the per-channel factor of its BLOCK_C channels (a few
# hundred operations against BLOCK_M * BLOCK_C elements), so the host launches
# one kernel: no separate ops for the folded scale (three launches and ~10 us
# of host time per call, which decided the 7x7 and 14x14 stages on the H200).
# y is allocated like x (torch.empty_like), so it shares x's strides.
@triton.jit
def _bn_eval_act_fwd(
    x_ptr,  # input, any float dtype, strides x_s*; y has the same strides
    y_ptr,  # output, x's shape, dtype and strides
    res_ptr,  # residual added before the activation, or None
    weight_ptr,  # [C] BatchNorm weight (any float dtype), or None for 1
    bias_ptr,  # [C] BatchNorm bias, or None for 0
    mean_ptr,  # [C] running mean
    var_ptr,  # [C] running variance
    eps,
    M, C, HW,  # rows (N*H*W), channels, pixels per image (H*W)
    x_sn, x_shw, x_sc,  # x (and y) strides: image, pixel, channel
    r_sn, r_shw, r_sc,  # residual strides: image, pixel, channel
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < M)[:, None] & col_mask[None, :]
    var = tl.load(var_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
    scale = 1.0 / tl.sqrt(var + eps)
    if weight_ptr is not None:
        scale *= tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    offs = _row_offsets(rows, HW, x_sn, x_shw)[:, None] + cols[None, :] * x_sc
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = (x - mean[None, :]) * scale[None, :]
    if bias_ptr is not None:
        z += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    z = _add_residual(z, res_ptr, rows, cols, mask, HW, r_sn, r_shw, r_sc)
    if RELU:
        z = tl.maximum(z, 0.0)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


# The whole training forward of a channel block in one program, for small
# activations (the 7x7 and 14x14 stages): pass 1 sums the shifted values over
# all M rows exactly as _bn_stats_partial does for its range (pivot = row 0),
# then the program has its channels' mean, invstd and unbiased variance
# (stored: the running statistics and the backward use them); pass 2 reads x
# again, now mostly from L2 (one program reads its channel slice twice in a
# row, and a 7x7 stage's activation is about the H200's 50 MB of L2), and
# writes y = act((x - mean) * weight * invstd + bias + residual). One launch
# instead of three and no partial buffers: host time decides these stages.
# Only C / BLOCK_C programs run, so the row loops are software-pipelined
# (tl.range num_stages=3) over tall tiles to keep loads in flight; at large M
# the split statistics pass wins, and the op layer offers this one as a
# dispatch candidate only for small M (fastresnet.experimental.bn_act.SINGLE_PASS_MAX_ROWS).
@triton.jit
def _bn_train_fwd_single(
    x_ptr,  # input, any float dtype, strides x_s*; y has the same strides
    y_ptr,  # output, x's shape, dtype and strides
    res_ptr,  # residual added before the activation, or None
    weight_ptr,  # [C] BatchNorm weight, fp32
    bias_ptr,  # [C] BatchNorm bias, fp32
    mean_ptr,  # [C] fp32 out: batch mean
    invstd_ptr,  # [C] fp32 out: 1 / sqrt(biased var + eps)
    var_unbiased_ptr,  # [C] fp32 out: M2 / (M - 1)
    eps,
    M, C, HW,  # rows (N*H*W), channels, pixels per image
    x_sn, x_shw, x_sc,  # x (and y) strides: image, pixel, channel
    r_sn, r_shw, r_sc,  # residual strides
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    pivot = tl.load(x_ptr + cols * x_sc, mask=col_mask, other=0.0).to(tl.float32)
    sum_d = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    sum_d2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for start in tl.range(0, M, BLOCK_M, num_stages=3):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        offs = _row_offsets(rows, HW, x_sn, x_shw)[:, None] + cols[None, :] * x_sc
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - pivot[None, :], 0.0)
        sum_d += d
        sum_d2 += d * d
    s1 = tl.sum(sum_d, axis=0)
    m2 = tl.maximum(tl.sum(sum_d2, axis=0) - s1 * s1 / M, 0.0)
    mean = pivot + s1 / M
    invstd = 1.0 / tl.sqrt(m2 / M + eps)
    tl.store(mean_ptr + cols, mean, mask=col_mask)
    tl.store(invstd_ptr + cols, invstd, mask=col_mask)
    tl.store(var_unbiased_ptr + cols, m2 / (M - 1), mask=col_mask)
    scale = tl.load(weight_ptr + cols, mask=col_mask, other=0.0) * invstd
    shift = tl.load(bias_ptr + cols, mask=col_mask, other=0.0)
    for start in tl.range(0, M, BLOCK_M, num_stages=3):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        offs = _row_offsets(rows, HW, x_sn, x_shw)[:, None] + cols[None, :] * x_sc
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = (x - mean[None, :]) * scale[None, :] + shift[None, :]
        z = _add_residual(z, res_ptr, rows, cols, mask, HW, r_sn, r_shw, r_sc)
        if RELU:
            z = tl.maximum(z, 0.0)
        tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)



# The backward reduction of kernels/bn_act.py with its row loop software-pipelined like the statistics
# pass (tl.range num_stages=3: the next tiles of dy, x and the residual in flight while one is summed).
@triton.jit
def _affine_act_bwd_reduce_pipelined(
    dy_ptr, x_ptr, res_ptr, scale_ptr, invstd_ptr, shift_ptr, center_ptr,  # as _affine_act_bwd_reduce's
    sum_g_part_ptr, sum_gx_part_ptr, g_ptr,
    M, C, HW,
    dy_sn, dy_shw, dy_sc, x_sn, x_shw, x_sc, r_sn, r_shw, r_sc, g_sn, g_shw, g_sc,
    ROWS,
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    row_begin = pid * ROWS
    row_end = tl.minimum(row_begin + ROWS, M)
    sum_g = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for start in tl.range(row_begin, row_end, BLOCK_M, num_stages=3):
        sum_g, sum_gx = _bwd_reduce_tile(
            start, row_end, sum_g, sum_gx, dy_ptr, x_ptr, res_ptr, scale_ptr, invstd_ptr, shift_ptr, center_ptr,
            g_ptr, cols, col_mask, HW, dy_sn, dy_shw, dy_sc, x_sn, x_shw, x_sc, r_sn, r_shw, r_sc,
            g_sn, g_shw, g_sc, RELU, BLOCK_M,
        )
    tl.store(sum_g_part_ptr + pid * C + cols, tl.sum(sum_g, axis=0), mask=col_mask)
    tl.store(sum_gx_part_ptr + pid * C + cols, tl.sum(sum_gx, axis=0), mask=col_mask)


# ---------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------


def _wide_blocks(x: torch.Tensor) -> tuple[int, int, int]:
    """Whole rows of up to 256 channels (512 B of bf16) by 4096 / C rows, so that in channels_last each
    tile is one contiguous stretch of memory; the default 64-channel tiles read 128 B of each row and
    leave the rest of the row to other programs, which may cost DRAM locality (run 2: the eval pass at
    53% of copy bandwidth). The same on the interpreter."""
    block_c = min(_next_power_of_2(x.shape[1]), 256)
    return max(16, 4096 // block_c), block_c, 4


def bn_eval_act_fwd(x, weight, bias, running_mean, running_var, eps, *, residual=None, relu=True, wide=False):
    """act(BatchNorm_eval(x) + residual) in one launch, the scale folded in the
    kernel (no autograd: the op layer calls this only without gradients).
    y = empty_like(x) shares x's strides when x is dense (channels_last or
    contiguous, the usual case); any other x is copied to channels_last first.
    wide: whole-row tiles (_elementwise_blocks)."""
    n, c, h, w = x.shape
    y = torch.empty_like(x)
    if y.stride() != x.stride():
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.empty_like(x)
    block_m, block_c, num_warps = _wide_blocks(x) if wide else _elementwise_blocks(x)
    _bn_eval_act_fwd[(_cdiv(n * h * w, block_m), _cdiv(c, block_c))](
        x, y, residual, weight, bias, running_mean, running_var, eps,
        n * h * w, c, h * w, *row_strides(x), *row_strides(residual),
        RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )
    return y


# _bn_train_fwd_single's tile on a GPU: 16 channels (32 bytes of bf16, two
# 16-byte vectors per row) so that a 7x7 stage (C = 2048) runs 128 programs,
# one per SM, by 256 rows, 8 warps: 8 KB per tile, three tiles in flight.
_SINGLE_PASS_TILE = (256, 16, 8)


def bn_train_fwd_single(x, weight, bias, eps, *, residual=None, relu=True):
    """(y, mean, invstd, unbiased var) of the training forward in one launch;
    weight and bias fp32. y shares x's strides (x dense, else copied to
    channels_last first, as in bn_eval_act_fwd)."""
    n, c, h, w = x.shape
    y = torch.empty_like(x)
    if y.stride() != x.stride():
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.empty_like(x)
    mean = torch.empty(c, device=x.device, dtype=torch.float32)
    invstd, var_unbiased = torch.empty_like(mean), torch.empty_like(mean)  # apart: a custom op's outputs
    if x.is_cuda:
        block_m, block_c, num_warps = _SINGLE_PASS_TILE
    else:  # the interpreter: few, large programs
        block_m, block_c, num_warps = 64, min(_next_power_of_2(c), 256), 4
    _bn_train_fwd_single[(_cdiv(c, block_c),)](
        x, y, residual, weight, bias, mean, invstd, var_unbiased, eps,
        n * h * w, c, h * w, *row_strides(x), *row_strides(residual),
        RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )
    return y, mean, invstd, var_unbiased


def affine_act_bwd_pipelined(dy, x, scale, shift, **kwargs):
    """kernels/bn_act.py's affine_act_bwd with the reduction's row loop software-pipelined."""
    return affine_act_bwd(dy, x, scale, shift, reduction=_affine_act_bwd_reduce_pipelined, **kwargs)
