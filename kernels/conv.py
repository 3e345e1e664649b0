"""Implicit-GEMM convolution over NHWC tensors with a fused BatchNorm/ReLU/residual epilogue.

The maths. A convolution of x [N, H, W, C] (channels_last) with a weight of
Cout filters of size KH x KW x C is a matrix product

    out[m, co] = sum_k A[m, k] * B[k, co]

with one row m per output pixel (n, oh, ow), M = N * OH * OW, one column per
output channel, and K = KH * KW * C ordered (kh, kw, c): for a fixed tap
(kh, kw) the K-slice of row m is the C contiguous channels of input pixel
(n, oh * stride - pad + kh * dil, ow * stride - pad + kw * dil), so every load of
an A tile reads whole channel runs. A is never materialised ("implicit" GEMM);
pixels that fall in the padding are masked to zero. B is the weight packed as
[Cout, KH, KW, C] (row co is filter co's K vector, contiguous).

The epilogue applies inference BatchNorm folded to a per-channel affine map,
an optional residual and an optional ReLU, and writes once in the output dtype:

    y = relu(acc * scale[co] + shift[co] + residual[m, co])

Accumulation is fp32. fp16/bf16 operands use the tensor cores natively; fp32
operands use tf32 when ALLOW_TF32 (the launcher follows torch's cuDNN tf32
switch, as F.conv2d does) and full fp32 otherwise. Triton's interpreter
computes bf16 dots wrongly, so under the interpreter DOT_IN_FP32 converts the
tiles to fp32 before the dot. The store rounds to nearest even (`_to_stored`), as
the GPU's conversion and torch's eager ops do.

Two K loops: for C >= 16 one loop over (tap, channel block) steps, each
loading BLOCK_K contiguous channels of one tap (as torch inductor's conv
template does when it does not unroll); for the 7x7 stem with C = 3 a flat
loop over K decodes (kh, kw, c) per element, which keeps the K tiles full
instead of padding 3 channels up to 16.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import triton
import triton.language as tl


@triton.jit
def _dot_acc(a, b, acc, DOT_IN_FP32: tl.constexpr, FP32_MODE: tl.constexpr):
    # FP32_MODE: 0 = operands are fp16/bf16 (native dot), 1 = fp32 operands as tf32, 2 = fp32 operands in ieee fp32.
    if DOT_IN_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if FP32_MODE == 1:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    elif FP32_MODE == 2:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


# Triton's interpreter converts fp32 to bf16 by dropping the low 16 bits (round toward zero; its
# "rtne" mode is ignored for that pair): every bf16 store would shrink by ~2^-9 relative on average,
# a bias that compounds over a network (a converted ResNet-56 drifted 27x further from fp32 than eager
# autocast). Read at import, as triton.jit itself decides whether to interpret.
_INTERPRETED = tl.constexpr(triton.knobs.runtime.interpret)


@triton.jit
def _to_stored(y, dtype: tl.constexpr):
    """fp32 y in the stored dtype, rounded to nearest even: on a GPU the conversion itself (cvt.rn);
    under the interpreter, for bf16, the round-half-to-even of fp32's bits (NaN kept as NaN)."""
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(y != y, y.to(dtype), rounded)
    return y.to(dtype)


