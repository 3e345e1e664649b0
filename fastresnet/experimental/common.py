"""What every candidate of the shelf shares: the check on its first call of a problem, and the switch that
leaves the kernels' tiles at their defaults."""

from __future__ import annotations

import os
import warnings
from typing import Callable, Iterable

import torch
from torch import Tensor

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
            for got, want in zip(outputs(out), wanted):
                if got is None or want is None or got.numel() == 0:
                    continue
                want = want.float()
                error = ((got.float() - want).norm() / want.norm().clamp_min(1e-30)).item()
                if not error <= rtol:  # also catches NaN
                    message = f"{op}: candidate {name} is off the reference by {error:.2e} (relative); left out"
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
                    raise RuntimeError(message)
            seen.add(problem)
        return out

    return call
