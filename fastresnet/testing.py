"""Test helpers shared by the tests and the benchmarks' correctness checks."""

from __future__ import annotations

import torch

# (atol, rtol) per dtype for comparing a fused op with its eager reference.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol=None, rtol=None, name="tensor"):
    """`torch.testing.assert_close` that reports the largest and mean difference.

    Tolerances default to the entry of TOLERANCES for `expected`'s dtype.
    """
    default_atol, default_rtol = TOLERANCES.get(expected.dtype, (1e-5, 1e-5))
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    diff = (actual.detach().double() - expected.detach().double()).abs()
    if not torch.isfinite(actual).all() and torch.isfinite(expected).all():
        raise AssertionError(f"{name}: non-finite values where the reference is finite")
    allowed = atol + rtol * expected.detach().double().abs()
    if (diff > allowed).any() or diff.isnan().any():
        worst = int(torch.argmax(diff - allowed))
        raise AssertionError(
            f"{name}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}, "
            f"{int((diff > allowed).sum())}/{diff.numel()} elements outside atol={atol:g} rtol={rtol:g}; "
            f"worst at flat index {worst}: {actual.flatten()[worst].item()!r} vs {expected.flatten()[worst].item()!r}"
        )
