"""BatchNorm + residual add + ReLU: Triton kernels and their launch helpers.

Every tensor is NCHW-logical and addressed as rows of channels: row m is the
pixel (n, h, w) with m = n*H*W + h*W + w, and element (m, c) sits at
    n * stride_n + (h*W + w) * stride_hw + c * stride_c.
That needs H and W to share one stride (stride_h == W * stride_w), which holds
for both channels_last (stride_c == 1: each row is contiguous, the fast case)
and contiguous NCHW (stride_hw == 1: correct, but rows are gathered, so slower).
The op layer copies any other layout to channels_last first.

Statistics and all arithmetic are fp32; tensors are loaded in their own dtype
(fp32, fp16, bf16) and outputs are stored in the output's dtype.

The pre-activation every kernel shares is
    z = (x - center[c]) * scale[c] * invstd[c] + shift[c] + residual,  y = act(z)
where `center` and `invstd` are optional. Eval (folded) BatchNorm is
scale=gamma/sqrt(var+eps), shift=beta-mean*scale; training BatchNorm is
center=mean, scale=gamma, invstd=1/sqrt(var+eps), shift=beta.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit
def _row_offsets(rows, HW, stride_n, stride_hw):
    """Memory offset of each row (pixel) m = n*HW + hw."""
    n = rows // HW
    return n * stride_n + (rows - n * HW) * stride_hw


@triton.jit
def _channel_scale(scale_ptr, invstd_ptr, cols, col_mask):
    """scale[c] (times invstd[c] when BatchNorm statistics are given), fp32."""
    scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if invstd_ptr is not None:
        scale *= tl.load(invstd_ptr + cols, mask=col_mask, other=0.0)
    return scale


@triton.jit
def _add_residual(z, res_ptr, rows, cols, mask, HW, r_sn, r_shw, r_sc):
    """z plus the residual's [rows, cols] tile (fp32), or z itself when res_ptr is None."""
    if res_ptr is not None:
        r_offs = _row_offsets(rows, HW, r_sn, r_shw)[:, None] + cols[None, :] * r_sc
        z += tl.load(res_ptr + r_offs, mask=mask, other=0.0).to(tl.float32)
    return z


@triton.jit
def _pre_activation(
    x_ptr, res_ptr, scale_ptr, invstd_ptr, shift_ptr, center_ptr,
    rows, cols, mask, col_mask, HW,
    x_sn, x_shw, x_sc, r_sn, r_shw, r_sc,
):
    """Load a [rows, cols] tile and return (x - center, z) in fp32."""
    x_offs = _row_offsets(rows, HW, x_sn, x_shw)[:, None] + cols[None, :] * x_sc
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    if center_ptr is not None:
        x -= tl.load(center_ptr + cols, mask=col_mask, other=0.0)[None, :]
    scale = _channel_scale(scale_ptr, invstd_ptr, cols, col_mask)
    shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    z = _add_residual(x * scale[None, :] + shift[None, :], res_ptr, rows, cols, mask, HW, r_sn, r_shw, r_sc)
    return x, z


