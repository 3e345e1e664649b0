"""Shared test setup.

Without a GPU the Triton kernels run through Triton's interpreter, which must
be switched on before `fastresnet.kernels` is imported: this file is imported
by pytest before any test module.
"""

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests never read or write the user's tuning cache: a fresh one per run (the folder a GPU plan names, or
# a temporary one), and per pytest-xdist worker (bench/gpu_check.sh runs the CUDA tests on several): a
# choice timed while other workers load the GPU must not be read by another.
_shared = os.environ.get("FASTRESNET_CACHE_DIR") or tempfile.mkdtemp(prefix="fastresnet-test-cache-")
os.environ["FASTRESNET_CACHE_DIR"] = os.path.join(_shared, os.environ.get("PYTEST_XDIST_WORKER", "main"))

# The tests pin the tuning switches they need themselves; a run's own settings (a GPU plan that
# sets FASTRESNET_EXPERIMENTAL=1 and FASTRESNET_TILES=fixed for its benchmarks, say) must not change what
# the tests check.
for _switch in ("FASTRESNET_DISPATCH", "FASTRESNET_TILES", "FASTRESNET_EXPERIMENTAL"):
    os.environ.pop(_switch, None)

from fastresnet.ops import tuning  # noqa: E402
from fastresnet.testing import assert_close  # noqa: E402,F401  (re-exported for tests)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_tuning():
    """Every test starts with no choices in memory and no override (the switches are read when a
    problem is first met: a test that sets one through the environment finds it read)."""
    tuning.override(None)
    yield
    tuning.override(None)


class FakeTiming:
    """What fake_gpu_timing records and is told: `winners` maps an op of fastresnet.ops.tuning.OPS to
    the candidate that is 'fastest' (`default` where an op is not named; None: the first candidate
    timed); `timed` lists the (op, key) of every measurement, in the order they were timed."""

    def __init__(self):
        self.winners: dict[str, str] = {}
        self.default = None
        self.timed: list[tuple[str, str]] = []
        self.ops: list[tuple[str, str]] = []  # the measurements under way (nested ones on top)


@pytest.fixture
def fake_gpu_timing(tmp_path, monkeypatch):
    """Let the CPU choose as a GPU does, with made-up times: each candidate runs once (so every one
    really executes, and one of the experimental shelf is checked on that call, as on a GPU), the winner
    of its op takes 1 ms, the others 2 ms. The kernels' tiles stay their defaults (FASTRESNET_TILES=default:
    tile lists are a GPU's); the disk cache lives in tmp_path."""
    fake = FakeTiming()
    real_measure = tuning.Op._measure

    def recording_measure(self, key, *args):
        fake.ops.append((self.name, key))
        try:
            return real_measure(self, key, *args)
        finally:
            fake.ops.pop()

    def fake_measure(candidates, device):
        assert not torch.compiler.is_compiling(), "timed inside a traced region"
        op, problem = fake.ops[-1]
        fake.timed.append((op, problem))
        winner = fake.winners.get(op, fake.default)
        times = {}
        for name, fn in candidates.items():
            try:
                fn()
            except RuntimeError:  # as tuning.measure: a failing candidate is left out
                continue
            times[name] = 1.0 if name == winner else 2.0
        return times

    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTRESNET_TILES", "default")  # the kernels' tiles are a GPU's: each kernel runs its default
    monkeypatch.setattr(tuning, "can_measure", lambda device: True)
    monkeypatch.setattr(tuning.Op, "_measure", recording_measure)
    monkeypatch.setattr(tuning, "measure", fake_measure)
    tuning.clear()
    yield fake
    tuning.clear()
