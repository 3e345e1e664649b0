"""python -m fastresnet.tune: every choice of a run made ahead of time, shown as it is made, exported and
imported on identical machines (and refused on others).

Nothing is timed on a CPU; conftest's fake_gpu_timing lets it choose as a GPU does, with made-up times."""

from __future__ import annotations

import copy
import io
import json
import re

import pytest
import torch
from torchvision.models.resnet import BasicBlock

from fastresnet import convert, tune
from fastresnet.nn import tune_dispatch
from fastresnet.ops import tuning

CPU = torch.device("cpu")
TINY = ["--model", "resnet20", "--data.batch_size", "4", "--compile", "off", "--amp", "off"]


def test_the_command_runs_resnet20_and_exports_what_it_knows(tmp_path, monkeypatch, capsys):
    """On a CPU nothing is timed (the defaults run): the table says so and the export is an empty,
    loadable decisions file of this machine."""
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1")
    out = tmp_path / "decisions.json"
    monkeypatch.chdir(tmp_path)  # tune writes no run directory: nothing but the export lands here
    assert tune.main([*TINY, "--export", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no decision was timed" in printed and f"written to {out}" in printed
    data = json.loads(out.read_text())
    assert data["decisions"] == {} and data["device"] == tuning.environment_tag(CPU)["device"]  # the CPU, named
    assert not (tmp_path / "runs").exists()
    assert tune.main(["--import", str(out)]) == 0


def _tiny_torchvision_net():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU(), BasicBlock(8, 8), BasicBlock(8, 8))
    return net.to(memory_format=torch.channels_last)


def test_a_tiny_torchvision_model_is_tuned_with_progress_and_its_decisions_move(fake_gpu_timing, tmp_path):
    """tune_dispatch's measurements show as they happen; the exported decisions load back on a machine
    like this one, which then times nothing."""
    stream = io.StringIO()
    tuning.show_progress(tuning.TuningProgress(stream))
    try:
        model = convert(_tiny_torchvision_net(), mode="train")
        x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
        decisions = tune_dispatch(model, x)
    finally:
        tuning.show_progress(None)
    assert decisions and {d["op"] for d in decisions} >= {"fused_block"}
    lines = stream.getvalue().splitlines()
    assert any(line.startswith("tuning problem 1 (") for line in lines)
    assert any(line.strip() in ("[1/2] triton", "[1/2] eager") for line in lines), lines
    assert any(line.strip().startswith("[2/2] ") and "s left for this problem" in line for line in lines), lines
    assert any(line.strip().startswith("-> ") and " ms" in line for line in lines), lines
    table = tune.decisions_table(decisions)
    assert "| fused_block |" in table and "measured" in table

    exported = tmp_path / "decisions.json"
    assert tuning.export_decisions(exported, CPU) == len(decisions)
    for cache in tmp_path.glob("dispatch-*.json"):  # another machine: an empty cache ...
        cache.unlink()
    tuning.clear()
    assert tuning.import_decisions(exported, CPU) == len(decisions)  # ... given this one's decisions
    timed = len(fake_gpu_timing.timed)
    tune_dispatch(copy.deepcopy(model), x)
    assert len(fake_gpu_timing.timed) == timed  # nothing measured again


def test_a_file_of_another_gpu_or_version_is_refused(tmp_path, capsys):
    tag = tuning.environment_tag(CPU)
    entries = {"k": {"op": "fused_block", "choice": "eager", "times_ms": {"eager": 1.0}}}
    other_gpu = tmp_path / "h100.json"
    tuning.save_cache(other_gpu, {**tag, "device": "NVIDIA H100 80GB HBM3"}, entries)
    other_torch = tmp_path / "old.json"
    tuning.save_cache(other_torch, {**tag, "torch": "2.0.0"}, entries)
    with pytest.raises(ValueError, match=re.escape(f"device 'NVIDIA H100 80GB HBM3' there, '{tag['device']}' here")):
        tuning.import_decisions(other_gpu, CPU)
    assert tune.main(["--import", str(other_torch)]) == 2
    assert "torch '2.0.0' there" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a fastresnet decisions file"),
    ('{"something": 1}', "no 'decisions' table"),
    (None, "No such file"),
])
def test_a_bad_import_file_is_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "decisions.json"
    if content is not None:
        path.write_text(content)
    assert tune.main(["--import", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and str(path) in err and "Traceback" not in err


def test_a_malformed_entry_makes_the_file_refused(tmp_path):
    tag = tuning.environment_tag(CPU)
    path = tmp_path / "decisions.json"
    tuning.save_cache(path, tag, {"k": {"choice": ["eager"], "times_ms": {}}})
    with pytest.raises(ValueError, match="1 malformed entries"):
        tuning.import_decisions(path, CPU)


def test_bad_tune_options_are_errors(capsys):
    assert tune.main(["--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_the_gpu_scripts_tune_command_parses():
    """bench/gpu_check.sh's tune stage: the same ResNet-50 run as its profile, its decisions exported."""
    import shlex
    from pathlib import Path

    script = (Path(__file__).parents[1] / "bench" / "gpu_check.sh").read_text()
    body = script.split("run_tune() {", 1)[1].split("\n}", 1)[0].replace("\\\n", " ")
    words = shlex.split(body.split(">", 1)[0].split("python3 -m", 1)[1])
    cfg, args = tune.parse(words[words.index("fastresnet.tune") + 1:])
    assert (cfg.model, cfg.data.batch_size, cfg.data.image_size, cfg.amp, cfg.fused_blocks, cfg.compile) == (
        "resnet50", 256, 224, "bf16", "on", "default")
    assert args.export == "$out/decisions.json" and args.steps == 1


@pytest.mark.parametrize("command", ["train", "tune"])
def test_a_bad_tuning_switch_stops_a_command_before_it_starts(command, monkeypatch, capsys):
    import importlib

    monkeypatch.setenv("FASTRESNET_DISPATCH", "triton")  # the pre-namespace form: now an error, not ignored
    assert importlib.import_module(f"fastresnet.{command}").main([]) == 2
    err = capsys.readouterr().err
    assert "FASTRESNET_DISPATCH: 'triton' is neither" in err and "conv_bn_act" in err
