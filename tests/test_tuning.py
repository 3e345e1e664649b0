"""fastresnet.ops.tuning: the one measured choice, its disk cache, its switches, and safety by default.

Generic candidates ("slow", "fast", "broken") under the op "conv_stats.backward"'s name stand for any op:
the CPU is told it can measure, with made-up times per candidate.
"""

import json

import pytest
import torch

from fastresnet.ops import tuning

CPU = torch.device("cpu")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    tuning.clear()
    return tmp_path


@pytest.fixture
def fake_timer(monkeypatch):
    """Pretend the CPU can be measured, with made-up times per candidate; returns the calls made."""
    calls = []
    times = {"fast": 1.0, "slow": 3.0}

    def fake_time_ms(fn, device, warmup=3, reps=10):
        name = fn()
        calls.append(name)
        return times[name]

    monkeypatch.setattr(tuning, "can_measure", lambda device: True)
    monkeypatch.setattr(tuning, "time_ms", fake_time_ms)
    return calls


class Generic(tuning.Tuned):
    """An op whose candidates are "slow", "fast" and "broken" (it raises), registered for the test."""

    def __init__(self, monkeypatch, name="generic_op", proven=("slow", "fast", "broken")):
        op = tuning.Op(("slow", "fast", "broken"), {n: "test" for n in proven}, check_against="slow")
        monkeypatch.setitem(tuning.OPS, name, op)
        super().__init__(name)

    def pick(self, key="k1", signature=None, device=CPU, names=("slow", "fast", "broken"), fixed="slow"):
        runs = {"slow": lambda: "slow", "fast": lambda: "fast", "broken": lambda: 1 / 0}
        return self.choose(signature or (key,), device, names=names, fixed=fixed, key=lambda: key,
                           runs=lambda allowed: {n: runs[n] for n in allowed}, outputs=lambda out: ())


def test_measures_once_and_caches_on_disk(cache_dir, fake_timer, monkeypatch, caplog):
    op = Generic(monkeypatch)
    with caplog.at_level("INFO", logger="fastresnet.tuning"):
        assert op.pick() == "fast"
    assert "tuning k1 -> fast (fast 1.000 ms, slow 3.000 ms)" in caplog.text
    assert sorted(fake_timer) == ["fast", "slow"]  # "broken" raised and was left out
    assert op.pick() == "fast"
    assert len(fake_timer) == 2  # the second call was answered from memory
    (listed,) = tuning.decisions()
    assert listed["choice"] == "fast" and listed["times_ms"] == {"fast": 1.0, "slow": 3.0}
    assert listed["op"] == "generic_op" and listed["source"] == "measured"
    (path,) = cache_dir.glob("dispatch-*.json")
    assert json.loads(path.read_text())["decisions"]["k1"]["choice"] == "fast"
    assert not list(cache_dir.glob("*.tmp"))  # the temp file was renamed over, not left behind

    tuning.clear()  # a new process
    assert op.pick() == "fast"
    assert len(fake_timer) == 2 and tuning.decisions()[0]["source"] == "disk cache"


@pytest.mark.parametrize("content", ["{not json", '{"decisions": 3}', "[]", "[" * 100000 + "]" * 100000],
                         ids=["truncated", "bad_table", "list", "deeply_nested"])
def test_a_corrupt_cache_is_ignored_with_a_warning(cache_dir, fake_timer, monkeypatch, content):
    op = Generic(monkeypatch)
    path = tuning.cache_path(tuning.environment_tag(CPU))
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match="corrupt dispatch cache"):
        assert op.pick() == "fast"
    assert json.loads(path.read_text())["decisions"]["k1"]["choice"] == "fast"  # rewritten whole


