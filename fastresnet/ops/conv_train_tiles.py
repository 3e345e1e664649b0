"""The tile of each training conv kernel, chosen per shape by measurement on the GPU.

conv_stats' Triton kernel (kernels/conv_train.py `_conv_stats_fwd`) and the
Triton wgrad and dgrad of its backward (kernels/conv_train_bwd.py) each had one
tile per shape class (their fixed rules). Each now offers a short list per
problem (the fixed rule's tile first, then tiles that compile for sm_90a without
spills: `_stats_tile_candidates`, `_wgrad_tile_candidates`,
`_dgrad_tile_candidates`); the first GPU call of a problem times them on the
real inputs, keeps the fastest, and caches the choice in fastresnet.ops.dispatch
(memory and disk), as the inference conv does for its "triton:<tile>"
candidates. A candidate is timed as what it costs the op: conv_stats' tile with
the merge of its statistics partials, the dgrad's with the sums of its partials
(a smaller BLOCK_M leaves more of them).

Nothing is forced unmeasured: where nothing can be measured (the CPU and its
Triton interpreter, inside CUDA-graph capture before a choice exists,
FASTRESNET_DISPATCH=fixed or another op's candidate name) the fixed rule's tile
runs, exactly as before. FASTRESNET_DISPATCH="triton:<tile>" names a tile for
every op that offers it (the inference conv's names have the same form).

The statistics stay exact in meaning: the partials are per row block of the
chosen tile's BLOCK_M rows, and conv_stats_fwd returns that row count to the merge.

The backward (fastresnet.ops.conv_train_backward) chooses its path among up to
four by measurement; the Triton wgrad's and dgrad's tiles (at most three each,
kernels/conv_train_bwd.py `_WGRAD_TILES`, `_DGRAD_TILES`) are chosen in a second
measured step inside those paths, on the first call that runs them (while the
path measurement warms up, so the path is then timed with its best tile).
Paths x tiles would be up to 4 x 3 x 3 candidates; this way each choice times at
most four. FASTRESNET_DISPATCH="wgrad:<tile>" or "dgrad:<tile>" names a tile
(with FASTRESNET_CONV_BACKWARD naming a path that runs that kernel).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from fastresnet.ops import dispatch

TILE_PREFIX = "triton:"  # conv_stats' candidates: "triton:128x128x64w8s4", as fastresnet.ops.conv names its tiles
WGRAD_PREFIX = "wgrad:"  # the backward's Triton wgrad tiles (GEMM terms: Cout x Cin x pixels per step)
DGRAD_PREFIX = "dgrad:"  # the backward's Triton dgrad tiles (pixels x Cin x Cout per step)

# problem signature -> measured tile name (no key string on the hot path)
_stats_choices: dict[tuple, str] = {}
_wgrad_choices: dict[tuple, str] = {}
_dgrad_choices: dict[tuple, str] = {}


def _kernels():
    from fastresnet.kernels import bn_stats, conv, conv_train

    return bn_stats, conv, conv_train


def _backward_kernels():
    from fastresnet.kernels import conv_train_bwd

    return conv_train_bwd


def tile_from_name(name: str):
    """The kernels.conv._TileConfig that a candidate name ("triton:<tile>", "wgrad:<tile>", "dgrad:<tile>"
    or "<tile>") stands for."""
    _, conv, _ = _kernels()
    return conv._TileConfig.from_name(name.split(":")[-1])


def stats_problem_key(x: Tensor, packed_weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                      norm_input: bool) -> str:
    """The dispatch key of one conv_stats problem: shape, stride, padding, dtype, prologue, layout."""
    out_c, kh, kw, in_c = packed_weight.shape
    return _tile_key("stats", x, (out_c, in_c, kh, kw), stride, padding, norm_input)


def _tile_key(kind: str, x: Tensor, weight_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
              norm_input: bool) -> str:
    """"conv_<kind>_tile:..." for a problem of x and a [Cout, Cin, KH, KW] weight."""
    out_c, in_c, kh, kw = weight_shape
    layout = "cl" if x.is_contiguous(memory_format=torch.channels_last) else "any"
    return (f"conv_{kind}_tile:{out_c}x{in_c}k{kh}x{kw}s{stride[0]}x{stride[1]}p{padding[0]}x{padding[1]}"
            f":x{'x'.join(map(str, x.shape))}:{str(x.dtype).removeprefix('torch.')}"
            f":norm{int(norm_input)}:{layout}")


def stats_tile_names(x: Tensor, packed_weight: Tensor, out: Tensor) -> list[str]:
    """The candidates for this GPU problem, the fixed rule's tile first."""
    _, _, conv_train = _kernels()
    m = out.shape[0] * out.shape[2] * out.shape[3]
    tiles = conv_train._stats_tile_candidates(m, out.shape[1], x.shape[1], x.element_size(), x.device)
    return [TILE_PREFIX + tile.name for tile in tiles]


def run_conv_stats(x, packed_weight, out, stride, padding, norm_input, eps, tile=None):
    """The Triton conv_stats with `tile` (None: the fixed rule's): out written, (mean, invstd, unbiased var)."""
    bn_stats, _, conv_train = _kernels()
    interpreted = x.device.type == "cpu"
    mean_part, m2_part, rows = conv_train.conv_stats_fwd(
        x, packed_weight, out, stride, padding, norm_input, interpreted, tile
    )
    m = out.shape[0] * out.shape[2] * out.shape[3]
    return bn_stats.finalize_stats(mean_part, m2_part, m, rows, eps)


def _measurable(x: Tensor) -> bool:
    return x.is_cuda


