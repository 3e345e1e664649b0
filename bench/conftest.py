"""Benchmarks run only with `pytest bench/ --benchmark`.

pytest-benchmark has no `--benchmark` flag of its own (only `--benchmark-*`
options, which keep working): this file adds it, and without it every test
that uses the `benchmark` fixture is skipped, so `pytest bench/` and the
normal test run stay fast.

On a CPU, `pytest bench/ --benchmark` measures the CPU (bench_cpu.py, at the
sizes a CPU user runs). The other files hold a GPU's benchmarks; with
FASTRESNET_BENCH_SMOKE=1 they run on a CPU too, tiny and through Triton's
interpreter, which measures nothing but checks their code before a GPU run.
"""

import os

import pytest
import torch

ON_CPU = not torch.cuda.is_available()
SMOKE = os.environ.get("FASTRESNET_BENCH_SMOKE", "0") == "1"
CPU_FILES = ("bench_cpu.py",)

if ON_CPU and SMOKE:
    # The Triton kernels can only run through the interpreter here.
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif not ON_CPU:
    # Every provider with cuDNN's autotuned algorithms, from the first benchmark on: what a user
    # after speed sets (fastresnet.train does by default), and the same for all providers, so a
    # provider that turned it on could not speed up the ones timed after it.
    torch.backends.cudnn.benchmark = True


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the benchmarks under bench/ (skipped without this flag)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        if ON_CPU and not SMOKE:
            gpu_only = pytest.mark.skip(reason="a GPU's benchmark: on a CPU bench_cpu.py measures "
                                               "(FASTRESNET_BENCH_SMOKE=1 runs this one tiny, to check its code)")
            for item in items:
                if "benchmark" in getattr(item, "fixturenames", ()) and item.path.name not in CPU_FILES:
                    item.add_marker(gpu_only)
        return
    skip = pytest.mark.skip(reason="benchmarks run only with --benchmark")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
