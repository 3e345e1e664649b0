"""fastresnet.ops.tuning: the one measured choice, its disk cache and its switches (the experimental
shelf's candidates and their first-call check: tests/experimental/test_shelf_tuning.py).

Generic candidates ("slow", "fast", "broken") of a test op stand for any op: the CPU is told it can
measure, with made-up times per candidate.
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


class Generic(tuning.Op):
    """An op whose candidates are "slow", "fast" and "broken" (it raises), registered for the test; the
    problem ("k1", say) stands for a problem tuple, and `names` for the candidates that can run it."""

    def __init__(self, monkeypatch, name="generic_op"):
        monkeypatch.setattr(tuning, "OPS", dict(tuning.OPS))
        super().__init__(name, {n: (lambda names, n=n: n in names) for n in ("slow", "fast", "broken")})

    def pick(self, key="k1", problem=None, device=CPU, names=("slow", "fast", "broken"), default="slow"):
        runs = {"slow": lambda: "slow", "fast": lambda: "fast", "broken": lambda: 1 / 0}
        return self.choose(problem or (key,), device, default, timed=lambda name: runs[name], args=(names,))


def test_measures_once_and_caches_on_disk(cache_dir, fake_timer, monkeypatch, caplog):
    op = Generic(monkeypatch)
    with caplog.at_level("INFO", logger="fastresnet.tuning"):
        assert op.pick() == "fast"
    assert "tuning generic_op:k1 -> fast (fast 1.000 ms, slow 3.000 ms)" in caplog.text
    assert sorted(fake_timer) == ["fast", "slow"]  # "broken" raised and was left out
    assert op.pick() == "fast"
    assert len(fake_timer) == 2  # the second call was answered from memory
    (listed,) = tuning.decisions()
    assert listed["choice"] == "fast" and listed["times_ms"] == {"fast": 1.0, "slow": 3.0}
    assert listed["op"] == "generic_op" and listed["source"] == "measured"
    (path,) = cache_dir.glob("dispatch-*.json")
    assert json.loads(path.read_text())["decisions"]["generic_op:k1"]["choice"] == "fast"
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
    assert json.loads(path.read_text())["decisions"]["generic_op:k1"]["choice"] == "fast"  # rewritten whole


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
    tuning.save_cache(tuning.cache_path(tag), tag, {"generic_op:k1": entry, "generic_op:k2": good})
    with pytest.warns(RuntimeWarning, match="1 malformed entries"):
        assert op.pick("k1") == "fast"
    assert op.pick("k2") == "slow" and sorted(fake_timer) == ["fast", "slow"]  # k2's good entry was kept


def test_a_stale_cache_is_ignored_with_a_warning(cache_dir, fake_timer, monkeypatch):
    op = Generic(monkeypatch)
    tag = tuning.environment_tag(CPU)
    tuning.save_cache(tuning.cache_path(tag), {**tag, "triton": "0.0.1"},
                      {"generic_op:k1": {"choice": "slow", "times_ms": {"slow": 1.0, "fast": 2.0}}})
    with pytest.warns(RuntimeWarning, match="stale dispatch cache"):
        assert op.pick() == "fast"


def test_a_decision_that_did_not_time_a_candidate_allowed_now_is_measured_again(cache_dir, fake_timer, monkeypatch):
    """A decision made with fewer candidates (FASTRESNET_EXPERIMENTAL off) cannot speak for one allowed since;
    one made with more answers for a subset (the fastest of those timed)."""
    op = Generic(monkeypatch)
    assert op.pick("a", names=("slow",)) == "slow" and not fake_timer  # one candidate: nothing timed
    tag = tuning.environment_tag(CPU)
    tuning.save_cache(tuning.cache_path(tag), tag, {"generic_op:k1": {"choice": "slow", "times_ms": {"slow": 1.0}}})
    assert op.pick() == "fast" and sorted(fake_timer) == ["fast", "slow"]
    tuning.clear()
    tuning.save_cache(tuning.cache_path(tag), tag, {
        "generic_op:k1": {"choice": "fast", "times_ms": {"slow": 2.0, "fast": 1.0}, "failed": ["broken"]}})
    assert op.pick(names=("slow", "broken")) == "slow" and len(fake_timer) == 2  # broken's failure is remembered


def test_switches(cache_dir, fake_timer, monkeypatch):
    op = Generic(monkeypatch)
    monkeypatch.setenv("FASTRESNET_DISPATCH", "default")
    assert op.pick("k2") == "slow" and not fake_timer
    tuning.override("fixed")  # what the README first called it
    assert op.pick("k2") == "slow" and not fake_timer
    tuning.override("generic_op=broken")
    assert op.pick("k2") == "broken"
    tuning.override("generic_op=default,conv_bn_act=cudnn_fused")
    assert op.pick("k2") == "slow"
    tuning.override("generic_op=fixed")
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
    ("triton", "neither 'measure', 'default' nor 'op=candidate'", "conv_bn_act ['cudnn_fused'"),
    ("conv=cudnn_fused", "no op 'conv'", "fused_block ['triton', 'mixed'"),
    ("conv_bn_act=cudnn", "has no candidate 'cudnn'", "'cudnn_affine', 'cudnn_fused'"),
    ("batch_norm_act=triton_gemm", "has no candidate 'triton_gemm'", "'eager', 'triton'"),
    ("batch_norm_act=triton_single", "FASTRESNET_EXPERIMENTAL=1 offers the experimental ones", "'eager', 'triton'"),
])
def test_a_bad_override_is_an_error_that_lists_the_valid_ones(spec, message, listed, monkeypatch):
    with pytest.raises(ValueError, match=message) as err:
        tuning.override(spec)
    assert listed in str(err.value)  # the valid ops, or the op's candidates
    monkeypatch.setenv("FASTRESNET_DISPATCH", spec)
    with pytest.raises(ValueError, match=message):
        tuning.settings()


def test_parse_gives_the_pins_and_the_default():
    assert tuning.parse_dispatch("conv_bn_act=triton, batch_norm_act.backward=eager") == (
        False, {"conv_bn_act": "triton", "batch_norm_act.backward": "eager"})
    assert tuning.parse_dispatch("default") == (True, {}) == tuning.parse_dispatch("fixed")


def test_inside_a_cuda_graph_capture_nothing_is_timed(cache_dir, fake_timer, monkeypatch):
    """A first call met inside a CUDA-graph capture (no warm-up before it) cannot time (the event sync
    would fail and spoil the capture): a choice already made is used, else the fixed rule, not remembered."""
    op = Generic(monkeypatch)
    monkeypatch.setattr(tuning, "capturing", lambda device: True)
    assert op.pick("k4") == "slow" and not fake_timer
    assert tuning.decision("generic_op:k4") is None and op.known(("k4",), CPU) is None  # a later call measures
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


def test_every_op_pins_to_its_own_candidates():
    for name, op in tuning.OPS.items():
        tuning.parse_dispatch(f"{name}={next(iter(op.candidates))}")
    assert list(tuning.OPS["conv_bn_act"].candidates) == ["cudnn_fused", "cudnn_affine", "triton"]


def test_keys_write_every_field_of_a_problem():
    op = tuning.OPS["batch_norm_act.forward"]
    problem = (torch.Size([2, 8, 4, 4]), (128, 1, 32, 8), torch.bfloat16, None, ((128, 1, 32, 8), torch.float32),
               True, (True, False), "after-triton")
    assert op.key(problem) == ("batch_norm_act.forward:2x8x4x4:128x1x32x8:bfloat16:-:(128x1x32x8,float32):1:10"
                               ":after-triton")
