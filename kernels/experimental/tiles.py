"""The tiles the experimental shelf times for the Triton convs (kernels/conv.py, kernels/conv_train.py)
beside their default tiles (kernels/conv.py _tile_config), which are the only ones that have run on a
GPU. Pure Python: which tiles fit a problem and a device.
"""

from __future__ import annotations

import torch

from fastresnet.kernels.conv import _pow2_at_least, _tile_config, _TileConfig


# The tiles the measured dispatch times per shape class on a GPU (each is one
# dispatch candidate, "triton:<name>"), written for sm_90 with 2-byte operands:
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). They follow the Hopper configs of
# Triton's matmul tutorial and inductor's mm/conv templates (one or two warp
# groups on 64x128 to 128x256 accumulators, 3-4 stages), minus those that
# ptxas (sm_90a) made spill registers: every tile here compiles without a
# spill and within the H100's 227 KB of shared memory per block
# (tests/compile_conv_for_hopper.py checks it). Dropped for spilling:
# 128x128x64w4 (the accumulator alone is 128 registers a thread), 256x128x64w8
# (72 B), 128x256x64w8 with a residual (768 B; without one it fits, 244
# registers), and for the stem 256x64x32w8 and 128x64x64w4. The stem's default
# tile (_tile_config: 128x64x32w4s4) spills 168 B but stays a candidate: it is
# the Triton tile that beat cuDNN's stem conv on an H200 (1.61 vs 1.78 ms).
_HOPPER_TILES = {
    # the 7x7 stem, C = 3: K = 147 in steps of 32 (or 64, 192 with padding); the
    # per-element (kh, kw, c) decode costs registers, so 8 warps on 128 rows
    "flat_k": [(128, 64, 32, 8, 4), (64, 64, 32, 4, 4), (128, 64, 64, 8, 3), (64, 64, 64, 4, 3)],
    # 64 output channels (layer1): N fits one 64-wide tile, so only M and the warps vary
    "narrow": [(128, 64, 64, 4, 4), (256, 64, 64, 8, 3), (64, 64, 64, 4, 4)],
    # 128 channels and more, no residual
    "wide": [(128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 256, 64, 8, 4)],
    # 128 channels and more with a residual: its tile is live with the accumulator in the epilogue
    "wide_residual": [(128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (64, 256, 64, 8, 4), (128, 128, 64, 8, 3)],
}


def _shape_class(out_c: int, flat_k: bool, residual: bool) -> str:
    if flat_k:
        return "flat_k"
    if out_c <= 64:
        return "narrow"
    return "wide_residual" if residual else "wide"


def _tile_candidates(
    m: int, out_c: int, in_c: int, flat_k: bool, residual: bool, itemsize: int, device
) -> list[_TileConfig]:
    """The tiles worth timing for one GPU problem (at most 5), the default tile first.

    K steps shrink with 4-byte operands (same bytes per stage) and to the
    channel count where it is smaller; a 256-wide N tile is left out below 256
    output channels (half of it would be masked). Before sm_90 the pipelines
    are shallower and a tile that does not fit the device's shared memory is
    left out.
    """
    default = _tile_config(m, out_c, in_c, flat_k, itemsize, False, device)
    return _fitted_tiles(default, _HOPPER_TILES[_shape_class(out_c, flat_k, residual)], out_c, in_c, flat_k,
                         itemsize, device, limit=5)


def _fitted_tiles(default: _TileConfig, listed, out_c: int, in_c: int, flat_k: bool, itemsize: int, device,
                  limit: int) -> list[_TileConfig]:
    """`default` (the tile that runs without measurement), then each listed (BM, BN, BK, warps, stages)
    fitted to the problem and the device, without repeats, at most `limit` in all (for _tile_candidates
    and _stats_tile_candidates alike)."""
    major, _ = torch.cuda.get_device_capability(device)
    shared_limit = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0) or 48 * 1024
    tiles = [default]
    for bm, bn, bk, warps, stages in listed:
        if bn > _pow2_at_least(out_c, 64, 256):
            continue
        bk = bk if itemsize <= 2 else bk // 2
        if not flat_k:
            bk = min(bk, _pow2_at_least(in_c, 16, bk))
        if major < 9:
            stages = min(stages, 3 if major >= 8 else 2)
        tile = _TileConfig(bm, bn, bk, 8, warps, stages)
        if tile not in tiles and tile.shared_bytes(itemsize) <= shared_limit:
            tiles.append(tile)
    return tiles[:limit]


# The tiles the measured dispatch times for _conv_stats_fwd per shape class on
# a GPU (fastresnet.experimental.conv_stats), written for sm_90 with 2-byte operands:
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). The inference conv's list
# (kernels/conv.py _HOPPER_TILES) does not carry over: the prologue (a scale and
# a shift per K column, a mask for the padding taps) and the statistics
# epilogue (the stored tile again in fp32, its mean, the deviations) are live
# beside the accumulator. Every tile here but one compiles for sm_90a without a
# register spill under triton 3.6 and 3.8, for 1x1 and 3x3, stride 1 and 2,
# with and without the prologue, bf16 and fp32 (tests/compile_conv_train_for_hopper.py).
# Left out for spilling with the prologue on a 3x3: 256x64x64w8s3 (8 B),
# 128x64x64w4s3 (16 B) and, for fp32 operands, 128x256x64w8s3 (8 B under 3.6,
# 32 B under 3.8; 255 registers at bf16). The default's own narrow tile,
# 128x64x64w4s4, spills 16 B there too (255 registers, both Tritons): it stays
# a candidate, since it is what runs without measurement and a measurement is
# the judge, and 128x64x64w8s4 (150-163 registers) is its spill-free twin.
_STATS_TILES = {
    # 64 output channels (ResNet layer1): N is one 64-wide tile, so M, K and the warps vary
    "narrow": [(128, 64, 64, 4, 4), (128, 64, 64, 8, 4), (64, 64, 64, 4, 4), (128, 64, 32, 4, 4)],
    # 128 channels and more (the 256-wide tile from 256 channels)
    "wide": [(128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (64, 256, 64, 8, 4), (128, 128, 64, 8, 3)],
}
MAX_STATS_TILES = 4


def _stats_shape_class(out_c: int) -> str:
    return "narrow" if out_c <= 64 else "wide"


def _stats_tile_candidates(m: int, out_c: int, in_c: int, itemsize: int, device) -> list[_TileConfig]:
    """The tiles worth timing for one GPU problem (at most MAX_STATS_TILES), the default first.

    Fitted as _tile_candidates fits (_fitted_tiles): K steps halve for 4-byte operands (the
    same bytes per stage) and shrink to the channel count where it is smaller; a
    256-wide N tile is left out below 256 output channels; before sm_90 the
    pipelines are shallower, and a tile beyond the device's shared memory is left out.
    """
    default = _tile_config(m, out_c, in_c, False, itemsize, False, device)
    return _fitted_tiles(default, _STATS_TILES[_stats_shape_class(out_c)], out_c, in_c, False, itemsize, device,
                         limit=MAX_STATS_TILES)