@triton.jit
def _grouped_tile(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """This program's (row block, column block) in grouped order (as in Triton's matmul
    tutorial): consecutive programs walk GROUP_M pixel blocks for one channel block, so
    that channel block's weights stay in L2."""
    pid = tl.program_id(0)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _tile_pixels(pid_m, M, H, W, BLOCK_M: tl.constexpr):
    """The BLOCK_M pixels of row block pid_m of an [N, H, W] grid (M = N*H*W) as (image, row, column,
    in range): the rows of an implicit GEMM."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Column, row, image in this order: the image first makes triton 3.6's ptxas spill 8 B in the
    # 128x256 tile (tests/test_hopper_compile.py).
    col = offs_m % W
    row = (offs_m // W) % H
    image = offs_m // (W * H)
    return image, row, col, offs_m < M


@triton.jit
def _conv_bn_act_fwd(
    x_ptr,  # input [N, IN_H, IN_W, IN_C] addressed through the four strides below (any layout)
    w_ptr,  # packed weight [OUT_C, KH, KW, IN_C], contiguous: filter co starts at co * KH*KW*IN_C
    scale_ptr,  # [OUT_C] fp32, multiplies the conv output (folded BN: weight / sqrt(var + eps))
    shift_ptr,  # [OUT_C] fp32, added after the scale (folded BN: bias - mean * scale, or a conv bias)
    res_ptr,  # residual with the output's shape, through its own strides; unused unless HAS_RESIDUAL
    out_ptr,  # output [N, OUT_H, OUT_W, OUT_C] through its strides; its dtype is the stored dtype
    BATCH,
    IN_H,
    IN_W,
    IN_C,
    OUT_H,
    OUT_W,
    OUT_C,
    stride_xn, stride_xh, stride_xw, stride_xc,  # input strides in elements (stride_xc == 1 for channels_last)
    stride_rn, stride_rh, stride_rw, stride_rc,  # residual strides in elements
    stride_on, stride_oh, stride_ow, stride_oc,  # output strides in elements
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,  # conv stride
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,  # zero padding on each side
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,  # dilation between taps
    KH: tl.constexpr, KW: tl.constexpr,  # filter size
    FLAT_K: tl.constexpr,  # True: one flat loop over K = KH*KW*IN_C (small IN_C, the stem)
    HAS_RESIDUAL: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # interpreter only: dot in fp32 (its bf16 dot is wrong)
    FP32_MODE: tl.constexpr,  # see _dot_acc
    BLOCK_M: tl.constexpr,  # output pixels per program
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # reduction slice per step
    GROUP_M: tl.constexpr,  # pixel blocks that share a weight block in L2 (grouped launch order)
):
    M = BATCH * OUT_H * OUT_W
    K_TOTAL = KH * KW * IN_C
    pid_m, pid_n = _grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(OUT_C, BLOCK_N), GROUP_M)

    batch, out_h, out_w, m_ok = _tile_pixels(pid_m, M, OUT_H, OUT_W, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < OUT_C
    offs_k = tl.arange(0, BLOCK_K)

    x_rows = x_ptr + batch * stride_xn  # [BLOCK_M] pointers to each output pixel's image
    w_cols = w_ptr + offs_n * K_TOTAL  # [BLOCK_N] pointers to each filter
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if FLAT_K:
        for k0 in range(0, K_TOTAL, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < K_TOTAL
            c = k % IN_C
            tap = k // IN_C
            in_h = out_h[:, None] * STRIDE_H - PAD_H + (tap // KW)[None, :] * DIL_H
            in_w = out_w[:, None] * STRIDE_W - PAD_W + (tap % KW)[None, :] * DIL_W
            a_ok = m_ok[:, None] & k_ok[None, :] & (in_h >= 0) & (in_h < IN_H) & (in_w >= 0) & (in_w < IN_W)
            a_ptrs = x_rows[:, None] + in_h * stride_xh + in_w * stride_xw + c[None, :] * stride_xc
            a = tl.load(a_ptrs, mask=a_ok, other=0.0)
            b = tl.load(w_cols[None, :] + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _dot_acc(a, b, acc, DOT_IN_FP32, FP32_MODE)
    else:
        # One loop over (tap, channel block) rather than a loop per tap, so the
        # software pipeline (num_stages) also hides latency when IN_C fits in one
        # or two K steps (3x3 convs with 64 channels).
        k_blocks = tl.cdiv(IN_C, BLOCK_K)
        for step in range(0, KH * KW * k_blocks):
            tap = step // k_blocks
            c = (step - tap * k_blocks) * BLOCK_K + offs_k
            c_ok = c < IN_C
            in_h = out_h * STRIDE_H - PAD_H + (tap // KW) * DIL_H
            in_w = out_w * STRIDE_W - PAD_W + (tap % KW) * DIL_W
            row_ok = m_ok & (in_h >= 0) & (in_h < IN_H) & (in_w >= 0) & (in_w < IN_W)
            a_rows = x_rows + in_h * stride_xh + in_w * stride_xw
            a = tl.load(a_rows[:, None] + c[None, :] * stride_xc, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(w_cols[None, :] + (tap * IN_C + c)[:, None], mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _dot_acc(a, b, acc, DOT_IN_FP32, FP32_MODE)

    scale = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)
    shift = tl.load(shift_ptr + offs_n, mask=n_ok, other=0.0)
    y = acc * scale[None, :] + shift[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        r_rows = batch * stride_rn + out_h * stride_rh + out_w * stride_rw
        r = tl.load(res_ptr + r_rows[:, None] + offs_n[None, :] * stride_rc, mask=out_ok, other=0.0)
        y += r.to(tl.float32)
    if APPLY_RELU:
        y = tl.maximum(y, 0.0)
    o_rows = batch * stride_on + out_h * stride_oh + out_w * stride_ow
    out_ptrs = out_ptr + o_rows[:, None] + offs_n[None, :] * stride_oc
    tl.store(out_ptrs, _to_stored(y, out_ptr.dtype.element_ty), mask=out_ok)


# ---------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TileConfig:
    block_m: int  # output pixels per program
    block_n: int  # output channels per program
    block_k: int  # reduction slice per step
    group_m: int  # grouped launch order
    num_warps: int
    num_stages: int  # software pipeline depth (shared-memory buffers per operand)

    @property
    def name(self) -> str:
        """e.g. "128x128x64w8s4": BLOCK_M x BLOCK_N x BLOCK_K, warps, stages (the dispatch names tiles so)."""
        return f"{self.block_m}x{self.block_n}x{self.block_k}w{self.num_warps}s{self.num_stages}"

    @classmethod
    def from_name(cls, name: str, group_m: int = 8) -> "_TileConfig":
        found = re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)", name)
        if found is None:
            raise ValueError(f"conv tile {name!r} is not of the form BMxBNxBKwWARPSsSTAGES, e.g. 128x128x64w8s4")
        bm, bn, bk, warps, stages = map(int, found.groups())
        return cls(bm, bn, bk, group_m, warps, stages)

    def shared_bytes(self, itemsize: int) -> int:
        """Shared memory of the pipelined A and B tiles (what bounds num_stages)."""
        return self.num_stages * (self.block_m + self.block_n) * self.block_k * itemsize


def _pow2_at_least(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(int(n), 1))))


def _tile_config(m: int, out_c: int, in_c: int, flat_k: bool, itemsize: int, interpreted: bool, device) -> _TileConfig:
    """The default tile of a shape class: what runs without measurement (conv_train's too, and the interpreter's).

    On the GPU (tuned for sm_90, sane on sm_80 and older): 128x128 tiles with a
    64-deep K step for bf16/fp16 (32 for fp32, same bytes) keep the tensor cores
    busy; 64-wide N for the 64-channel convs and 64-tall M when the problem is too
    small to fill 132 SMs. Pipeline depth follows the shared memory on hand.
    Under the interpreter each program costs ~1 ms: the biggest blocks the
    shapes allow.
    """
    if interpreted:
        block_k = 32 if flat_k else _pow2_at_least(in_c, 16, 64)
        return _TileConfig(_pow2_at_least(m, 16, 128), _pow2_at_least(out_c, 16, 128), block_k, 8, 4, 1)
    block_n = 64 if out_c <= 64 else 128
    block_m = 128 if m * out_c >= 128 * 128 * 132 else 64
    block_k = (64 if itemsize <= 2 else 32) if not flat_k else 32
    if not flat_k:
        block_k = min(block_k, _pow2_at_least(in_c, 16, block_k))
    major, _ = torch.cuda.get_device_capability(device)
    num_stages = 4 if major >= 9 else 3 if major >= 8 else 2
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return _TileConfig(block_m, block_n, block_k, 8, num_warps, num_stages)


def _uses_flat_k(in_c: int) -> bool:
    """The flat K loop for fewer than 16 input channels (the stem's 3): see the module docstring."""
    return in_c < 16


def _fp32_mode(dtype: torch.dtype, interpreted: bool) -> int:
    if dtype != torch.float32 and not interpreted:
        return 0
    if interpreted:
        return 2
    return 1 if torch.backends.cudnn.allow_tf32 else 2


def conv_bn_act_fwd(x, packed_weight, scale, shift, residual, out, stride, padding, dilation, relu, tile=None):
    """Run the fused conv on NCHW-shaped tensors of any layout (channels_last is the fast one).

    x [N, C, H, W]; packed_weight [Cout, KH, KW, C] contiguous; scale, shift [Cout]
    fp32; residual None or out-shaped; out [N, Cout, OH, OW] preallocated.
    tile: a _TileConfig (the experimental shelf times others), or None for _tile_config's.
    """
    batch, in_c, in_h, in_w = x.shape
    out_c, kh, kw, _ = packed_weight.shape
    _, _, out_h, out_w = out.shape
    m = batch * out_h * out_w
    flat_k = _uses_flat_k(in_c)
    interpreted = not x.is_cuda
    cfg = tile or _tile_config(m, out_c, in_c, flat_k, x.element_size(), interpreted, x.device)
    res = residual if residual is not None else out  # never read: HAS_RESIDUAL is False
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(out_c, cfg.block_n),)
    _conv_bn_act_fwd[grid](
        x, packed_weight, scale, shift, res, out,
        batch, in_h, in_w, in_c, out_h, out_w, out_c,
        x.stride(0), x.stride(2), x.stride(3), x.stride(1),
        res.stride(0), res.stride(2), res.stride(3), res.stride(1),
        out.stride(0), out.stride(2), out.stride(3), out.stride(1),
        STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1], KH=kh, KW=kw, FLAT_K=flat_k,
        HAS_RESIDUAL=residual is not None, APPLY_RELU=relu,
        DOT_IN_FP32=interpreted, FP32_MODE=_fp32_mode(x.dtype, interpreted),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
