"""Eager PyTorch references for every fused kernel.

One copy, used by the CPU fallback, the tests and the benchmarks. Each
function here is the definition of what the matching kernel in `kernels/`
must compute.
"""

from __future__ import annotations