def _choose_tile(prefix: str, cache: dict, signature: tuple, x: Tensor, names: Callable[[], list[str]],
                 key: Callable[[], str], run: Callable[[object], object]) -> Optional[str]:
    """The candidate name to run (prefix + tile), or None for the kernel's fixed rule.

    None where nothing is measured: not on a GPU, FASTRESNET_DISPATCH=fixed or another op's
    candidate, FASTRESNET_TILES=fixed, inside CUDA-graph capture before a choice exists.
    FASTRESNET_DISPATCH=<prefix><tile> runs that tile where this problem offers it. Otherwise
    every candidate is timed once per problem through run(tile) on the real inputs
    (dispatch.measured_choice: memory, disk cache)."""
    if not _measurable(x):
        return None
    mode = dispatch.dispatch_mode()
    if mode.startswith(prefix):
        return mode if mode in names() else None
    if mode != "measure" or not dispatch.tile_search():
        return None
    choice = cache.get(signature)
    if choice is not None:
        return choice
    if x.is_cuda and torch.cuda.is_current_stream_capturing():  # no timing inside a graph capture
        entry = dispatch.decision(key())  # but a choice this process made for the key is good
        return entry["choice"] if entry is not None and entry["choice"] in names() else None
    runs = {name: (lambda t=tile_from_name(name): run(t)) for name in names()}
    choice = dispatch.measured_choice(key(), runs, x.device)
    cache[signature] = choice
    return choice


def choose_stats_tile(x: Tensor, packed_weight: Tensor, out: Tensor, stride: Sequence[int],
                      padding: Sequence[int], norm_input, eps: float) -> Optional[str]:
    """conv_stats' tile ("triton:<tile>"), or None for the fixed rule. Each timed candidate writes
    `out`, which the real run then overwrites."""
    signature = (tuple(x.shape), x.stride(), x.dtype, tuple(packed_weight.shape), out.stride(), tuple(stride),
                 tuple(padding), norm_input is not None)
    return _choose_tile(
        TILE_PREFIX, _stats_choices, signature, x,
        names=lambda: stats_tile_names(x, packed_weight, out),
        key=lambda: stats_problem_key(x, packed_weight, stride, padding, norm_input is not None),
        run=lambda tile: run_conv_stats(x, packed_weight, out, stride, padding, norm_input, eps, tile),
    )


# ---------------------------------------------------------------------------
# The backward's Triton wgrad and dgrad (kernels/conv_train_bwd.py)
# ---------------------------------------------------------------------------


def _backward_key(kind: str, x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                  norm_input: bool) -> str:
    return _tile_key(kind, x, weight.shape, stride, padding, norm_input)


def wgrad_tile_names(grad_y: Tensor, x: Tensor, out_c: int) -> list[str]:
    conv_train_bwd = _backward_kernels()
    m = grad_y.shape[0] * grad_y.shape[2] * grad_y.shape[3]
    tiles = conv_train_bwd._wgrad_tile_candidates(m, out_c, x.shape[1], x.element_size(), x.device)
    return [WGRAD_PREFIX + tile.name for tile in tiles]


def dgrad_tile_names(x: Tensor, weight: Tensor, norm_input: bool) -> list[str]:
    conv_train_bwd = _backward_kernels()
    m = x.shape[0] * x.shape[2] * x.shape[3]
    tiles = conv_train_bwd._dgrad_tile_candidates(m, x.shape[1], weight.shape[0], x.element_size(), norm_input,
                                                  x.device)
    return [DGRAD_PREFIX + tile.name for tile in tiles]


def choose_wgrad_tile(grad_y: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                      norm_input) -> Optional[str]:
    """The Triton wgrad's tile ("wgrad:<tile>", kernels/conv_train_bwd.py _wgrad_tile's GEMM terms),
    or None for its fixed rule."""
    conv_train_bwd = _backward_kernels()
    signature = (tuple(x.shape), x.stride(), x.dtype, tuple(weight.shape), grad_y.stride(), tuple(stride),
                 tuple(padding), norm_input is not None)
    return _choose_tile(
        WGRAD_PREFIX, _wgrad_choices, signature, x,
        names=lambda: wgrad_tile_names(grad_y, x, weight.shape[0]),
        key=lambda: _backward_key("wgrad", x, weight, stride, padding, norm_input is not None),
        run=lambda tile: conv_train_bwd.conv_wgrad(grad_y, x, weight.shape[0], weight.shape[2:], stride, padding,
                                                   norm_input, interpreted=x.device.type == "cpu", tile=tile),
    )


def choose_dgrad_tile(grad_y: Tensor, x: Tensor, weight: Tensor, padding: Sequence[int],
                      norm_input) -> Optional[str]:
    """The Triton stride-1 dgrad's tile ("dgrad:<tile>"), or None for its fixed rule. A candidate is
    timed with the sums of its partials (a smaller BLOCK_M leaves more of them)."""
    conv_train_bwd = _backward_kernels()
    signature = (tuple(x.shape), x.stride(), x.dtype, tuple(weight.shape), grad_y.stride(), tuple(padding),
                 norm_input is not None)

    def run(tile):
        g, sum_g_part, sum_gx_part = conv_train_bwd.conv_dgrad_bn(
            grad_y, weight, x, padding, norm_input, interpreted=x.device.type == "cpu", tile=tile
        )
        return g if sum_g_part is None else (g, sum_g_part.sum(0), sum_gx_part.sum(0))

    return _choose_tile(
        DGRAD_PREFIX, _dgrad_choices, signature, x,
        names=lambda: dgrad_tile_names(x, weight, norm_input is not None),
        key=lambda: _backward_key("dgrad", x, weight, (1, 1), padding, norm_input is not None),
        run=run,
    )


def clear_choices() -> None:
    """Forget the in-process tile choices (dispatch's own memory is cleared separately)."""
    for choices in (_stats_choices, _wgrad_choices, _dgrad_choices):
        choices.clear()
