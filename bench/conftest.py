"""Benchmarks run only with `pytest bench/ --benchmark`.

pytest-benchmark has no `--benchmark` flag of its own (only `--benchmark-*`
options, which keep working): this file adds it, and without it every test
that uses the `benchmark` fixture is skipped, so `pytest bench/` and the
normal test run stay fast.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels can only run through the interpreter here.
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
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
        return
    skip = pytest.mark.skip(reason="benchmarks run only with --benchmark")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
