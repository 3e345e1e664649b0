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
    monkeypatch.setitem(tuning.ROUNDS, "cpu", (1, 1))
    monkeypatch.setattr(tuning, "elapsed_ms", lambda fn, device: [fn()] and 1.0)
    with pytest.warns(RuntimeWarning, match="candidate fast is off the reference"):
        choice = op.choose(("k5",), CPU, "slow", timed=lambda name: runs[name])
    assert choice == "slow" and set(tuning.decision("shelved_op:k5")["times_ms"]) == {"slow"}


def test_the_check_runs_once_per_problem():
    calls = []
    run = checked("op", "name", lambda t: t * 1.0, lambda t: calls.append(t.shape) or t)
    for shape in ((2, 3), (2, 3), (4, 3)):
        run(torch.ones(shape))
    assert calls == [(2, 3), (4, 3)]


def test_the_check_takes_nan_and_inf_where_the_main_tree_has_them():
    """An input holding NaN or Inf gives both paths NaN and Inf at the same places: no mismatch. A candidate
    that drops them, or puts them elsewhere, is off."""
    nan, inf = float("nan"), float("inf")
    expected = torch.tensor([1.0, nan, inf, -inf])
    checked("op", "same", lambda t: t.clone(), lambda t: expected)(expected)
    for wrong in ([1.0, 0.0, inf, -inf], [1.0, nan, nan, -inf], [nan, nan, inf, -inf]):
        run = checked("op", "wrong", lambda t, wrong=wrong: torch.tensor(wrong), lambda t: expected)
        with pytest.warns(RuntimeWarning, match="candidate wrong is off the reference"), pytest.raises(RuntimeError):
            run(expected)


def test_finite_values_beside_non_finite_ones_are_judged_on_the_next_call():
    """Beside NaN and Inf the finite values come from cancelling huge terms in each path's own order, so they
    are not judged there; the problem stays unjudged until a call whose expected values are all finite."""
    nan, inf = float("nan"), float("inf")
    run = checked("op", "wrong", lambda t: t * 2.0, lambda t: t)
    run(torch.tensor([1.0, nan, inf, -inf]))  # 2.0 against 1.0, beside NaN and Inf: not judged
    with pytest.warns(RuntimeWarning, match="candidate wrong is off the reference"), pytest.raises(RuntimeError):
        run(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # the same problem, all finite: judged


@pytest.mark.parametrize("spec,why", [
    ("conv_bn_act=triton:NOT_A_TILE", "is not of the form BMxBNxBKwWARPSsSTAGES.*; the listed tiles are 128x64x32w8s4, "),
    ("conv_bn_act=triton_gemm:100x64x64w4s4", "powers of two >= 16"),
    ("conv_stats=triton:128x64", "is not of the form"),
    ("conv_wgrad.tile=triton:64x64x64w3s4", "WARPS 1, 2, 4, 8 or 16.*; the listed tiles are 128x128x128w8s3, "),
    ("conv_dgrad.tile=triton:64x64x64w4s0", "STAGES at least 1"),
])
def test_a_pinned_tile_that_names_no_tile_is_refused(spec, why, monkeypatch):
    """A family's candidate ("triton:<tile>") is checked when the switch is read, not at the first op that
    would launch it: the op, the candidate, what is wrong with the tile and the family's listed tiles, in
    one error."""
    op, _, candidate = spec.partition("=")
    for read in (tuning.override, lambda s: monkeypatch.setenv(tuning.DISPATCH_ENV, s) or tuning.settings()):
        with pytest.raises(ValueError, match=f"FASTRESNET_DISPATCH: '{op}' candidate '{candidate}': .*{why}"):
            read(spec)
        monkeypatch.delenv(tuning.DISPATCH_ENV, raising=False)
    pins = "conv_bn_act=triton:128x128x64w8s4, conv_stats.forward=triton:64x128x64w4s4, conv_wgrad.tile=triton:64x64x64w4s4"
    tuning.override(pins)  # tiles that parse are taken
    assert tuning.settings().pin_for("conv_bn_act") == "triton:128x128x64w8s4"


def test_a_command_with_a_pinned_tile_that_names_no_tile_stops_with_one_line(monkeypatch, capsys):
    from fastresnet import train

    monkeypatch.setenv(tuning.DISPATCH_ENV, "conv_bn_act=triton:NOT_A_TILE")
    assert train.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: FASTRESNET_DISPATCH: 'conv_bn_act' candidate 'triton:NOT_A_TILE': conv tile")
    assert "the listed tiles are 128x64x32w8s4, " in err and "\n" not in err
