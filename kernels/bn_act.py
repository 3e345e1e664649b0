"""BatchNorm + residual add + ReLU: Triton kernels and their launch helpers.

Every tensor is NCHW-logical and addressed as rows of channels: row m is the
pixel (n, h, w) with m = n*H*W + h*W + w, and element (m, c) sits at
    n * stride_n + (h*W + w) * stride_hw + c * stride_c.
That needs H and W to share one stride (stride_h == W * stride_w), which holds
for both channels_last (stride_c == 1: each row is contiguous, the fast case)
and contiguous NCHW (stride_hw == 1: correct, but rows are gathered, so slower).
The op layer copies any other layout to channels_last first.

The batch statistics (the forward's first pass) are kernels/bn_stats.py's.

Statistics and all arithmetic are fp32; tensors are loaded in their own dtype
(fp32, fp16, bf16) and outputs are stored in the output's dtype.

The pre-activation every kernel shares is
    z = (x - center[c]) * scale[c] * invstd[c] + shift[c] + residual,  y = act(z)
where `center` and `invstd` are optional. Eval (folded) BatchNorm is
scale=weight/sqrt(var+eps), shift=bias-mean*scale; training BatchNorm is
center=mean, scale=weight, invstd=1/sqrt(var+eps), shift=bias.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


# torch.relu keeps NaN (NaN in, NaN out), and its backward (threshold_backward of the output) lets the
# gradient through wherever the output is not <= 0, NaN included. tl.maximum(z, 0) alone turns NaN into 0
# (max.f32 returns the number, the interpreter np.fmax) and would hide a diverging run, so every ReLU of
# the kernels goes through these two. max.NaN.f32 is still one instruction: a compare and a select in
# conv_stats' prologue cost the 128x64x64w4s4 tile 108 bytes of spills on sm_90. (relu(-0.0) is +0.0
# here, -0.0 in torch: equal values.)
@triton.jit
def _relu(z):
    """torch.relu(z): 0 where z < 0, z itself elsewhere, NaN kept."""
    return tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _relu_grad(g, z):
    """The gradient g through relu at pre-activation z, as torch's: 0 where z <= 0, g elsewhere (NaN z too)."""
    return tl.where(z <= 0.0, 0.0, g)


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
        z = _relu(z)
    y_offs = _row_offsets(rows, HW, y_sn, y_shw)[:, None] + cols[None, :] * y_sc
    tl.store(y_ptr + y_offs, z.to(y_ptr.dtype.element_ty), mask=mask)


# Backward reduction pass. With g = dy through the ReLU (_relu_grad, the mask
# recomputed from the inputs) and xc = x - center, each program sums g and g * xc over a
# range of rows: sum(g) is dshift (the bias's gradient), sum(g * xc) is dscale
# (and, times invstd, the weight's). The sums build up in [BLOCK_M, BLOCK_C] registers and are
# reduced across threads once, at the end. Partials go to [P, C] buffers; the
# caller adds them up. With g_ptr the program also stores g itself, which is
# the residual's gradient: the elementwise pass then reads g back instead of
# dy, the residual and the recomputed mask (see affine_act_bwd).
@triton.jit
def _affine_act_bwd_reduce(
    dy_ptr,  # upstream gradient, strides dy_s*
    x_ptr,  # input, strides x_s*
    res_ptr,  # residual, or None
    scale_ptr,  # [C] scale (the weight in training BatchNorm)
    invstd_ptr,  # [C] invstd, or None
    shift_ptr,  # [C] shift (the bias)
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
        g = _relu_grad(g, z)
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
    scale_ptr,  # [C] scale (the weight)
    invstd_ptr,  # [C] invstd, or None
    shift_ptr,  # [C] shift (the bias)
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


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _elementwise_blocks(x: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for a one-tile-per-program pass: 64 channels
    (128 B of bf16 per row) by 4096 / 64 rows on a GPU; under the interpreter,
    where each program costs ~1 ms, few large ones."""
    c_pow2 = _next_power_of_2(x.shape[1])
    if not x.is_cuda:
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


def affine_act_fwd(x, scale, shift, *, center=None, invstd=None, residual=None, relu=True):
    """y = act((x - center) * scale * invstd + shift + residual), y laid out like x."""
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


def affine_act_bwd(dy, x, scale, shift, *, center=None, invstd=None, residual=None, relu=True,
                   param_grads=True, batch_stats=False, reduction=None):
    """(dx, sum(g), sum(g * (x - center)), dresidual); the sums are None unless
    param_grads or batch_stats, dresidual is None without a residual.
    batch_stats: x's statistics (center, invstd) came from this batch.
    reduction: the reduction pass's kernel (default _affine_act_bwd_reduce; the
    experimental shelf times variants of its row loop)."""
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
        (reduction or _affine_act_bwd_reduce)[(parts, _cdiv(c, block_c))](
            dy, x, residual, scale, invstd, shift, center, sum_g_part, sum_gx_part, g_out,
            m, c, h * w, *row_strides(dy), *row_strides(x), *row_strides(residual), *row_strides(g_out), rows,
            RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
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
