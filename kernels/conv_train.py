"""Training-time conv: normalise-on-load prologue and a BatchNorm-statistics epilogue.

The maths. The conv is the implicit GEMM of kernels/conv.py (rows m = output
pixels (n, oh, ow), columns = output channels, K ordered (kh, kw, cin)). Two
additions make a BatchNorm training chain cheap:

Prologue (NORM_INPUT). The input x is the *raw* output of the previous conv;
its BatchNorm (batch statistics mean_in, invstd_in, affine weight_in, bias_in)
and ReLU are applied to each A tile as it is loaded:

    a[m, k] = relu((x[m, k] - mean_in[c]) * invstd_in[c] * weight_in[c] + bias_in[c])

so the normalised activation never exists in memory. Taps that fall in the
zero padding must contribute 0 to the conv of the *normalised* input, so they
are masked to 0 after the prologue (relu(bias) of a padded zero would be
wrong); channels past IN_C meet zero weights.

Epilogue (statistics). The raw output tile is stored in the output dtype, and
the values as stored (rounded, so the statistics describe exactly the tensor
that the next op normalises) give each [BLOCK_M, BLOCK_N] tile its per-channel
mean and M2 = sum((y - tile_mean)^2), two passes over registers, fp32. Row
block p writes partial p of [P, OUT_C] buffers. Partials of BLOCK_M rows each
are then merged with Chan et al.'s parallel formula (kernels/bn_stats.py and
kernels/bn_act.py's `_bn_stats_finalize`): no E[y^2] - E[y]^2 over N*H*W, which loses
everything when the mean is large against the spread.
"""

from __future__ import annotations

import triton
import triton.language as tl

import torch

from fastresnet.kernels.conv import _dot_acc, _fp32_mode, _grouped_tile, _tile_config, _tile_pixels


@triton.jit
def _normalise_on_load(a, ok, c, c_ok, mean_in_ptr, invstd_in_ptr, weight_in_ptr, bias_in_ptr, MASK: tl.constexpr):
    """relu(a * scale[c] + shift[c]) in fp32, with scale = weight * invstd and shift = bias - mean * scale
    worked out per channel (BLOCK_K values) so that each element costs one FMA and a max: on Hopper
    this prologue runs on the CUDA cores beside the tensor-core MMA and must stay small.
    MASK: zero where not `ok` (padding taps of a 3x3). A 1x1 conv without padding skips it: its
    masked rows are never stored and its ragged channels meet zero weights."""
    scale = tl.load(invstd_in_ptr + c, mask=c_ok, other=0.0) * tl.load(weight_in_ptr + c, mask=c_ok, other=0.0)
    shift = tl.load(bias_in_ptr + c, mask=c_ok, other=0.0) - tl.load(mean_in_ptr + c, mask=c_ok, other=0.0) * scale
    z = tl.maximum(a.to(tl.float32) * scale[None, :] + shift[None, :], 0.0)
    if MASK:
        z = tl.where(ok, z, 0.0)
    return z


