"""Backward of the training conv (kernels/conv_train.py) without a stored normalised input: not run on a GPU yet.

The forward computed y = conv(a, w) with a = relu(bn(x)) applied on load from
the raw x and the batch statistics (mean, invstd) and affine (weight, bias) of
x's BatchNorm, so the backward must recompute a. cuDNN's backward needs a in
memory (one elementwise pass that writes it) and leaves the BatchNorm + ReLU
backward to two more passes. These kernels remove that traffic.

wgrad (`_conv_wgrad`), an implicit GEMM reducing over the output pixels:

    grad_w[co, (kh, kw, ci)] = sum_m grad_y[m, co] * a[in(m, kh, kw), ci]

with m = (n, oh, ow) over M = N * OH * OW and in(m, kh, kw) the input pixel
(oh * stride - pad + kh, ow * stride - pad + kw). The tile of a is loaded
from the raw x and normalised in registers (`_normalise_on_load`, taps in the
zero padding masked to 0), so a is never written. M is long (ResNet-50's
first stage: 802,816 rows) and grad_w small, so M is split across SPLIT
programs per output tile (split-K); each writes an fp32 partial
[SPLIT, Cout, K] and the partials are summed afterwards in a fixed order
(deterministic, no atomics).

dgrad with the BatchNorm backward in its epilogue (`_conv_dgrad_bn`), for
stride 1:

    grad_a[m, ci] = sum_{kh, kw, co} grad_y[(n, ih + pad - kh, iw + pad - kw), co] * w[co, ci, kh, kw]

rows m = input pixels (n, ih, iw), taps that fall outside grad_y masked to 0;
the weight is packed [Cin, KH, KW, Cout] so each K step reads Cout-contiguous
runs of grad_y and of the weight. The epilogue recomputes the ReLU mask from
the raw x tile, z = (x - mean) * invstd * weight + bias, and gives

    g = grad_a where z > 0 else 0,   stored (the dx pass reads it back),
    partial sums over the row block of g and of g * (x - mean),

which are the two per-channel sums the BatchNorm backward needs
(dbias = sum(g), dweight = invstd * sum(g * (x - mean))). The BatchNorm
backward's reduction pass disappears; its elementwise pass (kernels/bn_act.py
`_affine_act_bwd_dx` with BATCH_STATS) remains. The sums are taken of g as
stored (rounded to its dtype), so they describe exactly the tensor that the
elementwise pass reads. Without a BatchNorm on the input (NORM_INPUT False)
the epilogue stores grad_a, which is then grad_x.

Stride 2 dgrad stays with cuDNN (the ops layer's choice): a strided conv's
transpose is a sum over a stride-dependent subset of taps per output pixel.
"""

from __future__ import annotations

import dataclasses
import torch
import triton
import triton.language as tl

from fastresnet.kernels import bn_act
from fastresnet.kernels.conv import (
    _dot_acc,
    _fp32_mode,
    _grouped_tile,
    _pow2_at_least,
    _tile_config,
    _tile_pixels,
    _TileConfig,
)
from fastresnet.kernels.conv_train import _normalise_on_load


