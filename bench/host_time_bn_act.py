"""Host time and aten ops per BatchNormAct2d call on the GPU's code path, on any machine.

At the 14x14 and 7x7 stages a BatchNorm + add + ReLU moves 25-50 MB, a few
microseconds of GPU time at 4 TB/s: the call's host time (Python, dispatch,
launches) decides its speed. This script runs the Python of the path a GPU
takes after its choice is made (`--path triton` or `eager`, pinned with
fastresnet.ops.tuning.override("batch_norm_act=...")) with every Triton launch stubbed
out, so it measures everything but the launches themselves, and counts the
aten ops each call issues (each one a launch on a GPU):

    python bench/host_time_bn_act.py [--path triton] [--calls 2000]

On the CPU the eager path's aten ops do real work, so its time is not host
time; its op count is still right. Printed: microseconds per call (the best of
7 runs of calls/5, the machine being shared) and the ops of one call.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastresnet import backend
from fastresnet.kernels import bn_act as kernels
from fastresnet.kernels import bn_stats
from fastresnet.nn import BatchNormAct2d
from fastresnet.ops import tuning


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func).removeprefix("aten."))
        return func(*args, **(kwargs or {}))


class _NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels() -> None:
    """Every kernel launch a no-op, the GPU's path taken on this device."""
    for module in (kernels, bn_stats):
        for name in dir(module):
            if hasattr(getattr(module, name), "run"):  # a JITFunction
                setattr(module, name, _NoLaunch())
    kernels._multiprocessors = lambda index: 132  # an H100/H200
    backend.use_triton = lambda tensor: True
    tuning.can_measure = lambda device: True


def best_us_per_call(fn, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls // 5):
            fn()
        best = min(best, (time.perf_counter() - start) / (calls // 5) * 1e6)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="triton", choices=["triton", "eager"])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    stub_kernels()
    tuning.override(f"batch_norm_act={args.path}")
    bn = BatchNormAct2d(64)
    x = torch.randn(8, 64, 7, 7).contiguous(memory_format=torch.channels_last)
    residual = torch.randn_like(x)
    x_grad, grad_y = x.clone().requires_grad_(), torch.randn_like(x)

    def train_step():
        bn(x_grad, residual).backward(grad_y)

    cases = [("eval", False, lambda: bn(x, residual)), ("train forward", False, lambda: bn(x, residual)),
             ("train forward+backward", True, train_step)]
    for label, grad, fn in cases:
        bn.train(label != "eval")
        with torch.set_grad_enabled(grad):
            fn()
            with CountOps() as counted:
                fn()
            us = best_us_per_call(fn, args.calls if not grad else args.calls // 4)
        print(f"{args.path:7s} {label:24s} {us:7.1f} us/call  {len(counted.ops):2d} aten ops: {', '.join(counted.ops)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
