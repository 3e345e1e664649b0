"""The tile of each training conv kernel, chosen per shape by measurement on the GPU.

conv_stats' Triton kernel (kernels/conv_train.py `_conv_stats_fwd`) used one tile
per shape class (kernels/conv.py `_tile_config`, the fixed rule). On a GPU the
first call of each problem now times a short list of tiles on the real inputs
(`_stats_tile_candidates`: the fixed rule's tile and up to three more that
compile for sm_90a without spills), keeps the fastest, and caches the choice in
fastresnet.ops.dispatch (memory and disk), as the inference conv does for its
"triton:<tile>" candidates. A candidate is timed as what it costs the op: the
conv with its statistics epilogue plus the merge of its partials (a smaller
BLOCK_M leaves more partials to merge).

Nothing is forced unmeasured: where nothing can be measured (the CPU and its
Triton interpreter, inside CUDA-graph capture before a choice exists,
FASTRESNET_DISPATCH=fixed or another op's candidate name) the fixed rule's tile
runs, exactly as before. FASTRESNET_DISPATCH="triton:<tile>" names a tile for
every op that offers it (the inference conv's names have the same form).

The statistics stay exact in meaning: the partials are per row block of the
chosen tile's BLOCK_M rows, and conv_stats_fwd returns that row count to the merge.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastresnet.ops import dispatch

TILE_PREFIX = "triton:"  # candidate names: "triton:128x128x64w8s4", as fastresnet.ops.conv names its tiles

_stats_choices: dict[tuple, str] = {}  # problem signature -> measured tile name (no key string on the hot path)


def _kernels():
    from fastresnet.kernels import bn_stats, conv, conv_train

    return bn_stats, conv, conv_train


def tile_from_name(name: str):
    """The kernels.conv._TileConfig that a candidate name ("triton:<tile>" or "<tile>") stands for."""
    _, conv, _ = _kernels()
    return conv._TileConfig.from_name(name.removeprefix(TILE_PREFIX))


def stats_problem_key(x: Tensor, packed_weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                      norm_input: bool) -> str:
    """The dispatch key of one conv_stats problem: shape, stride, padding, dtype, prologue, layout."""
    out_c, kh, kw, in_c = packed_weight.shape
    layout = "cl" if x.is_contiguous(memory_format=torch.channels_last) else "any"
    return (f"conv_stats_tile:{out_c}x{in_c}k{kh}x{kw}s{stride[0]}x{stride[1]}p{padding[0]}x{padding[1]}"
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


def choose_stats_tile(x: Tensor, packed_weight: Tensor, out: Tensor, stride: Sequence[int],
                      padding: Sequence[int], norm_input, eps: float) -> Optional[str]:
    """The tile name to run, or None for the fixed rule (the CPU; nothing measurable; fixed mode).

    On a GPU in "measure" mode the first call per problem times every candidate
    (each writes `out`, which the real run then overwrites)."""
    if not _measurable(x):
        return None
    mode = dispatch.dispatch_mode()
    if mode.startswith(TILE_PREFIX):  # a named tile: where this problem offers it
        return mode if mode in stats_tile_names(x, packed_weight, out) else None
    if mode != "measure":  # "fixed", or another op's candidate ("triton", "eager", a backward path)
        return None
    signature = (tuple(x.shape), x.stride(), x.dtype, tuple(packed_weight.shape), out.stride(), tuple(stride),
                 tuple(padding), norm_input is not None)
    choice = _stats_choices.get(signature)
    if choice is not None:
        return choice
    if x.is_cuda and torch.cuda.is_current_stream_capturing():  # no timing inside a graph capture
        return None
    names = stats_tile_names(x, packed_weight, out)
    runs = {
        name: (lambda t=tile_from_name(name): run_conv_stats(x, packed_weight, out, stride, padding, norm_input,
                                                             eps, t))
        for name in names
    }
    key = stats_problem_key(x, packed_weight, stride, padding, norm_input is not None)
    choice = dispatch.measured_choice(key, runs, x.device)
    _stats_choices[signature] = choice
    return choice


def clear_choices() -> None:
    """Forget the in-process tile choices (dispatch's own memory is cleared separately); for tests."""
    _stats_choices.clear()
