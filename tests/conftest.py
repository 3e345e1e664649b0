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

# pytest-xdist workers (bench/gpu_check.sh runs the CUDA tests with -n 4) each get their own
# dispatch cache: a choice timed while other workers load the GPU must not be read by another.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _shared = os.environ.get("FASTRESNET_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "fastresnet-test-cache")
    os.environ["FASTRESNET_CACHE_DIR"] = os.path.join(_shared, os.environ["PYTEST_XDIST_WORKER"])

# The tests pin the dispatch switches they need themselves; a run's own settings (a GPU plan that
# sets FASTRESNET_TILES=fixed for its benchmarks, say) must not change what the tests check.
for _switch in ("FASTRESNET_DISPATCH", "FASTRESNET_TILES", "FASTRESNET_CONV_BACKWARD"):
    os.environ.pop(_switch, None)

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