@pytest.mark.parametrize("entry", [
    {"choice": ["fast"], "times_ms": {"fast": 1.0}},
    {"choice": {"name": "fast"}, "times_ms": {"fast": 1.0}},
    {"choice": "fast", "times_ms": "1 ms"},
    {"choice": "fast", "times_ms": {"fast": "quick", "slow": 3.0}},
    {"choice": "fast", "times_ms": {"fast": float("nan"), "slow": 3.0}},
    {"choice": "fast", "times_ms": {"slow": 3.0}},
    {"choice": "fast"},
    "fast",
], ids=["choice_list", "choice_dict", "times_str", "time_str", "time_nan", "choice_untimed", "no_times", "bare"])
def test_a_malformed_entry_is_measured_again(cache_dir, fake_timer, monkeypatch, entry):
    op = Generic(monkeypatch)
    tag = tuning.environment_tag(CPU)
    good = {"choice": "slow", "times_ms": {"slow": 1.0, "fast": 2.0}, "failed": ["broken"]}
    tuning.save_cache(tuning.cache_path(tag), tag, {"k1": entry, "k2": good})
    with pytest.warns(RuntimeWarning, match="1 malformed entries"):
        assert op.pick("k1") == "fast"
    assert op.pick("k2") == "slow" and sorted(fake_timer) == ["fast", "slow"]  # k2's good entry was kept


def test_a_stale_cache_is_ignored_with_a_warning(cache_dir, fake_timer, monkeypatch):
    op = Generic(monkeypatch)
    tag = tuning.environment_tag(CPU)
    tuning.save_cache(tuning.cache_path(tag), {**tag, "triton": "0.0.1"},
                      {"k1": {"choice": "slow", "times_ms": {"slow": 1.0, "fast": 2.0}}})
    with pytest.warns(RuntimeWarning, match="stale dispatch cache"):
        assert op.pick() == "fast"


def test_a_decision_that_did_not_time_a_candidate_allowed_now_is_measured_again(cache_dir, fake_timer, monkeypatch):
    """A decision made with fewer candidates (FASTRESNET_EXPERIMENTAL off) cannot speak for one allowed since;
    one made with more answers for a subset (the fastest of those timed)."""
    op = Generic(monkeypatch)
    assert op.pick(names=("slow",), signature=("a",)) == "slow" and not fake_timer  # one candidate: nothing timed
    tag = tuning.environment_tag(CPU)
    tuning.save_cache(tuning.cache_path(tag), tag, {"k1": {"choice": "slow", "times_ms": {"slow": 1.0}}})
    assert op.pick(signature=("b",)) == "fast" and sorted(fake_timer) == ["fast", "slow"]
    tuning.clear()
    tuning.save_cache(tuning.cache_path(tag), tag,
                      {"k1": {"choice": "fast", "times_ms": {"slow": 2.0, "fast": 1.0}, "failed": ["broken"]}})
    assert op.pick(names=("slow", "broken")) == "slow" and len(fake_timer) == 2  # broken's failure is remembered


def test_switches(cache_dir, fake_timer, monkeypatch):
    op = Generic(monkeypatch)
    monkeypatch.setenv("FASTRESNET_DISPATCH", "fixed")
    assert op.pick("k2") == "slow" and not fake_timer
    tuning.override("generic_op=broken")
    assert op.pick("k2") == "broken"
    tuning.override("generic_op=fixed,conv_bn_act=cudnn_fused")
    assert op.pick("k2") == "slow"
    tuning.override("measure")
    assert op.pick("k2") == "fast"


def test_a_pin_for_one_op_never_changes_another(cache_dir, fake_timer, monkeypatch):
    first, second = Generic(monkeypatch, "generic.first"), Generic(monkeypatch, "generic.second")
    tuning.override("generic.first=broken")
    assert first.pick("k1") == "broken" and second.pick("k2") == "fast"
    tuning.override("generic=broken")  # a prefix pins every op under it that has the candidate
    assert first.pick("k1") == "broken" and second.pick("k2") == "broken"
    tuning.override("conv_bn_act=triton")  # another op's candidate, even one of the same name
    assert first.pick("k1") == "fast"


def test_a_pinned_candidate_that_cannot_run_a_problem_leaves_it_to_the_rule(cache_dir, monkeypatch):
    op = Generic(monkeypatch)
    tuning.override("generic_op=fast")
    assert op.pick(names=("slow", "broken")) == "slow"