@triton.jit
def _conv_wgrad(
    grad_y_ptr,  # upstream gradient [N, OUT_H, OUT_W, OUT_C] through its strides
    x_ptr,  # the conv's raw input [N, IN_H, IN_W, IN_C] through its strides
    mean_in_ptr,  # [IN_C] fp32 batch mean of x (NORM_INPUT only)
    invstd_in_ptr,  # [IN_C] fp32 1/sqrt(var + eps) of x (NORM_INPUT only)
    weight_in_ptr,  # [IN_C] fp32 BatchNorm weight (NORM_INPUT only)
    bias_in_ptr,  # [IN_C] fp32 BatchNorm bias (NORM_INPUT only)
    part_ptr,  # [SPLIT, OUT_C, KH * KW * IN_C] fp32 out: grad_w partial of each row range
    BATCH, IN_H, IN_W, IN_C, OUT_H, OUT_W, OUT_C,
    ROWS,  # output pixels per split (a multiple of BLOCK_M); split s covers [s * ROWS, (s + 1) * ROWS)
    stride_gn, stride_gh, stride_gw, stride_gc,  # grad_y strides in elements
    stride_xn, stride_xh, stride_xw, stride_xc,  # x strides in elements
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,  # conv stride
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,  # zero padding of the normalised input
    KH: tl.constexpr, KW: tl.constexpr,  # filter size
    NORM_INPUT: tl.constexpr,  # a = relu(bn(x)) recomputed on load; else a = x
    HAS_PADDING: tl.constexpr,  # padding taps must be zeroed after the prologue
    DOT_IN_FP32: tl.constexpr,  # interpreter only: dot in fp32
    FP32_MODE: tl.constexpr,  # see kernels/conv.py _dot_acc
    BLOCK_CO: tl.constexpr,  # output channels per program (rows of the grad_w tile)
    BLOCK_CI: tl.constexpr,  # input channels per program, all of one tap (columns of the tile)
    BLOCK_M: tl.constexpr,  # output pixels per reduction step
):
    M = BATCH * OUT_H * OUT_W
    K_TOTAL = KH * KW * IN_C
    # Programs along axis 0 walk the output channel blocks fastest: neighbours share one a tile in L2.
    co_blocks = tl.cdiv(OUT_C, BLOCK_CO)
    ci_blocks = tl.cdiv(IN_C, BLOCK_CI)
    pid = tl.program_id(0)
    pid_co = pid % co_blocks
    tap = (pid // co_blocks) // ci_blocks
    pid_ci = (pid // co_blocks) % ci_blocks
    split = tl.program_id(1)

    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = offs_co < OUT_C
    ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < IN_C
    kh = tap // KW
    kw = tap % KW

    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    row_end = tl.minimum(split * ROWS + ROWS, M)
    for start in range(split * ROWS, row_end, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < row_end
        out_w = offs_m % OUT_W
        out_h = (offs_m // OUT_W) % OUT_H
        batch = offs_m // (OUT_W * OUT_H)
        g_rows = grad_y_ptr + batch * stride_gn + out_h * stride_gh + out_w * stride_gw
        gy = tl.load(g_rows[:, None] + offs_co[None, :] * stride_gc, mask=m_ok[:, None] & co_ok[None, :], other=0.0)
        in_h = out_h * STRIDE_H - PAD_H + kh
        in_w = out_w * STRIDE_W - PAD_W + kw
        row_ok = m_ok & (in_h >= 0) & (in_h < IN_H) & (in_w >= 0) & (in_w < IN_W)
        a_ok = row_ok[:, None] & ci_ok[None, :]
        a_rows = x_ptr + batch * stride_xn + in_h * stride_xh + in_w * stride_xw
        a = tl.load(a_rows[:, None] + ci[None, :] * stride_xc, mask=a_ok, other=0.0)
        if NORM_INPUT:
            # Rows past M meet zero gradients; only padding taps need the mask.
            a = _normalise_on_load(
                a, a_ok, ci, ci_ok, mean_in_ptr, invstd_in_ptr, weight_in_ptr, bias_in_ptr, HAS_PADDING
            ).to(grad_y_ptr.dtype.element_ty)
        acc = _dot_acc(tl.trans(gy), a, acc, DOT_IN_FP32, FP32_MODE)

    out_ptrs = part_ptr + split * OUT_C * K_TOTAL + offs_co[:, None] * K_TOTAL + (tap * IN_C + ci)[None, :]
    tl.store(out_ptrs, acc, mask=co_ok[:, None] & ci_ok[None, :])


@triton.jit
def _conv_dgrad_bn(
    grad_y_ptr,  # upstream gradient [N, OUT_H, OUT_W, OUT_C] through its strides
    w_ptr,  # weight packed [IN_C, KH, KW, OUT_C], contiguous: input channel ci starts at ci * KH*KW*OUT_C
    x_ptr,  # the conv's raw input [N, IN_H, IN_W, IN_C] through its strides (NORM_INPUT only)
    mean_in_ptr,  # [IN_C] fp32 batch mean of x (NORM_INPUT only)
    invstd_in_ptr,  # [IN_C] fp32 1/sqrt(var + eps) of x (NORM_INPUT only)
    weight_in_ptr,  # [IN_C] fp32 BatchNorm weight (NORM_INPUT only)
    bias_in_ptr,  # [IN_C] fp32 BatchNorm bias (NORM_INPUT only)
    g_ptr,  # out [N, IN_H, IN_W, IN_C] through its strides: g (NORM_INPUT) or grad_x
    sum_g_part_ptr,  # [P, IN_C] fp32 out: sum of g over each row block (NORM_INPUT only)
    sum_gx_part_ptr,  # [P, IN_C] fp32 out: sum of g * (x - mean) over each row block (NORM_INPUT only)
    BATCH, IN_H, IN_W, IN_C, OUT_H, OUT_W, OUT_C,
    stride_gn, stride_gh, stride_gw, stride_gc,  # grad_y strides in elements
    stride_xn, stride_xh, stride_xw, stride_xc,  # x strides in elements
    stride_on, stride_oh, stride_ow, stride_oc,  # g strides in elements
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,  # the forward conv's padding (stride 1)
    KH: tl.constexpr, KW: tl.constexpr,  # filter size
    NORM_INPUT: tl.constexpr,  # BatchNorm + ReLU backward in the epilogue
    DOT_IN_FP32: tl.constexpr,  # interpreter only: dot in fp32
    FP32_MODE: tl.constexpr,  # see kernels/conv.py _dot_acc
    BLOCK_M: tl.constexpr,  # input pixels per program
    BLOCK_N: tl.constexpr,  # input channels per program
    BLOCK_K: tl.constexpr,  # output channels per reduction step
    GROUP_M: tl.constexpr,  # pixel blocks sharing a weight block in L2
):
    M = BATCH * IN_H * IN_W
    K_TOTAL = KH * KW * OUT_C
    pid_m, pid_n = _grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(IN_C, BLOCK_N), GROUP_M)

    batch, in_h, in_w, m_ok = _tile_pixels(pid_m, M, IN_H, IN_W, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < IN_C
    offs_k = tl.arange(0, BLOCK_K)

    g_rows = grad_y_ptr + batch * stride_gn
    w_cols = w_ptr + offs_n * K_TOTAL
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_blocks = tl.cdiv(OUT_C, BLOCK_K)
    for step in range(0, KH * KW * k_blocks):
        tap = step // k_blocks
        co = (step - tap * k_blocks) * BLOCK_K + offs_k
        co_ok = co < OUT_C
        out_h = in_h + PAD_H - tap // KW
        out_w = in_w + PAD_W - tap % KW
        row_ok = m_ok & (out_h >= 0) & (out_h < OUT_H) & (out_w >= 0) & (out_w < OUT_W)
        a_rows = g_rows + out_h * stride_gh + out_w * stride_gw
        a = tl.load(a_rows[:, None] + co[None, :] * stride_gc, mask=row_ok[:, None] & co_ok[None, :], other=0.0)
        b = tl.load(w_cols[None, :] + (tap * OUT_C + co)[:, None], mask=co_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot_acc(a, b, acc, DOT_IN_FP32, FP32_MODE)

    out_ok = m_ok[:, None] & n_ok[None, :]
    if NORM_INPUT:
        x_rows = batch * stride_xn + in_h * stride_xh + in_w * stride_xw
        x = tl.load(x_ptr + x_rows[:, None] + offs_n[None, :] * stride_xc, mask=out_ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_in_ptr + offs_n, mask=n_ok, other=0.0)
        scale = tl.load(invstd_in_ptr + offs_n, mask=n_ok, other=0.0)
        scale *= tl.load(weight_in_ptr + offs_n, mask=n_ok, other=0.0)
        shift = tl.load(bias_in_ptr + offs_n, mask=n_ok, other=0.0) - mean * scale
        z = x * scale[None, :] + shift[None, :]  # as the forward's prologue computed it
        g = tl.where(z > 0.0, acc, 0.0).to(g_ptr.dtype.element_ty)
    else:
        g = acc.to(g_ptr.dtype.element_ty)
    o_rows = batch * stride_on + in_h * stride_oh + in_w * stride_ow
    tl.store(g_ptr + o_rows[:, None] + offs_n[None, :] * stride_oc, g, mask=out_ok)
    if NORM_INPUT:
        g = tl.where(out_ok, g.to(tl.float32), 0.0)
        xc = x - mean[None, :]
        tl.store(sum_g_part_ptr + pid_m * IN_C + offs_n, tl.sum(g, axis=0), mask=n_ok)
        tl.store(sum_gx_part_ptr + pid_m * IN_C + offs_n, tl.sum(g * xc, axis=0), mask=n_ok)


# ---------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------


def _wgrad_tile(m: int, out_c: int, in_c: int, itemsize: int, interpreted: bool, device) -> _TileConfig:
    """The default wgrad tile, as a GEMM tile of grad_w: block_m = BLOCK_CO (its rows),
    block_n = BLOCK_CI (its columns), block_k = BLOCK_M (output pixels per reduction step).

    GPU: 128x128 grad_w tiles (64 wide for 64 channels) with a 64-pixel reduction step for
    16-bit inputs (32 for fp32: the same bytes). Interpreter: the biggest blocks.
    """
    if interpreted:
        return _TileConfig(_pow2_at_least(out_c, 16, 128), _pow2_at_least(in_c, 16, 128), _pow2_at_least(m, 16, 128),
                           1, 4, 1)
    block_co = 64 if out_c <= 64 else 128
    block_ci = 64 if in_c <= 64 else 128
    major, _ = torch.cuda.get_device_capability(device)
    num_stages = 4 if major >= 9 else 3 if major >= 8 else 2
    num_warps = 8 if block_co * block_ci >= 128 * 128 else 4
    return _TileConfig(block_co, block_ci, 64 if itemsize <= 2 else 32, 1, num_warps, num_stages)


def _wgrad_split(m: int, out_c: int, in_c: int, taps: int, tile: _TileConfig, interpreted: bool, device) -> int:
    """Row ranges reduced separately: until the tiles times the split fill the SMs about twice,
    keeping at least 8 reduction steps per program so the partials (an fp32 grad_w per split)
    stay small against the inputs read. None under the interpreter."""
    if interpreted:
        return 1
    tiles = triton.cdiv(out_c, tile.block_m) * triton.cdiv(in_c, tile.block_n) * taps
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, tiles), m // (8 * tile.block_k)))


# The tiles the measured dispatch times per shape (fastresnet.ops.conv_stats), besides
# each launch helper's default, for sm_90 with 2-byte operands (K steps halve for fp32):
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) in each kernel's GEMM terms. Each compiles for
# sm_90a without spills under triton 3.6 and 3.8 (tests/compile_conv_train_for_hopper.py).
# wgrad (rows: output channels, columns: input channels, K: output pixels), by input channels:
# a deeper reduction step on 3 stages, or narrower tiles (more programs, less split-K).
_WGRAD_TILES = {
    "wide": [(128, 128, 128, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)],
    "narrow": [(128, 64, 128, 8, 3), (64, 64, 128, 4, 3), (64, 64, 64, 4, 4)],
}
# dgrad (rows: input pixels, columns: input channels, K: output channels). With the BatchNorm
# epilogue at most 64 columns on 128 rows (see conv_dgrad_bn); 256x64x64w8s3 is left out for
# spilling 16 B with fp32 operands under triton 3.6.
_DGRAD_TILES = {
    "bn_epilogue": [(128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)],
    "plain": [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)],
}
MAX_BWD_TILES = 3


def _offered(default: _TileConfig, table, rows: int, cols: int, itemsize: int, device) -> list[_TileConfig]:
    """default, then the table's tiles that fit the problem (no tile wider than the next power of two
    of its rows or columns) and the device (shallower pipelines before sm_90; shared memory)."""
    major, _ = torch.cuda.get_device_capability(device)
    shared_limit = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0) or 48 * 1024
    tiles = [default]
    for bm, bn, bk, warps, stages in table:
        if bm > _pow2_at_least(rows, 64, 256) or bn > _pow2_at_least(cols, 64, 256):
            continue
        if major < 9:
            stages = min(stages, 3 if major >= 8 else 2)
        tile = _TileConfig(bm, bn, bk if itemsize <= 2 else bk // 2, default.group_m, warps, stages)
        if tile not in tiles and tile.shared_bytes(itemsize) <= shared_limit:
            tiles.append(tile)
    return tiles[:MAX_BWD_TILES]


def _wgrad_tile_candidates(m: int, out_c: int, in_c: int, itemsize: int, device) -> list[_TileConfig]:
    """The wgrad tiles worth timing on a GPU (at most MAX_BWD_TILES), the default first."""
    default = _wgrad_tile(m, out_c, in_c, itemsize, False, device)
    return _offered(default, _WGRAD_TILES["wide" if in_c > 64 else "narrow"], out_c, in_c, itemsize, device)


def _dgrad_tile(m: int, in_c: int, out_c: int, itemsize: int, norm_input: bool, interpreted: bool, device):
    """The default dgrad tile: kernels/conv.py's, at most 64 columns with the BatchNorm epilogue."""
    cfg = _tile_config(m, in_c, out_c, False, itemsize, interpreted, device)
    if norm_input and not interpreted and cfg.block_n > 64:
        # The BatchNorm-backward epilogue (an x tile, the mask, two sums) beside a 128x128 fp32
        # accumulator needs more than 255 registers a thread with triton 3.6's ptxas (104 B spilled,
        # tests/compile_conv_train_for_hopper.py): 64 columns with the same warps need 163.
        cfg = dataclasses.replace(cfg, block_n=64)
    return cfg


def _dgrad_tile_candidates(m: int, in_c: int, out_c: int, itemsize: int, norm_input: bool, device):
    """The dgrad tiles worth timing on a GPU (at most MAX_BWD_TILES), the default first."""
    default = _dgrad_tile(m, in_c, out_c, itemsize, norm_input, False, device)
    table = _DGRAD_TILES["bn_epilogue" if norm_input else "plain"]
    return _offered(default, table, m, in_c, itemsize, device)


def conv_wgrad(grad_y, x, out_c, kernel_size, stride, padding, norm_input=None, interpreted=False, split=None,
               tile=None):
    """grad_w [Cout, KH, KW, Cin] fp32, contiguous, of y = conv2d(a, w) with a = x or relu(bn(x)).

    grad_y [N, Cout, OH, OW] and x [N, Cin, H, W], any layout (channels_last is the fast one);
    norm_input: None, or (mean, invstd, weight, bias) fp32 [Cin], the BatchNorm + ReLU that the
    forward applied to x on load. split: row ranges reduced separately (default: per shape).
    tile: a _TileConfig in GEMM terms (see _wgrad_tile), or None for the default."""
    batch, in_c, in_h, in_w = x.shape
    _, _, out_h, out_w = grad_y.shape
    kh, kw = kernel_size
    m = batch * out_h * out_w
    cfg = tile or _wgrad_tile(m, out_c, in_c, x.element_size(), interpreted, x.device)
    block_co, block_ci, block_m = cfg.block_m, cfg.block_n, cfg.block_k
    split = _wgrad_split(m, out_c, in_c, kh * kw, cfg, interpreted, x.device) if split is None else split
    rows = triton.cdiv(triton.cdiv(m, split), block_m) * block_m
    split = triton.cdiv(m, rows)
    parts = torch.empty((split, out_c, kh, kw, in_c), device=x.device, dtype=torch.float32)
    mean_in, invstd_in, weight_in, bias_in = norm_input if norm_input is not None else (None,) * 4
    grid = (triton.cdiv(out_c, block_co) * triton.cdiv(in_c, block_ci) * kh * kw, split)
    _conv_wgrad[grid](
        grad_y, x, mean_in, invstd_in, weight_in, bias_in, parts,
        batch, in_h, in_w, in_c, out_h, out_w, out_c, rows,
        grad_y.stride(0), grad_y.stride(2), grad_y.stride(3), grad_y.stride(1),
        x.stride(0), x.stride(2), x.stride(3), x.stride(1),
        STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1], KH=kh, KW=kw,
        NORM_INPUT=norm_input is not None, HAS_PADDING=padding[0] > 0 or padding[1] > 0,
        DOT_IN_FP32=interpreted, FP32_MODE=_fp32_mode(x.dtype, interpreted),
        BLOCK_CO=block_co, BLOCK_CI=block_ci, BLOCK_M=block_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return parts[0] if split == 1 else parts.sum(0)


def conv_dgrad_bn(grad_y, weight, x, padding, norm_input=None, interpreted=False, tile=None):
    """Stride-1 dgrad of y = conv2d(a, weight): (g, sum_g_part, sum_gx_part).

    With norm_input = (mean, invstd, weight, bias) of a = relu(bn(x)): g = grad_a through the
    ReLU mask, in x's dtype and layout, and [P, Cin] fp32 partial sums of g and g * (x - mean)
    over row blocks of the tile's BLOCK_M pixels. Without: g = grad_x and no partials (None).
    tile: a _TileConfig (rows: input pixels, columns: input channels), or None for _dgrad_tile's."""
    batch, in_c, in_h, in_w = x.shape
    out_c, _, kh, kw = weight.shape
    _, _, out_h, out_w = grad_y.shape
    if (in_h, in_w) != (out_h + kh - 1 - 2 * padding[0], out_w + kw - 1 - 2 * padding[1]):
        raise ValueError(f"conv_dgrad_bn: stride-1 shapes expected, got x {tuple(x.shape)} and "
                         f"grad_y {tuple(grad_y.shape)} for a {kh}x{kw} kernel with padding {tuple(padding)}")
    packed = weight.permute(1, 2, 3, 0).contiguous()  # [Cin, KH, KW, Cout]
    m = batch * in_h * in_w
    cfg = tile or _dgrad_tile(m, in_c, out_c, x.element_size(), norm_input is not None, interpreted, x.device)
    g = torch.empty_like(x)
    parts = triton.cdiv(m, cfg.block_m)
    sum_g_part = sum_gx_part = None
    if norm_input is not None:
        sum_g_part = torch.empty((parts, in_c), device=x.device, dtype=torch.float32)
        sum_gx_part = torch.empty_like(sum_g_part)
    mean_in, invstd_in, weight_in, bias_in = norm_input if norm_input is not None else (None,) * 4
    grid = (parts * triton.cdiv(in_c, cfg.block_n),)
    _conv_dgrad_bn[grid](
        grad_y, packed, x, mean_in, invstd_in, weight_in, bias_in, g, sum_g_part, sum_gx_part,
        batch, in_h, in_w, in_c, out_h, out_w, out_c,
        grad_y.stride(0), grad_y.stride(2), grad_y.stride(3), grad_y.stride(1),
        x.stride(0), x.stride(2), x.stride(3), x.stride(1),
        g.stride(0), g.stride(2), g.stride(3), g.stride(1),
        PAD_H=padding[0], PAD_W=padding[1], KH=kh, KW=kw, NORM_INPUT=norm_input is not None,
        DOT_IN_FP32=interpreted, FP32_MODE=_fp32_mode(x.dtype, interpreted),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return g, sum_g_part, sum_gx_part


def batch_norm_bwd_from_g(g, x, norm_input, sum_g, sum_gxc):
    """grad_x of a = relu(bn(x)) (batch statistics) from g = grad_a through the ReLU mask and its
    two per-channel sums over all rows: the BatchNorm backward's elementwise pass alone
    (kernels/bn_act.py `_affine_act_bwd_dx`, RELU off: g is already masked)."""
    mean, invstd, weight, bias = norm_input
    n, c, h, w = x.shape
    m = n * h * w
    grad_x = torch.empty_like(x)
    block_m, block_c, num_warps = bn_act._elementwise_blocks(x)
    absent = bn_act.row_strides(None)
    bn_act._affine_act_bwd_dx[(triton.cdiv(m, block_m), triton.cdiv(c, block_c))](
        g, x, None, grad_x, None, weight, invstd, bias, mean, sum_g, sum_gxc,
        m, c, h * w,
        *bn_act.row_strides(g), *bn_act.row_strides(x), *absent, *bn_act.row_strides(grad_x), *absent,
        RELU=False, BATCH_STATS=True, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )
    return grad_x
