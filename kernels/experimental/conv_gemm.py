"""1x1 stride-1 convolution as a persistent TMA GEMM with the fused BatchNorm/residual/ReLU epilogue.

The maths. A 1x1, stride-1, unpadded conv of a channels_last x [N, C, H, W]
(memory order N, H, W, C) with a weight [Cout, C, 1, 1] is one matrix product
over the pixels:

    A = x viewed as [M, C], M = N * H * W (row m is pixel (n, h, w)'s C channels; no copy)
    B = weight viewed as [Cout, C] (row co is filter co)
    y[m, co] = relu(sum_c A[m, c] * B[co, c] * scale[co] + shift[co] + residual[m, co])

and y viewed as [M, Cout] is the channels_last output. About half of
ResNet-50's FLOPs are such convs (conv1 and conv3 of every bottleneck but
the strided ones). Unlike kernels/conv.py's implicit GEMM, nothing here
computes an address per element: every tile moves through Hopper's tensor
memory accelerator (TMA, `cp.async.bulk.tensor`) from a descriptor that
holds the matrix's shape and strides. The copy engine fills shared memory
asynchronously (Triton pipelines `num_stages` K steps deep on mbarriers),
zero-fills rows and columns past the matrix edge (ragged M, Cout and C need
no masks), and the tensor cores (`wgmma`) read the tiles straight from
shared memory. The output tile leaves the same way, clipped at the edges.

Persistent tile loop (as Triton's tutorial 09-persistent-matmul): one
program per SM walks the output tiles tile_id = pid, pid + P, pid + 2P, ...
in grouped order (GROUP_M row blocks share a column block, so those weights
stay in L2). `flatten=True` lets Triton merge the tile loop and the K loop
into one software pipeline, so the next tile's loads are in flight during
this tile's epilogue: that is what hides the latency when C is 64-256 and a
tile has only one to four K steps. The epilogue recomputes its tile's
coordinates from its own counter (epilogue_tile) instead of reusing the
loop's, as the tutorial does, so the flattened pipeline does not keep the
prologue's values live across the K loop.

Epilogue, in fp32 on the accumulator: y = acc * scale + shift (+ the
residual tile, loaded by TMA) (ReLU), cast once to the output dtype.

Requirements (checked by fastresnet.experimental.conv_bn_act before this runs): C and Cout
multiples of 16 (TMA wants 16-byte aligned row strides and a 16-byte
minimum box row), base pointers 16-byte aligned, x / residual / output laid
out as contiguous [M, C] / [M, Cout] matrices (channels_last), fp16 or bf16
on a GPU of compute capability 9.0+. Under Triton's interpreter (CPU tests)
the same kernel runs with fp32 operands too; DOT_IN_FP32 converts tiles to
fp32 before the dot there, since the interpreter's bf16 dot is wrong.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fastresnet.kernels.conv import _dot_acc, _fp32_mode, _pow2_at_least, _TileConfig


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row block, column block) of output tile tile_id in grouped order: GROUP_M consecutive
    tiles walk down the rows of one column block (the weight block stays in L2)."""
    tiles_per_group = GROUP_M * num_pid_n
    first_pid_m = (tile_id // tiles_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % tiles_per_group) % group_rows
    pid_n = (tile_id % tiles_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _conv1x1_gemm_bn_act(
    x_desc,  # TMA descriptor of x as [M, IN_C] (row stride IN_C elements, column stride 1), box [BLOCK_M, BLOCK_K]
    w_desc,  # TMA descriptor of the weight as [OUT_C, IN_C] (row stride IN_C, column stride 1), box [BLOCK_N, BLOCK_K]
    res_desc,  # TMA descriptor of the residual as [M, OUT_C] (row stride OUT_C), box [BLOCK_M, BLOCK_N];
    #            read only when HAS_RESIDUAL (the launcher passes the output's descriptor otherwise)
    out_desc,  # TMA descriptor of the output as [M, OUT_C] (row stride OUT_C), box [BLOCK_M, BLOCK_N]
    scale_ptr,  # [OUT_C] fp32, contiguous: multiplies the accumulator (folded BN: weight / sqrt(var + eps))
    shift_ptr,  # [OUT_C] fp32, contiguous: added after the scale (folded BN: bias - mean * scale)
    M,  # output pixels N * H * W
    OUT_C,  # output channels (GEMM columns)
    IN_C,  # input channels (GEMM reduction length)
    NUM_PROGRAMS,  # programs launched (one per SM): the stride of the persistent tile loop
    HAS_RESIDUAL: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # interpreter only: dot in fp32 (its bf16 dot is wrong)
    FP32_MODE: tl.constexpr,  # see kernels.conv._dot_acc: 0 on a GPU (fp16/bf16 operands)
    BLOCK_M: tl.constexpr,  # output pixels per tile
    BLOCK_N: tl.constexpr,  # output channels per tile
    BLOCK_K: tl.constexpr,  # input channels per K step
    GROUP_M: tl.constexpr,  # row blocks per group of the grouped tile order
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(OUT_C, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_steps = tl.cdiv(IN_C, BLOCK_K)
    start = tl.program_id(0)
    epilogue_tile = start - NUM_PROGRAMS  # advanced once per tile, just before the epilogue uses it

    for tile_id in tl.range(start, num_tiles, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_step in range(k_steps):
            k0 = k_step * BLOCK_K
            a = x_desc.load([row0, k0])  # [BLOCK_M, BLOCK_K], zero past M and IN_C
            b = w_desc.load([col0, k0])  # [BLOCK_N, BLOCK_K], zero past OUT_C and IN_C
            acc = _dot_acc(a, b.T, acc, DOT_IN_FP32, FP32_MODE)

        epilogue_tile += NUM_PROGRAMS
        pid_m, pid_n = _tile_coords(epilogue_tile, num_pid_m, num_pid_n, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        offs_n = col0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < OUT_C
        scale = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)
        shift = tl.load(shift_ptr + offs_n, mask=n_ok, other=0.0)
        y = acc * scale[None, :] + shift[None, :]
        if HAS_RESIDUAL:
            y += res_desc.load([row0, col0]).to(tl.float32)
        if APPLY_RELU:
            y = tl.maximum(y, 0.0)
        out_desc.store([row0, col0], y.to(out_desc.dtype))  # rows past M, columns past OUT_C are clipped


# ---------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------

# The tiles the measured dispatch times for a 1x1 GEMM on sm_90 with 2-byte
# operands, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), at most 4 per class.
# One or two warpgroups (4 or 8 warps) on 64-256 wide accumulators, 3-4 TMA
# stages, as the Hopper configs of Triton's persistent-matmul tutorial; every
# one compiles without a register spill under triton 3.6 and 3.8, within an
# H100 block's 227 KB of shared memory (tests/compile_conv_gemm_for_hopper.py).
_GEMM_TILES = {
    # Cout = 64 (layer1's conv1): one 64-wide column block, only M varies
    "narrow": [(128, 64, 64, 4, 4), (256, 64, 64, 8, 4), (64, 64, 64, 4, 4)],
    # Cout >= 128 without a residual (conv1s, stride-1 downsample)
    "wide": [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)],
    # Cout >= 128 with a residual (conv3s): its tile is live with the accumulator, so no 128x256
    # (255 registers and 136 B spilled under triton 3.6, 272 KB of shared memory)
    "wide_residual": [(128, 128, 64, 8, 4), (64, 256, 64, 8, 4), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)],
}
GROUP_M = 8


def _gemm_shape_class(out_c: int, residual: bool) -> str:
    if out_c <= 64:
        return "narrow"
    return "wide_residual" if residual else "wide"


def _gemm_tile_candidates(out_c: int, in_c: int, residual: bool, itemsize: int, device) -> list[_TileConfig]:
    """The tiles worth timing for one 1x1 GEMM (at most 4): the shape class's list, with
    K steps no deeper than C, N tiles no wider than Cout, and tiles that do not fit the
    device's shared memory per block left out."""
    props = torch.cuda.get_device_properties(device)
    shared_limit = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    tiles = []
    for bm, bn, bk, warps, stages in _GEMM_TILES[_gemm_shape_class(out_c, residual)]:
        if bn > _pow2_at_least(out_c, 64, 256):
            continue
        tile = _TileConfig(bm, bn, min(bk, _pow2_at_least(in_c, 16, bk)), GROUP_M, warps, stages)
        if tile not in tiles and _gemm_shared_bytes(tile, itemsize, residual) <= shared_limit:
            tiles.append(tile)
    return tiles


def _gemm_shared_bytes(tile: _TileConfig, itemsize: int, residual: bool) -> int:
    """The pipelined A and B tiles, the output tile staged for the TMA store, the residual tile's landing
    buffer, and 2 KB for the mbarriers and alignment (Triton 3.6 and 3.8 allocate up to 1.1 KB less on sm_90)."""
    return tile.shared_bytes(itemsize) + (1 + residual) * tile.block_m * tile.block_n * itemsize + 2048


def _interpreter_tile(m: int, out_c: int, in_c: int) -> _TileConfig:
    """Under the interpreter each program instance costs ~1 ms: big tiles, few of them."""
    return _TileConfig(_pow2_at_least(m, 16, 64), _pow2_at_least(out_c, 16, 64), _pow2_at_least(in_c, 16, 32),
                       GROUP_M, 4, 1)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _matrix_descriptor(matrix: torch.Tensor, block_rows: int, block_cols: int) -> TensorDescriptor:
    """A TMA descriptor of a row-major 2-D tensor (shape, strides in elements), read in [block_rows, block_cols]."""
    return TensorDescriptor(matrix, list(matrix.shape), list(matrix.stride()), [block_rows, block_cols])


def _launch_conv1x1_gemm(x_rows, weight_rows, scale, shift, residual_rows, out_rows, relu, tile=None,
                         num_programs=None):
    """out_rows = relu(x_rows @ weight_rows.T * scale + shift + residual_rows), one persistent launch.

    x_rows [M, C] and weight_rows [Cout, C], residual_rows None or [M, Cout],
    out_rows [M, Cout]: row-major matrices (x and the output are channels_last
    activations seen as rows of pixels). scale, shift [Cout] fp32. tile: a
    _TileConfig (one of _gemm_tile_candidates), or None under the interpreter.
    num_programs: the persistent grid, the SM count by default.
    """
    m, in_c = x_rows.shape
    out_c = weight_rows.shape[0]
    interpreted = not x_rows.is_cuda
    cfg = tile or _interpreter_tile(m, out_c, in_c)
    num_tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(out_c, cfg.block_n)
    if num_programs is None:  # one per SM; two under the interpreter, so that tests walk the tile loop
        num_programs = 2 if interpreted else _sm_count(x_rows.device)
    num_programs = max(1, min(num_programs, num_tiles))
    out_desc = _matrix_descriptor(out_rows, cfg.block_m, cfg.block_n)
    res_desc = out_desc if residual_rows is None else _matrix_descriptor(residual_rows, cfg.block_m, cfg.block_n)
    _conv1x1_gemm_bn_act[(num_programs,)](
        _matrix_descriptor(x_rows, cfg.block_m, cfg.block_k),
        _matrix_descriptor(weight_rows, cfg.block_n, cfg.block_k),
        res_desc, out_desc, scale, shift,
        m, out_c, in_c, num_programs,
        HAS_RESIDUAL=residual_rows is not None, APPLY_RELU=relu,
        DOT_IN_FP32=interpreted, FP32_MODE=_fp32_mode(x_rows.dtype, interpreted),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out_rows
