"""BatchNorm batch statistics: per-range partials, their parallel merge, the finalize.

Every producer of statistics leaves one (mean, M2) partial per row range and
channel: `_bn_stats_partial` over an activation (the BatchNorm forward's first
pass), or the conv epilogue of kernels/conv_train.py over its output tile. A
large activation has thousands (ResNet-50's first stage at batch 256: 6,272
row blocks of the conv), which one program per channel block would merge
with the GPU nearly idle, so `finalize_stats` first merges groups of 32 in
parallel (`_bn_stats_merge`) and then finalizes once. Both use Chan et al.'s
numerically safe formula, pivoting on each group's first mean:

    d_p = mean_p - pivot,  n = sum(n_p),
    mean = pivot + sum(n_p d_p) / n,
    M2   = sum(M2_p) + sum(n_p d_p^2) - (sum(n_p d_p))^2 / n.

Strides and rows are kernels/bn_act.py's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastresnet.kernels.bn_act import _cdiv, _next_power_of_2, _reduction_plan, _row_offsets, row_strides


# Per-channel mean and M2 = sum((x - mean)^2) of a contiguous range of n rows,
# numerically safe for a large mean by shifting: every value is first reduced
# by a pivot p (the range's first row, a sample of the same channel, so within
# a few standard deviations of the mean), d = x - p, and the program sums
#     S1 = sum(d),  S2 = sum(d^2),  then  mean = p + S1 / n,  M2 = S2 - S1^2 / n.
# The last subtraction cancels only the (mean - p)^2 part of S2 / n, which is a
# few variances: a few bits of fp32, where sum(x^2) - n mean^2 at mean 1e3,
# std 1 would lose all 24. Per element that is a convert, a subtract, a select
# and two adds (Welford's update needs ~10 operations with a divide, close to
# the H200's fp32 budget of ~14 per bf16 element at full bandwidth). Each of
# the BLOCK_M row slots of the [BLOCK_M, BLOCK_C] tile sums in registers as
# the program walks down its rows; slots are added once at the end. The loop
# is software-pipelined (tl.range num_stages=3: ptxas shows 16-byte cp.async
# into shared memory), so each program has the next two tiles in flight while
# it adds up the current one: only x is read here, and without that a program
# waits a full memory latency per tile.
# Program (p, c-block) writes the partial of rows [p*ROWS, (p+1)*ROWS).
@triton.jit
def _bn_stats_partial(
    x_ptr,  # input, any float dtype, strides x_s*
    mean_part_ptr,  # [P, C] fp32 out: mean of each row range
    m2_part_ptr,  # [P, C] fp32 out: M2 of each row range
    M, C, HW,  # rows (N*H*W), channels, pixels per image
    x_sn, x_shw, x_sc,  # x strides: image, pixel, channel
    ROWS,  # rows per program, a multiple of BLOCK_M
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    row_begin = pid * ROWS
    row_end = tl.minimum(row_begin + ROWS, M)
    pivot_offs = _row_offsets(row_begin, HW, x_sn, x_shw) + cols * x_sc
    pivot = tl.load(x_ptr + pivot_offs, mask=col_mask, other=0.0).to(tl.float32)
    sum_d = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    sum_d2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for start in tl.range(row_begin, row_end, BLOCK_M, num_stages=3):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        offs = _row_offsets(rows, HW, x_sn, x_shw)[:, None] + cols[None, :] * x_sc
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - pivot[None, :], 0.0)
        sum_d += d
        sum_d2 += d * d
    count = (row_end - row_begin).to(tl.float32)
    s1 = tl.sum(sum_d, axis=0)
    range_m2 = tl.maximum(tl.sum(sum_d2, axis=0) - s1 * s1 / count, 0.0)
    tl.store(mean_part_ptr + pid * C + cols, pivot + s1 / count, mask=col_mask)
    tl.store(m2_part_ptr + pid * C + cols, range_m2, mask=col_mask)


@triton.jit
def _bn_stats_merge(
    mean_part_ptr,  # [P, C] fp32: partial means
    m2_part_ptr,  # [P, C] fp32: partial M2
    mean_out_ptr,  # [cdiv(P, GROUP), C] fp32 out: merged means
    m2_out_ptr,  # [cdiv(P, GROUP), C] fp32 out: merged M2
    P, M, C,  # partials, rows, channels
    ROWS,  # rows per input partial (the last one may have fewer)
    GROUP: tl.constexpr,  # input partials per output partial
    BLOCK_C: tl.constexpr,
):
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    parts = group * GROUP + tl.arange(0, GROUP)
    part_mask = parts < P
    mask = part_mask[:, None] & col_mask[None, :]
    offs = parts[:, None] * C + cols[None, :]
    pivot = tl.load(mean_part_ptr + group * GROUP * C + cols, mask=col_mask, other=0.0)
    counts = tl.where(part_mask, tl.minimum(M - parts * ROWS, ROWS), 0).to(tl.float32)
    d = tl.where(mask, tl.load(mean_part_ptr + offs, mask=mask, other=0.0) - pivot[None, :], 0.0)
    nd = counts[:, None] * d
    total = tl.sum(counts, axis=0)
    sum_nd = tl.sum(nd, axis=0)
    m2 = tl.sum(tl.load(m2_part_ptr + offs, mask=mask, other=0.0), axis=0) + tl.sum(nd * d, axis=0)
    m2 -= sum_nd * sum_nd / total
    tl.store(mean_out_ptr + group * C + cols, pivot + sum_nd / total, mask=col_mask)
    tl.store(m2_out_ptr + group * C + cols, tl.maximum(m2, 0.0), mask=col_mask)


# Merge the P partials of _bn_stats_partial into the batch statistics. With
# d_p = mean_p - pivot (pivot = the first partial's mean, so d_p is small),
#     mean = pivot + sum(n_p d_p) / M,
#     M2   = sum(M2_p) + sum(n_p d_p^2) - (sum(n_p d_p))^2 / M,
# then var = M2 / M (normalises the batch) and M2 / (M - 1) (the unbiased
# estimate that goes into running_var, as in torch.nn.BatchNorm2d).
@triton.jit
def _bn_stats_finalize(
    mean_part_ptr,  # [P, C] fp32: partial means
    m2_part_ptr,  # [P, C] fp32: partial M2
    mean_ptr,  # [C] fp32 out: batch mean
    invstd_ptr,  # [C] fp32 out: 1 / sqrt(biased var + eps)
    var_unbiased_ptr,  # [C] fp32 out: M2 / (M - 1)
    P, M, C,  # partials, rows, channels
    ROWS,  # rows per partial (the last one may have fewer)
    eps,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    pivot = tl.load(mean_part_ptr + cols, mask=col_mask, other=0.0)
    sum_nd = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_nd2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        part_mask = parts < P
        mask = part_mask[:, None] & col_mask[None, :]
        offs = parts[:, None] * C + cols[None, :]
        counts = tl.where(part_mask, tl.minimum(M - parts * ROWS, ROWS), 0).to(tl.float32)
        d = tl.load(mean_part_ptr + offs, mask=mask, other=0.0) - pivot[None, :]
        d = tl.where(mask, d, 0.0)
        nd = counts[:, None] * d
        sum_nd += tl.sum(nd, axis=0)
        sum_nd2 += tl.sum(nd * d, axis=0)
        sum_m2 += tl.sum(tl.load(m2_part_ptr + offs, mask=mask, other=0.0), axis=0)
    m2 = tl.maximum(sum_m2 + sum_nd2 - sum_nd * sum_nd / M, 0.0)
    tl.store(mean_ptr + cols, pivot + sum_nd / M, mask=col_mask)
    tl.store(invstd_ptr + cols, 1.0 / tl.sqrt(m2 / M + eps), mask=col_mask)
    tl.store(var_unbiased_ptr + cols, m2 / (M - 1), mask=col_mask)



# ---------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------

# The statistics pass loads one tensor: 4 programs per SM with a 32x64 bf16
# tile keep 16 KB in flight per SM, below the ~25 KB that Little's law asks
# (4.8 TB/s x ~0.7 us / 132 SMs); a 64x64 tile keeps 32 KB. The backward
# reduction loads three tensors per tile (dy, x, residual): 48 KB at 32x64.
_STATS_TILE_ELEMENTS = 4096


def stats_partials(x):
    """(mean_part, m2_part, rows): [P, C] fp32 partials of x over ranges of `rows` rows each."""
    n, c, h, w = x.shape
    parts, rows, block_m, block_c, num_warps = _reduction_plan(x, _STATS_TILE_ELEMENTS)
    mean_part = torch.empty((parts, c), device=x.device, dtype=torch.float32)
    m2_part = torch.empty_like(mean_part)
    _bn_stats_partial[(parts, _cdiv(c, block_c))](
        x, mean_part, m2_part, n * h * w, c, h * w, *row_strides(x), rows,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )
    return mean_part, m2_part, rows


def finalize_stats(mean_part, m2_part, m, rows, eps, max_parts=None):
    """(mean, invstd, unbiased var) per channel, fp32, from [P, C] partials of `rows` rows each over m rows.

    More than max_parts partials (default 256 on a GPU, 4096 under the
    interpreter, where one program is cheapest) are merged 32 at a time first;
    the finalize then runs 64x64 tiles of partials and channels (no register
    spills on sm_90)."""
    if m <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {m} rows")
    on_gpu = mean_part.is_cuda
    c = mean_part.shape[1]
    max_parts = max_parts or (256 if on_gpu else 4096)
    while mean_part.shape[0] > max_parts:
        merged = _cdiv(mean_part.shape[0], 32)
        mean_out = torch.empty((merged, c), device=mean_part.device, dtype=torch.float32)
        m2_out = torch.empty_like(mean_out)
        block_c = min(_next_power_of_2(c), 64)
        _bn_stats_merge[(merged, _cdiv(c, block_c))](
            mean_part, m2_part, mean_out, m2_out, mean_part.shape[0], m, c, rows, GROUP=32, BLOCK_C=block_c,
            num_warps=4,
        )
        mean_part, m2_part, rows = mean_out, m2_out, rows * 32
    parts = mean_part.shape[0]
    mean = torch.empty(c, device=mean_part.device, dtype=torch.float32)
    invstd, var_unbiased = torch.empty_like(mean), torch.empty_like(mean)
    block_p = min(_next_power_of_2(parts), 64 if on_gpu else 4096)
    block_c = min(_next_power_of_2(c), 64 if on_gpu else 1024)
    _bn_stats_finalize[(_cdiv(c, block_c),)](
        mean_part, m2_part, mean, invstd, var_unbiased, parts, m, c, rows, eps,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4,
    )
    return mean, invstd, var_unbiased
