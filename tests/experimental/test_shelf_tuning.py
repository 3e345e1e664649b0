"""The experimental shelf and the tuner: its candidates are offered only with FASTRESNET_EXPERIMENTAL=1,
which loads it, and each is checked on its first call of a problem."""

import os
import subprocess
import sys

import pytest
import torch
from test_tuning import CPU, cache_dir, fake_timer  # noqa: F401 (fixtures)

from fastresnet.experimental.common import checked
from fastresnet.ops import tuning


class Shelved(tuning.Op):
    """An op whose main tree has "slow" and whose shelf has "fast", registered for the test."""

    def __init__(self, monkeypatch, name="shelved_op"):
        monkeypatch.setattr(tuning, "OPS", dict(tuning.OPS))
        super().__init__(name, {"slow": None})
        self.add_experimental("fast")

    def pick(self, key="k1"):
        runs = {"slow": lambda: "slow", "fast": lambda: "fast"}
        return self.choose((key,), CPU, "slow", timed=lambda name: runs[name])


def test_only_the_switch_offers_the_shelfs_candidates(cache_dir, fake_timer, monkeypatch):  # noqa: F811
    op = Shelved(monkeypatch)
    monkeypatch.delenv("FASTRESNET_EXPERIMENTAL")
    assert op.pick() == "slow" and not fake_timer  # one candidate: nothing timed
    with pytest.raises(ValueError, match="has no candidate 'fast'.*FASTRESNET_EXPERIMENTAL=1"):
        tuning.override("shelved_op=fast")
    monkeypatch.setenv("FASTRESNET_EXPERIMENTAL", "1")
    tuning.clear()
    assert op.pick() == "fast" and sorted(fake_timer) == ["fast", "slow"]
    tuning.override("shelved_op=fast")
    assert op.pick("k2") == "fast"


def test_the_switch_loads_the_shelf():
    """The main tree never imports the shelf; the switch does, when the settings are first read."""
    code = ("import sys; from fastresnet.ops import tuning; import fastresnet.nn; tuning.settings(); "
            "print('fastresnet.experimental' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "FASTRESNET_EXPERIMENTAL"}
    for switch, loaded in (("0", "False"), ("1", "True")):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                                env={**env, "FASTRESNET_EXPERIMENTAL": switch})
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == loaded


def test_a_never_run_candidate_that_computes_wrong_is_left_out(cache_dir, monkeypatch):  # noqa: F811
    op = Shelved(monkeypatch)
    values = {"slow": torch.ones(3), "fast": torch.full((3,), 2.0)}
    runs = {"slow": lambda: values["slow"], "fast": checked("shelved_op", "fast", lambda: values["fast"],
                                                             lambda: values["slow"])}
    monkeypatch.setattr(tuning, "can_measure", lambda device: True)
    monkeypatch.setattr(tuning, "time_ms", lambda fn, device: [fn() for _ in range(2)] and 1.0)
    with pytest.warns(RuntimeWarning, match="candidate fast is off the reference"):
        choice = op.choose(("k5",), CPU, "slow", timed=lambda name: runs[name])
    assert choice == "slow" and set(tuning.decision("shelved_op:k5")["times_ms"]) == {"slow"}


def test_the_check_runs_once_per_problem():
    calls = []
    run = checked("op", "name", lambda t: t * 1.0, lambda t: calls.append(t.shape) or t)
    for shape in ((2, 3), (2, 3), (4, 3)):
        run(torch.ones(shape))
    assert calls == [(2, 3), (4, 3)]