# y = act((x - center) * scale * invstd + shift + residual), one pass, one
# [BLOCK_M, BLOCK_C] tile per program: reads x (and residual) once, writes y once.
@triton.jit
def _affine_act_fwd(
    x_ptr,  # input, any float dtype, strides x_s*
    y_ptr,  # output, x's shape, strides y_s*
    res_ptr,  # residual added before the activation, or None
    scale_ptr,  # [C] per-channel multiplier (fp32)
    invstd_ptr,  # [C] 1/sqrt(var+eps) multiplying scale, or None
    shift_ptr,  # [C] per-channel offset (fp32)
    center_ptr,  # [C] subtracted from x first (the batch mean), or None
    M, C, HW,  # rows (N*H*W), channels, pixels per image (H*W)
    x_sn, x_shw, x_sc,  # x strides: image, pixel, channel
    y_sn, y_shw, y_sc,  # y strides: image, pixel, channel
    r_sn, r_shw, r_sc,  # residual strides: image, pixel, channel
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < M)[:, None] & col_mask[None, :]
    _, z = _pre_activation(
        x_ptr, res_ptr, scale_ptr, invstd_ptr, shift_ptr, center_ptr,
        rows, cols, mask, col_mask, HW, x_sn, x_shw, x_sc, r_sn, r_shw, r_sc,
    )
    if RELU:
        z = tl.maximum(z, 0.0)
    y_offs = _row_offsets(rows, HW, y_sn, y_shw)[:, None] + cols[None, :] * y_sc
    tl.store(y_ptr + y_offs, z.to(y_ptr.dtype.element_ty), mask=mask)


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
    weight_ptr,  # [C] gamma (any float dtype), or None for 1
    bias_ptr,  # [C] beta, or None for 0
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
# dispatch candidate only for small M (fastresnet.ops.bn_act.SINGLE_PASS_MAX_ROWS).
@triton.jit
def _bn_train_fwd_single(
    x_ptr,  # input, any float dtype, strides x_s*; y has the same strides
    y_ptr,  # output, x's shape, dtype and strides
    res_ptr,  # residual added before the activation, or None
    weight_ptr,  # [C] gamma, fp32
    bias_ptr,  # [C] beta, fp32
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


# Backward reduction pass. With g = dy * [z > 0] (the ReLU mask recomputed
# from the inputs) and xc = x - center, each program sums g and g * xc over a
# range of rows: sum(g) is dshift (dbeta), sum(g * xc) is dscale (and, times
# invstd, dgamma). The sums build up in [BLOCK_M, BLOCK_C] registers and are
# reduced across threads once, at the end. Partials go to [P, C] buffers; the
# caller adds them up. With g_ptr the program also stores g itself, which is
# the residual's gradient: the elementwise pass then reads g back instead of
# dy, the residual and the recomputed mask (see affine_act_bwd).
# PIPELINE software-pipelines the row loop like the statistics pass
# (tl.range num_stages=3: the next tiles of dy, x and the residual in flight
# while one is summed). Never run on a GPU yet, so it enters as a dispatch
# candidate ("triton_pipelined"), timed against the plain loop.
@triton.jit
def _affine_act_bwd_reduce(
    dy_ptr,  # upstream gradient, strides dy_s*
    x_ptr,  # input, strides x_s*
    res_ptr,  # residual, or None
    scale_ptr,  # [C] scale (gamma in training BatchNorm)
    invstd_ptr,  # [C] invstd, or None
    shift_ptr,  # [C] shift (beta)
    center_ptr,  # [C] center (the batch mean), or None
    sum_g_part_ptr,  # [P, C] fp32 out: partial sum(g)
    sum_gx_part_ptr,  # [P, C] fp32 out: partial sum(g * (x - center))
    g_ptr,  # out: g = dy through the ReLU mask (the residual's gradient), or None
    M, C, HW,  # rows, channels, pixels per image
    dy_sn, dy_shw, dy_sc,  # dy strides: image, pixel, channel
    x_sn, x_shw, x_sc,  # x strides
    r_sn, r_shw, r_sc,  # residual strides
    g_sn, g_shw, g_sc,  # g strides
    ROWS,  # rows per program, a multiple of BLOCK_M
    RELU: tl.constexpr,
    PIPELINE: tl.constexpr,  # software-pipeline the row loop (a dispatch candidate, see affine_act_bwd)
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
    if PIPELINE:
        for start in tl.range(row_begin, row_end, BLOCK_M, num_stages=3):
            sum_g, sum_gx = _bwd_reduce_tile(
                start, row_end, sum_g, sum_gx, dy_ptr, x_ptr, res_ptr, scale_ptr, invstd_ptr, shift_ptr, center_ptr,
                g_ptr, cols, col_mask, HW, dy_sn, dy_shw, dy_sc, x_sn, x_shw, x_sc, r_sn, r_shw, r_sc,
                g_sn, g_shw, g_sc, RELU, BLOCK_M,
            )
    else:
        for start in range(row_begin, row_end, BLOCK_M):
            sum_g, sum_gx = _bwd_reduce_tile(
                start, row_end, sum_g, sum_gx, dy_ptr, x_ptr, res_ptr, scale_ptr, invstd_ptr, shift_ptr, center_ptr,
                g_ptr, cols, col_mask, HW, dy_sn, dy_shw, dy_sc, x_sn, x_shw, x_sc, r_sn, r_shw, r_sc,
                g_sn, g_shw, g_sc, RELU, BLOCK_M,
            )
    tl.store(sum_g_part_ptr + pid * C + cols, tl.sum(sum_g, axis=0), mask=col_mask)
    tl.store(sum_gx_part_ptr + pid * C + cols, tl.sum(sum_gx, axis=0), mask=col_mask)


@triton.jit
def _bwd_reduce_tile(
    start, row_end, sum_g, sum_gx, dy_ptr, x_ptr, res_ptr, scale_ptr, invstd_ptr, shift_ptr, center_ptr,
    g_ptr, cols, col_mask, HW, dy_sn, dy_shw, dy_sc, x_sn, x_shw, x_sc, r_sn, r_shw, r_sc,
    g_sn, g_shw, g_sc, RELU: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_C] tile of _affine_act_bwd_reduce: g (stored when g_ptr
    is given) added into the running sums (sum_g, sum_gx), which it returns."""
    rows = start + tl.arange(0, BLOCK_M)
    mask = (rows < row_end)[:, None] & col_mask[None, :]
    g, xc = _masked_grad(
        dy_ptr, x_ptr, res_ptr, scale_ptr, invstd_ptr, shift_ptr, center_ptr,
        rows, cols, mask, col_mask, HW,
        dy_sn, dy_shw, dy_sc, x_sn, x_shw, x_sc, r_sn, r_shw, r_sc, RELU,
    )
    if g_ptr is not None:
        g_offs = _row_offsets(rows, HW, g_sn, g_shw)[:, None] + cols[None, :] * g_sc
        tl.store(g_ptr + g_offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    return sum_g + g, sum_gx + g * xc


@triton.jit
def _masked_grad(
    dy_ptr, x_ptr, res_ptr, scale_ptr, invstd_ptr, shift_ptr, center_ptr,
    rows, cols, mask, col_mask, HW,
    dy_sn, dy_shw, dy_sc, x_sn, x_shw, x_sc, r_sn, r_shw, r_sc, RELU: tl.constexpr,
):
    """(g, x - center) for a tile: g = dy through the recomputed ReLU mask."""
    xc, z = _pre_activation(
        x_ptr, res_ptr, scale_ptr, invstd_ptr, shift_ptr, center_ptr,
        rows, cols, mask, col_mask, HW, x_sn, x_shw, x_sc, r_sn, r_shw, r_sc,
    )
    dy_offs = _row_offsets(rows, HW, dy_sn, dy_shw)[:, None] + cols[None, :] * dy_sc
    g = tl.load(dy_ptr + dy_offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        g = tl.where(z > 0.0, g, 0.0)
    return g, xc


# Backward elementwise pass: dresidual = g and
#     dx = s * g + k1[c] + (x - center) * k2[c],   s = scale * invstd.
# For training BatchNorm (BATCH_STATS) the batch mean and variance depend on x:
#     dx = s * (g - sum(g) / M - xhat * sum(g * xhat) / M),  xhat = (x - mean) * invstd,
# so k1 = -s * sum(g) / M and k2 = -s * invstd^2 * sum(g * (x - mean)) / M.
# Otherwise (folded scale/shift) k1 = k2 = 0 and dx = scale * g.
@triton.jit
def _affine_act_bwd_dx(
    dy_ptr,  # upstream gradient, strides dy_s*
    x_ptr,  # input, strides x_s*
    res_ptr,  # residual, or None
    dx_ptr,  # out: gradient of x, strides dx_s*
    dres_ptr,  # out: gradient of the residual, or None, strides dr_s*
    scale_ptr,  # [C] scale (gamma)
    invstd_ptr,  # [C] invstd, or None
    shift_ptr,  # [C] shift (beta)
    center_ptr,  # [C] center (batch mean), or None
    sum_g_ptr,  # [C] fp32 sum(g) over all rows (read only if BATCH_STATS)
    sum_gx_ptr,  # [C] fp32 sum(g * (x - center)) (read only if BATCH_STATS)
    M, C, HW,  # rows, channels, pixels per image
    dy_sn, dy_shw, dy_sc,  # dy strides: image, pixel, channel
    x_sn, x_shw, x_sc,  # x strides
    r_sn, r_shw, r_sc,  # residual strides
    dx_sn, dx_shw, dx_sc,  # dx strides
    dr_sn, dr_shw, dr_sc,  # dresidual strides
    RELU: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < M)[:, None] & col_mask[None, :]
    g, xc = _masked_grad(
        dy_ptr, x_ptr, res_ptr, scale_ptr, invstd_ptr, shift_ptr, center_ptr,
        rows, cols, mask, col_mask, HW,
        dy_sn, dy_shw, dy_sc, x_sn, x_shw, x_sc, r_sn, r_shw, r_sc, RELU,
    )
    s = _channel_scale(scale_ptr, invstd_ptr, cols, col_mask)
    dx = g * s[None, :]
    if BATCH_STATS:
        invstd = tl.load(invstd_ptr + cols, mask=col_mask, other=0.0)
        k1 = -s * tl.load(sum_g_ptr + cols, mask=col_mask, other=0.0) / M
        k2 = -s * invstd * invstd * tl.load(sum_gx_ptr + cols, mask=col_mask, other=0.0) / M
        dx += k1[None, :] + xc * k2[None, :]
    dx_offs = _row_offsets(rows, HW, dx_sn, dx_shw)[:, None] + cols[None, :] * dx_sc
    tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if dres_ptr is not None:
        dr_offs = _row_offsets(rows, HW, dr_sn, dr_shw)[:, None] + cols[None, :] * dr_sc
        tl.store(dres_ptr + dr_offs, g.to(dres_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------


# triton.cdiv and triton.next_power_of_2 cost ~1.5 us each on the host (they go
# through Triton's constexpr-function wrapper); a launch helper calls several,
# and host time is what the small stages wait on. Plain integer versions:
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1



def row_strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    """(image, pixel, channel) strides of an NCHW-logical tensor whose H and W
    share one stride; (0, 0, 0) for an absent tensor."""
    if t is None:
        return (0, 0, 0)
    _, _, h, w = t.shape
    stride_n, stride_c, stride_h, stride_w = t.stride()
    if w == 1:
        stride_hw = stride_h
    elif h == 1 or stride_h == w * stride_w:
        stride_hw = stride_w
    else:
        raise ValueError(f"H and W of a tensor with strides {t.stride()} do not share one stride")
    return (stride_n, stride_hw, stride_c)


def has_row_strides(t: torch.Tensor) -> bool:
    try:
        row_strides(t)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _elementwise_blocks(x: torch.Tensor, wide: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for a one-tile-per-program pass.

    wide: whole rows of up to 256 channels (512 B of bf16) by 4096 / C rows, so
    that in channels_last each tile is one contiguous stretch of memory; the
    default 64-channel tiles read 128 B of each row and leave the rest of the
    row to other programs, which may cost DRAM locality (run 2: the eval pass
    at 53% of copy bandwidth). A dispatch candidate ("triton_wide"), same on
    the interpreter."""
    c_pow2 = _next_power_of_2(x.shape[1])
    if wide:
        block_c = min(c_pow2, 256)
        return max(16, 4096 // block_c), block_c, 4
    if not x.is_cuda:  # the interpreter: few, large programs
        block_c = min(c_pow2, 256)
        return max(16, 16384 // block_c), block_c, 4
    block_c = min(c_pow2, 64)
    return max(16, 4096 // block_c), block_c, 4


def _reduction_plan(x: torch.Tensor, tile_elements: int = 2048) -> tuple[int, int, int, int, int]:
    """(P, ROWS, BLOCK_M, BLOCK_C, num_warps): the rows split into P ranges of
    ROWS rows, so that P * channel blocks programs fill the GPU a few times.
    tile_elements: BLOCK_M * BLOCK_C on a GPU (see the callers)."""
    m = x.shape[0] * x.shape[2] * x.shape[3]
    c_pow2 = _next_power_of_2(x.shape[1])
    if x.is_cuda:
        # 64 channels (128 bytes of bf16, one 16-byte vector per thread per
        # row slice) by tile_elements / 64 rows, 4 warps, 4 programs per SM.
        # ptxas (sm_90a): 72 registers for the statistics at 32x64, 96 for
        # the backward reduction, so 5+ programs fit on an SM.
        block_c = min(c_pow2, 64)
        block_m = max(16, tile_elements // block_c)
        target_programs = 4 * _multiprocessors(x.device.index or 0)
    else:
        block_c = min(c_pow2, 256)
        block_m = max(16, 16384 // block_c)
        target_programs = 1
    channel_blocks = _cdiv(x.shape[1], block_c)
    programs_per_block = max(1, min(_cdiv(m, block_m), target_programs // channel_blocks, 1024))
    rows = _cdiv(_cdiv(m, programs_per_block), block_m) * block_m
    return _cdiv(m, rows), rows, block_m, block_c, 4


# The statistics pass loads one tensor: 4 programs per SM with a 32x64 bf16
# tile keep 16 KB in flight per SM, below the ~25 KB that Little's law asks
# (4.8 TB/s x ~0.7 us / 132 SMs); a 64x64 tile keeps 32 KB. The backward
# reduction loads three tensors per tile (dy, x, residual): 48 KB at 32x64.
_STATS_TILE_ELEMENTS = 4096


def _check_index_range(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.numel() >= 2**31:
            raise ValueError(f"tensor of shape {tuple(t.shape)} has >= 2**31 elements; split the batch")


def affine_act_fwd(x, scale, shift, *, center=None, invstd=None, residual=None, relu=True):
    """y = act((x - center) * scale * invstd + shift + residual), y laid out like x."""
    _check_index_range(x, residual)
    n, c, h, w = x.shape
    y = torch.empty_like(x)
    block_m, block_c, num_warps = _elementwise_blocks(x)
    grid = (_cdiv(n * h * w, block_m), _cdiv(c, block_c))
    _affine_act_fwd[grid](
        x, y, residual, scale, invstd, shift, center,
        n * h * w, c, h * w,
        *row_strides(x), *row_strides(y), *row_strides(residual),
        RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )
    return y


def bn_eval_act_fwd(x, weight, bias, running_mean, running_var, eps, *, residual=None, relu=True, wide=False):
    """act(BatchNorm_eval(x) + residual) in one launch, the scale folded in the
    kernel (no autograd: the op layer calls this only without gradients).
    y = empty_like(x) shares x's strides when x is dense (channels_last or
    contiguous, the usual case); any other x is copied to channels_last first.
    wide: whole-row tiles (_elementwise_blocks)."""
    _check_index_range(x, residual)
    n, c, h, w = x.shape
    y = torch.empty_like(x)
    if y.stride() != x.stride():
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.empty_like(x)
    block_m, block_c, num_warps = _elementwise_blocks(x, wide)
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
    _check_index_range(x, residual)
    n, c, h, w = x.shape
    y = torch.empty_like(x)
    if y.stride() != x.stride():
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.empty_like(x)
    stats = torch.empty((3, c), device=x.device, dtype=torch.float32)
    mean, invstd, var_unbiased = stats.unbind(0)
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


def bn_stats(x, eps):
    """Batch mean, invstd and unbiased variance of each channel, fp32."""
    _check_index_range(x)
    n, c, h, w = x.shape
    m = n * h * w
    parts, rows, block_m, block_c, num_warps = _reduction_plan(x, _STATS_TILE_ELEMENTS)
    mean_part = torch.empty((parts, c), device=x.device, dtype=torch.float32)
    m2_part = torch.empty_like(mean_part)
    _bn_stats_partial[(parts, _cdiv(c, block_c))](
        x, mean_part, m2_part, m, c, h * w, *row_strides(x), rows,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )
    mean = torch.empty(c, device=x.device, dtype=torch.float32)
    invstd = torch.empty_like(mean)
    var_unbiased = torch.empty_like(mean)
    block_p = min(_next_power_of_2(parts), 64 if x.is_cuda else 1024)  # 64x64: no spills
    finalize_block_c = min(_next_power_of_2(c), 64 if x.is_cuda else 1024)
    _bn_stats_finalize[(_cdiv(c, finalize_block_c),)](
        mean_part, m2_part, mean, invstd, var_unbiased, parts, m, c, rows, eps,
        BLOCK_P=block_p, BLOCK_C=finalize_block_c, num_warps=4,
    )
    return mean, invstd, var_unbiased


def affine_act_bwd(dy, x, scale, shift, *, center=None, invstd=None, residual=None, relu=True,
                   param_grads=True, batch_stats=False, pipeline=False):
    """(dx, sum(g), sum(g * (x - center)), dresidual); the sums are None unless
    param_grads or batch_stats, dresidual is None without a residual.
    batch_stats: x's statistics (center, invstd) came from this batch.
    pipeline: software-pipeline the reduction's row loop (a dispatch candidate)."""
    _check_index_range(dy, x, residual)
    n, c, h, w = x.shape
    m = n * h * w
    sum_g = sum_gx = None
    dres = torch.empty_like(residual) if residual is not None else None
    reduce = param_grads or batch_stats
    # g = dy or 0 is exact in dres's dtype when that is dy's dtype or fp32.
    g_from_reduce = reduce and dres is not None and dres.dtype in (dy.dtype, torch.float32)
    if reduce:
        parts, rows, block_m, block_c, num_warps = _reduction_plan(x)
        sum_g_part = torch.empty((parts, c), device=x.device, dtype=torch.float32)
        sum_gx_part = torch.empty_like(sum_g_part)
        g_out = dres if g_from_reduce else None
        _affine_act_bwd_reduce[(parts, _cdiv(c, block_c))](
            dy, x, residual, scale, invstd, shift, center, sum_g_part, sum_gx_part, g_out,
            m, c, h * w, *row_strides(dy), *row_strides(x), *row_strides(residual), *row_strides(g_out), rows,
            RELU=relu, PIPELINE=pipeline, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
        )
        sum_g, sum_gx = sum_g_part.sum(0), sum_gx_part.sum(0)
    dx = torch.empty_like(x)
    block_m, block_c, num_warps = _elementwise_blocks(x)
    if g_from_reduce:
        # The reduction stored g (= dresidual): the elementwise pass reads it
        # instead of dy and the residual, with no mask to recompute, so the
        # backward moves 7 activation-sized tensors instead of 8
        # (bench/NOTES_bn_act.md).
        grad_in, res_in, relu_in, dres_out = dres, None, False, None
    else:
        grad_in, res_in, relu_in, dres_out = dy, residual, relu, dres
    _affine_act_bwd_dx[(_cdiv(m, block_m), _cdiv(c, block_c))](
        grad_in, x, res_in, dx, dres_out, scale, invstd, shift, center, sum_g, sum_gx,
        m, c, h * w,
        *row_strides(grad_in), *row_strides(x), *row_strides(res_in), *row_strides(dx), *row_strides(dres_out),
        RELU=relu_in, BATCH_STATS=batch_stats, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )
    return dx, sum_g, sum_gx, dres
