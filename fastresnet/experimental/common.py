"""What every candidate of the shelf shares: the check on its first call of a problem, and the switch that
leaves the kernels' tiles at their defaults."""

from __future__ import annotations

import importlib
import math
import os
import warnings
from typing import Callable, Iterable

import torch
from torch import Tensor

from fastresnet.testing import non_finite_mismatch

TILES_ENV = "FASTRESNET_TILES"
# ||out - expected|| / ||expected|| of a candidate that computes the same thing is rounding (bf16: about
# 2^-8 per element): far below this unless the candidate computes something else.
CHECK_RTOL = 3e-2


def tiles_searched() -> bool:
    """FASTRESNET_TILES=search (the default): the shelf times the Triton kernels' other tiles too;
    =default ("fixed" is the same): only the kernels' default tiles run (each tile timed is a compile)."""
    value = os.environ.get(TILES_ENV, "search").strip() or "search"
    value = {"fixed": "default"}.get(value, value)
    if value not in ("search", "default"):
        raise ValueError(f"{TILES_ENV}={value!r}: expected 'search' (time every tile) or 'default' (each "
                         "kernel's default tile)")
    return value == "search"


def tile_parser(module: str, table: str) -> Callable[[str], object]:
    """member(tail) of a "triton:<tile>" family (tuning.Op.add_experimental): the kernels' tile
    (kernels/conv.py _TileConfig) that tail names, e.g. "128x128x64w8s4", else a ValueError naming it and
    listing the family's tiles: those of `table` ({shape class: [(BM, BN, BK, WARPS, STAGES)]}) in
    fastresnet.kernels.experimental.<module>, imported only then."""

    def parse(name: str):
        from fastresnet.ops.layout import kernels

        try:
            return kernels().conv._TileConfig.from_name(name)
        except ValueError as err:
            rows = getattr(importlib.import_module(f"fastresnet.kernels.experimental.{module}"), table).values()
            listed = dict.fromkeys("{}x{}x{}w{}s{}".format(*tile) for tiles in rows for tile in tiles)
            raise ValueError(f"{err}; the listed tiles are {', '.join(listed)}") from None

    return parse


def _problem(args) -> tuple:
    """The shapes, strides, dtypes and devices of the tensors among args (nested too), the rest as it is."""
    return tuple((a.shape, a.stride(), a.dtype, a.device) if isinstance(a, Tensor) else
                 _problem(a) if isinstance(a, (list, tuple)) else a for a in args)


def checked(op: str, name: str, run: Callable, expected: Callable,
            outputs: Callable[[object], Iterable] = lambda out: (out,), rtol: float = CHECK_RTOL) -> Callable:
    """run, whose first call of each problem (its tensor arguments' shapes, strides, dtypes and devices)
    also compares its output tensors (`outputs(result)`, None entries skipped) with those of expected on the
    same arguments: a mismatch warns and raises, so that a measurement leaves the candidate out."""
    seen: set[tuple] = set()

    def call(*args, **kwargs):
        out = run(*args, **kwargs)
        problem = _problem((*args, *sorted(kwargs.items())))
        if problem not in seen:
            with torch.no_grad():
                wanted = outputs(expected(*args, **kwargs))
            judged = True
            for got, want in zip(outputs(out), wanted):
                if got is None or want is None or got.numel() == 0:
                    continue
                got, want = got.float(), want.float()
                if not want.isfinite().all():
                    # Inputs that overflow or hold NaN/Inf: the finite values left beside them come from
                    # cancellation of huge terms, in an order each path chooses, so only where NaN and Inf
                    # sit is compared, and the problem is judged again on its next call.
                    error, judged = (math.nan if non_finite_mismatch(got, want) else 0.0), False
                else:
                    error = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
                if not error <= rtol:  # also catches NaN
                    message = f"{op}: candidate {name} is off the reference by {error:.2e} (relative); left out"
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
                    raise RuntimeError(message)
            if judged:
                seen.add(problem)
        return out

    return call