@pytest.mark.parametrize("spec,message,listed", [
    ("triton", "neither 'measure', 'fixed' nor 'op=candidate'", "conv_bn_act ['cudnn_fused'"),
    ("conv=cudnn_fused", "no op 'conv'", "fused_block ['triton', 'mixed'"),
    ("conv_bn_act=cudnn", "has no candidate 'cudnn'", "'cudnn_affine', 'cudnn_fused'"),
    ("batch_norm_act=triton_gemm", "has no candidate 'triton_gemm'", "'triton_pipelined', 'triton_single'"),
])
def test_a_bad_override_is_an_error_that_lists_the_valid_ones(spec, message, listed, monkeypatch):
    with pytest.raises(ValueError, match=message) as err:
        tuning.override(spec)
    assert listed in str(err.value)  # the valid ops, or the op's candidates
    monkeypatch.setenv("FASTRESNET_DISPATCH", spec)
    with pytest.raises(ValueError, match=message):
        tuning.settings()


def test_overrides_name_families_of_tiles():
    assert tuning.parse_dispatch("conv_bn_act=triton:128x128x64w8s4, conv_stats.tile=tile:64x64x32w4s3") == (
        False, {"conv_bn_act": "triton:128x128x64w8s4", "conv_stats.tile": "tile:64x64x32w4s3"})
    assert tuning.parse_dispatch("fixed") == (True, {})


def test_inside_a_cuda_graph_capture_nothing_is_timed(cache_dir, fake_timer, monkeypatch):
    """A first call met inside a CUDA-graph capture (no warm-up before it) cannot time (the event sync
    would fail and spoil the capture): a choice already made is used, else the fixed rule, not remembered."""
    op = Generic(monkeypatch)
    monkeypatch.setattr(tuning, "capturing", lambda device: True)
    assert op.pick("k4") == "slow" and not fake_timer
    assert tuning.decision("k4") is None and op.known(("k4",)) is None  # a later uncaptured call measures
    monkeypatch.setattr(tuning, "capturing", lambda device: False)
    assert op.pick("k4") == "fast"
    tuning.clear()  # a new process: the disk cache answers inside a capture too
    monkeypatch.setattr(tuning, "capturing", lambda device: True)
    timed = len(fake_timer)
    assert op.pick("k4") == "fast" and len(fake_timer) == timed


def test_off_a_gpu_the_fixed_rule_runs_and_nothing_is_written(cache_dir, monkeypatch):
    op = Generic(monkeypatch)
    assert op.pick("k3") == "slow"
    assert not list(cache_dir.iterdir())


def test_on_a_gpu_only_proven_candidates_compete_unless_experimental(cache_dir, fake_timer, monkeypatch):
    op = Generic(monkeypatch, proven=("slow",))
    gpu = torch.device("cuda")
    assert op.allowed(["slow", "fast", "broken"], gpu) == ["slow"]
    assert op.allowed(["slow", "fast", "broken"], CPU) == ["slow", "fast", "broken"]  # the interpreter: no harm
    monkeypatch.setenv("FASTRESNET_EXPERIMENTAL", "1")
    assert op.allowed(["slow", "fast", "broken"], gpu) == ["slow", "fast", "broken"]


def test_a_never_run_candidate_that_computes_wrong_is_left_out(cache_dir, fake_timer, monkeypatch):
    op = tuning.Op(("slow", "fast"), {"slow": "test"}, check_against="slow")
    monkeypatch.setitem(tuning.OPS, "checked_op", op)
    tuned = tuning.Tuned("checked_op")
    values = {"slow": torch.ones(3), "fast": torch.full((3,), 2.0)}
    monkeypatch.setattr(tuning, "time_ms", lambda fn, device: [fn() for _ in range(2)] and 1.0)
    with pytest.warns(RuntimeWarning, match="candidate fast is off the reference"):
        choice = tuned.choose(("k",), CPU, names=("slow", "fast"), fixed="slow", key=lambda: "k5",
                              runs=lambda names: {n: (lambda n=n: values[n]) for n in names})
    assert choice == "slow" and set(tuning.decision("k5")["times_ms"]) == {"slow"}


def test_every_op_pins_to_its_own_candidates_and_proven_ones_are_its_own():
    for name, op in tuning.OPS.items():
        assert set(op.proven) <= set(op.candidates), name
        assert op.check_against is None or op.check_against in op.candidates, name
        tuning.parse_dispatch(f"{name}={op.candidates[0]}")
    assert tuning.proven_candidates()["conv_bn_act"].keys() == {"cudnn_fused", "cudnn_affine", "triton"}
