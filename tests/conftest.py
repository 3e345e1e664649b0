"""Shared test setup.

Without a GPU the Triton kernels run through Triton's interpreter, which must
be switched on before `fastresnet.kernels` is imported: this file is imported
by pytest before any test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
