"""Test helpers shared by the tests and the benchmarks' correctness checks."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# (atol, rtol) per dtype for comparing a fused op with its eager reference.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol=None, rtol=None, name="tensor",
                 equal_nan=False):
    """`torch.testing.assert_close` that reports the largest and mean difference.

    Tolerances default to the entry of TOLERANCES for `expected`'s dtype. equal_nan: `expected` may hold
    NaN and +-Inf, which `actual` must hold at the same places (Inf with the same sign); the finite
    values are compared as usual.
    """
    default_atol, default_rtol = TOLERANCES.get(expected.dtype, (1e-5, 1e-5))
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if equal_nan:
        mismatch = non_finite_mismatch(actual.detach(), expected.detach())
        if mismatch is not None:
            raise AssertionError(f"{name}: {mismatch}")
        finite = expected.isfinite()
        actual, expected = actual.detach()[finite], expected.detach()[finite]
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


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones are the identity map), in eval."""
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_var", None) is not None:
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
    return model.eval()


def non_finite_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> Optional[str]:
    """None where actual holds NaN, +Inf and -Inf exactly where expected does, else what differs."""
    for what, found, wanted in (("NaN", actual.isnan(), expected.isnan()),
                                ("+Inf", actual == float("inf"), expected == float("inf")),
                                ("-Inf", actual == float("-inf"), expected == float("-inf"))):
        if not torch.equal(found, wanted):
            extra, missing = int((found & ~wanted).sum()), int((~found & wanted).sum())
            first = int(torch.nonzero((found != wanted).flatten())[0])
            return (f"{what} at {extra} places where expected has none and missing at {missing} of its "
                    f"{int(wanted.sum())}; first at flat index {first}: {actual.flatten()[first].item()!r} vs "
                    f"{expected.flatten()[first].item()!r}")
    return None


def relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """||actual - exact|| / ||exact||, in float64."""
    exact64 = exact.detach().double()
    return ((actual.detach().double() - exact64).norm() / exact64.norm().clamp_min(1e-30)).item()


def assert_as_accurate_as(actual, baseline, exact, *, name="tensor", factor=2.0, floor=1e-3):
    """A low-precision (bf16/fp16) result judged against the fp32 truth `exact`.

    Two bf16 computations of a deep network differ from each other by far more
    than either differs from the truth, so comparing a fused kernel with eager
    bf16 elementwise is the wrong test. Instead: the fused result's relative
    error must be at most `factor` times the error PyTorch's own low-precision
    computation (`baseline`) makes, plus a small `floor`.
    """
    error, baseline_error = relative_error(actual, exact), relative_error(baseline, exact)
    allowed = factor * baseline_error + floor
    if not error <= allowed:  # also catches NaN
        raise AssertionError(
            f"{name}: relative error {error:.3e} against fp32, PyTorch's own low-precision error "
            f"{baseline_error:.3e} (allowed {factor:g}x that + {floor:g} = {allowed:.3e})"
        )


def spawn_ranks(worker, *args, nprocs: int = 2) -> None:
    """Run worker(rank, port, *args) in `nprocs` processes (torch.multiprocessing.spawn), port being a
    free TCP port on 127.0.0.1 for the ranks' rendezvous (gloo on the CPU)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, *args), nprocs=nprocs, join=True)