@triton.jit
def _conv_stats_fwd(
    x_ptr,  # input [N, IN_H, IN_W, IN_C] through the four strides below (raw previous conv output if NORM_INPUT)
    w_ptr,  # packed weight [OUT_C, KH, KW, IN_C], contiguous
    mean_in_ptr,  # [IN_C] fp32 batch mean of x (NORM_INPUT only)
    invstd_in_ptr,  # [IN_C] fp32 1/sqrt(var + eps) of x (NORM_INPUT only)
    weight_in_ptr,  # [IN_C] fp32 BatchNorm weight applied to x (NORM_INPUT only)
    bias_in_ptr,  # [IN_C] fp32 BatchNorm bias applied to x (NORM_INPUT only)
    out_ptr,  # raw conv output [N, OUT_H, OUT_W, OUT_C] through its strides, in the output dtype
    mean_part_ptr,  # [P, OUT_C] fp32 out: mean of each row block's outputs (P = cdiv(M, BLOCK_M))
    m2_part_ptr,  # [P, OUT_C] fp32 out: M2 of each row block's outputs
    BATCH, IN_H, IN_W, IN_C, OUT_H, OUT_W, OUT_C,
    stride_xn, stride_xh, stride_xw, stride_xc,  # input strides in elements
    stride_on, stride_oh, stride_ow, stride_oc,  # output strides in elements
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,  # conv stride
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,  # zero padding (of the normalised input) on each side
    KH: tl.constexpr, KW: tl.constexpr,  # filter size
    NORM_INPUT: tl.constexpr,  # apply the previous BatchNorm + ReLU to x while loading
    HAS_PADDING: tl.constexpr,  # PAD_H or PAD_W > 0: padding taps must be zeroed after the prologue
    DOT_IN_FP32: tl.constexpr,  # interpreter only: dot in fp32
    FP32_MODE: tl.constexpr,  # see kernels/conv.py _dot_acc
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # pixel blocks sharing a weight block in L2
):
    M = BATCH * OUT_H * OUT_W
    K_TOTAL = KH * KW * IN_C
    pid_m, pid_n = _grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(OUT_C, BLOCK_N), GROUP_M)

    batch, out_h, out_w, m_ok = _tile_pixels(pid_m, M, OUT_H, OUT_W, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < OUT_C
    offs_k = tl.arange(0, BLOCK_K)

    x_rows = x_ptr + batch * stride_xn
    w_cols = w_ptr + offs_n * K_TOTAL
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One loop over (tap, channel block), as kernels/conv.py does, so the software
    # pipeline also hides latency when IN_C fits in one or two K steps.
    k_blocks = tl.cdiv(IN_C, BLOCK_K)
    for step in range(0, KH * KW * k_blocks):
        tap = step // k_blocks
        c = (step - tap * k_blocks) * BLOCK_K + offs_k
        c_ok = c < IN_C
        in_h = out_h * STRIDE_H - PAD_H + tap // KW
        in_w = out_w * STRIDE_W - PAD_W + tap % KW
        row_ok = m_ok & (in_h >= 0) & (in_h < IN_H) & (in_w >= 0) & (in_w < IN_W)
        a_ok = row_ok[:, None] & c_ok[None, :]
        a_rows = x_rows + in_h * stride_xh + in_w * stride_xw
        a = tl.load(a_rows[:, None] + c[None, :] * stride_xc, mask=a_ok, other=0.0)
        if NORM_INPUT:
            a = _normalise_on_load(
                a, a_ok, c, c_ok, mean_in_ptr, invstd_in_ptr, weight_in_ptr, bias_in_ptr, HAS_PADDING
            ).to(w_ptr.dtype.element_ty)
        b = tl.load(w_cols[None, :] + (tap * IN_C + c)[:, None], mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot_acc(a, b, acc, DOT_IN_FP32, FP32_MODE)

    out_ok = m_ok[:, None] & n_ok[None, :]
    y = acc.to(out_ptr.dtype.element_ty)
    o_rows = batch * stride_on + out_h * stride_oh + out_w * stride_ow
    tl.store(out_ptr + o_rows[:, None] + offs_n[None, :] * stride_oc, y, mask=out_ok)

    # Statistics of the stored values: tile mean, then M2 around it.
    y = tl.where(out_ok, y.to(tl.float32), 0.0)
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    tile_mean = tl.sum(y, axis=0) / count
    deviation = tl.where(out_ok, y - tile_mean[None, :], 0.0)
    tile_m2 = tl.sum(deviation * deviation, axis=0)
    tl.store(mean_part_ptr + pid_m * OUT_C + offs_n, tile_mean, mask=n_ok)
    tl.store(m2_part_ptr + pid_m * OUT_C + offs_n, tile_m2, mask=n_ok)


# ---------------------------------------------------------------------------
# The launch helper
# ---------------------------------------------------------------------------

def conv_stats_fwd(x, packed_weight, out, stride, padding, norm_input=None, tile=None):
    """Raw conv output into `out` and its per-row-block statistics partials.

    x [N, C, H, W] (channels_last is the fast layout), packed_weight
    [Cout, KH, KW, C] contiguous in the compute dtype, out [N, Cout, OH, OW]
    preallocated. norm_input: None, or (mean, invstd, weight, bias) fp32 [C],
    the BatchNorm + ReLU applied to x on load. tile: a _TileConfig (the
    experimental shelf times others), or None for _tile_config's.
    Returns (mean_part, m2_part, rows_per_part): [P, Cout] fp32 partials over
    row blocks of rows_per_part = the tile's BLOCK_M rows (what the merge needs).
    """
    batch, in_c, in_h, in_w = x.shape
    out_c, kh, kw, _ = packed_weight.shape
    _, _, out_h, out_w = out.shape
    m = batch * out_h * out_w
    interpreted = not x.is_cuda
    cfg = tile or _tile_config(m, out_c, in_c, False, x.element_size(), interpreted, x.device)
    parts = triton.cdiv(m, cfg.block_m)
    mean_part = torch.empty((parts, out_c), device=x.device, dtype=torch.float32)
    m2_part = torch.empty_like(mean_part)
    mean_in, invstd_in, weight_in, bias_in = norm_input if norm_input is not None else (None,) * 4
    grid = (parts * triton.cdiv(out_c, cfg.block_n),)
    _conv_stats_fwd[grid](
        x, packed_weight, mean_in, invstd_in, weight_in, bias_in, out, mean_part, m2_part,
        batch, in_h, in_w, in_c, out_h, out_w, out_c,
        x.stride(0), x.stride(2), x.stride(3), x.stride(1),
        out.stride(0), out.stride(2), out.stride(3), out.stride(1),
        STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1], KH=kh, KW=kw,
        NORM_INPUT=norm_input is not None, HAS_PADDING=padding[0] > 0 or padding[1] > 0,
        DOT_IN_FP32=interpreted, FP32_MODE=_fp32_mode(x.dtype, interpreted),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return mean_part, m2_part, cfg.block_m
