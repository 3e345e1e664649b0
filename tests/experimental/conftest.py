"""The experimental shelf's tests: every test here runs with FASTRESNET_EXPERIMENTAL=1, which loads the
shelf (fastresnet.experimental) and offers its candidates beside the main tree's."""

import pytest


@pytest.fixture(autouse=True)
def experimental(monkeypatch):
    monkeypatch.setenv("FASTRESNET_EXPERIMENTAL", "1")
