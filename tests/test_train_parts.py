"""The training program's parts: config and CLI, schedule, checkpoints, metrics, evaluation, plots."""

from __future__ import annotations

import math

import pytest
import torch

from fastresnet.training import ConfigError, TrainConfig, evaluate_model, validate
from fastresnet.training.checkpoint import CheckpointError, capture_rng, load_checkpoint, restore_rng, save_atomic
from fastresnet.train import parse as parse_invocation
from fastresnet.training.metrics import EvalAccumulator, TrainAccumulator
from fastresnet.training.schedule import LRSchedule, ScheduleSpec

# --- configuration


def parse(*argv: str) -> TrainConfig:
    cfg = parse_invocation(list(argv)).config
    validate(cfg)
    return cfg


def test_flags_override_recipe_which_overrides_defaults():
    assert parse().model == "resnet20" and parse().data.backend == "digits"
    cfg = parse("--recipe", "paper-cifar", "--lr", "0.05", "--data.batch-size", "64")
    assert (cfg.lr, cfg.data.batch_size, cfg.lr_milestones, cfg.length, cfg.unit) == (0.05, 64, (32000, 48000), 64000, "step")
    assert cfg.data.backend == "cifar10" and cfg.weight_decay == 1e-4 and cfg.momentum == 0.9


def test_paper_cifar_warms_up_resnet110_only():
    r110 = parse("--recipe", "paper-cifar", "--model", "resnet110")
    assert (r110.warmup_kind, r110.warmup_lr, r110.warmup_until_train_error) == ("constant", 0.01, 80.0)
    r56 = parse("--recipe", "paper-cifar", "--model", "resnet56")
    assert r56.warmup_until_train_error == 0 and r56.warmup == 0


@pytest.mark.parametrize("recipe, data", [("paper-cifar", []), ("paper-imagenet", ["--data.root", "imagenet"]),
                                          ("fast-imagenet", ["--data.root", "imagenet"])])
def test_every_recipe_is_valid(recipe, data):
    cfg = parse("--recipe", recipe, *data)
    assert cfg.momentum > 0 and cfg.lr > 0


def test_an_imagenet_recipe_without_its_folder_is_refused_not_run_on_digits():
    with pytest.raises(ConfigError, match=r"--data.recipe paper-scale: the digits back end \(auto's choice without "
                       r"--data.root\) does not read it"):
        parse("--recipe", "paper-imagenet")


def test_fast_imagenet_recipe_is_the_modern_one():
    cfg = parse("--recipe", "fast-imagenet")
    assert cfg.schedule == "cosine" and cfg.warmup > 0 and cfg.label_smoothing > 0 and cfg.no_bn_bias_decay
    assert cfg.base_batch_size == 256


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lrr", "0.1"], "unknown config field 'lrr'; did you mean lr"),
        (["--data.batchsize", "3"], "data.batch_size"),
        (["--lr", "fast"], "bad value for lr: 'fast'"),
        (["--schedule", "linear"], "choose one of constant, step, cosine, plateau"),
        (["--channels_last", "maybe"], "bad value for channels_last"),
        (["--data.backend", "imagenet22k"], "DataConfig.backend must be one of"),
        (["--data.batch_size", "0"], "batch_size must be >= 1"),
        (["--recipe", "paper-mnist"], "unknown recipe 'paper-mnist'"),
        (["--model", "resnet19"], "model 'resnet19' is not in the zoo"),
        (["--schedule", "step"], "needs lr_milestones"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--lr_milestones", "30,20", "--schedule", "step"], "must ascend"),
        (["--device", "tpu"], "device"),
        (["positional"], "unexpected argument"),
    ],
)
def test_bad_config_is_a_clear_error_before_anything_starts(argv, message, capsys, tmp_path):
    from fastresnet.train import main

    assert main([*argv, "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not any(tmp_path.iterdir()), "nothing may start (no run directory) on a bad config"


def test_resume_uses_the_saved_config_and_flags_still_win(tmp_path):
    from fastresnet.training.rundir import write_json
    from fastresnet.training.fields import to_dict

    run = tmp_path / "run"
    run.mkdir()
    write_json(run / "config.json", to_dict(TrainConfig(lr=0.3, length=4)))
    inv = parse_invocation(["--resume", str(run), "--length", "9"])
    assert (inv.config.lr, inv.config.length, inv.resume) == (0.3, 9.0, run)
    with pytest.raises(ConfigError, match="no run directory"):
        parse_invocation(["--resume", str(tmp_path / "missing")])


# --- learning-rate schedule


def spec(**changes) -> ScheduleSpec:
    base = dict(peak_lr=0.1, total_steps=100, kind="step", milestones=(50, 75), decay=10.0, min_lr=0.0,
                warmup_steps=0, warmup_kind="linear", warmup_lr=0.0, warmup_until_train_error=0.0,
                plateau_patience=2, plateau_threshold=0.1)
    base.update(changes)
    return ScheduleSpec(**base)


def test_step_schedule_divides_at_the_milestones():
    s = LRSchedule(spec())
    assert [s.lr_at(i) for i in (0, 49, 50, 74, 75, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_linear_warmup_then_cosine_to_min_lr():
    s = LRSchedule(spec(kind="cosine", warmup_steps=10, warmup_lr=0.0, min_lr=0.001))
    assert s.lr_at(0) == 0.0 and s.lr_at(5) == pytest.approx(0.05)
    assert s.lr_at(10) == pytest.approx(0.1) and s.lr_at(55) == pytest.approx(0.0505)
    assert s.lr_at(100) == pytest.approx(0.001)


def test_resnet110_warmup_holds_0_01_until_training_error_is_below_80_percent():
    s = LRSchedule(spec(warmup_kind="constant", warmup_lr=0.01, warmup_until_train_error=80.0))
    assert s.lr_at(0) == 0.01 and s.lr_at(30) == 0.01
    assert not s.observe_train_error(30, 85.0)
    assert s.lr_at(31) == 0.01
    assert s.observe_train_error(40, 79.0)
    assert s.lr_at(41) == 0.1 and s.lr_at(60) == pytest.approx(0.01)  # then the paper's schedule


def test_plateau_divides_after_patience_and_survives_a_state_round_trip():
    s = LRSchedule(spec(kind="plateau"))
    assert not s.observe_test_error(30.0)
    assert not s.observe_test_error(29.95)  # not better by 0.1 points
    assert s.observe_test_error(30.0)
    assert s.lr_at(10) == pytest.approx(0.01)
    again = LRSchedule(spec(kind="plateau"))
    again.load_state_dict(s.state_dict())
    assert again.lr_at(10) == pytest.approx(0.01)


# --- checkpoints


def test_checkpoint_round_trip_with_rng_states(tmp_path):
    rng = capture_rng()
    a = torch.rand(3)
    save_atomic({"format": 1, "x": torch.arange(5), "rng": rng}, tmp_path / "checkpoint.pt")
    state = load_checkpoint(tmp_path)
    assert torch.equal(state["x"], torch.arange(5))
    restore_rng(state["rng"])
    assert torch.equal(torch.rand(3), a)


def test_a_crash_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    import os

    path = tmp_path / "checkpoint.pt"
    save_atomic({"format": 1, "step": 1, "w": torch.ones(1000)}, path)
    real_fsync = os.fsync

    def crash_halfway(fd):
        os.ftruncate(fd, os.fstat(fd).st_size // 2)  # a torn write ...
        raise OSError("simulated crash: killed")  # ... then the crash

    monkeypatch.setattr(os, "fsync", crash_halfway)
    with pytest.raises(OSError, match="simulated crash"):
        save_atomic({"format": 1, "step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.setattr(os, "fsync", real_fsync)
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"], "the temporary file must not be left behind"


def test_a_torn_checkpoint_is_reported_not_loaded(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)


# --- metrics and evaluation


def test_train_accumulator_counts_loss_error_and_nonfinite_steps():
    acc = TrainAccumulator(torch.device("cpu"))
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])
    acc.add(torch.tensor(0.5), logits, labels)
    acc.add(torch.tensor(float("nan")), logits, labels)
    out = acc.read()
    assert out == {"loss": 0.5, "error": 25.0, "images": 8, "nonfinite_steps": 1}
    assert acc.sums.abs().sum() == 0  # reset after the read


def test_eval_accumulator_top1_and_top5():
    acc = EvalAccumulator(torch.device("cpu"))
    scores = torch.eye(6)[:, :6] + torch.linspace(0, 0.5, 6)  # image i scores class i highest
    labels = torch.tensor([0, 1, 2, 3, 4, 0])  # the last is wrong at top-1; class 0 is its 6th score
    acc.add(scores, labels, torch.tensor(3.0))
    out = acc.read()
    assert out["top1"] == pytest.approx(500 / 6) and out["top5"] == pytest.approx(500 / 6)
    assert out["loss"] == pytest.approx(0.5)


class TenCropLoader:
    crops = 10

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __iter__(self):
        yield self.images, self.labels


def test_ten_crop_evaluation_averages_softmax_over_the_crops():
    # Crop 0 of each image votes strongly for a wrong class; the other nine weakly for the right one.
    class Scores(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :3]

    labels = torch.tensor([1, 2])
    x = torch.zeros(2, 10, 3)
    x[:, 0, 0] = 4.0
    x[0, 1:, 1] = 1.0
    x[1, 1:, 2] = 1.0
    images = x.view(20, 3, 1, 1)
    out = evaluate_model(Scores(), TenCropLoader(images, labels), torch.device("cpu"), None)
    assert out["top1"] == 100.0 and out["images"] == 2
    single = evaluate_model(Scores(), [(images[::10], labels)], torch.device("cpu"), None)
    assert single["top1"] == 0.0  # crop 0 alone is wrong: the averaging is what makes it right


def test_curves_png_is_written(tmp_path):
    from fastresnet.training.metrics import JsonLines
    from fastresnet.training.plot import plot_curves

    log = JsonLines(tmp_path / "metrics.jsonl")
    for step in range(1, 5):
        log.write({"kind": "train", "step": step, "loss": 1 / step, "error": 50 / step, "lr": 0.1})
    log.write({"kind": "eval", "step": 4, "top1_error": 20.0})
    png = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_out_of_memory_says_what_to_change(monkeypatch, capsys, tmp_path):
    import fastresnet.train as train_module

    def oom(cfg, resume=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "train", oom)
    assert train_module.main(["--data.batch_size", "256", "--out_dir", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "out of" in err and "--data.batch_size 128" in err and "--amp bf16" in err


def test_lr_scales_linearly_with_the_global_batch(tmp_path):
    torch.set_num_threads(1)  # see tests/test_train.py: one thread is far faster on a loaded CPU
    from fastresnet.data import DataConfig
    from fastresnet.training import train

    cfg = TrainConfig(data=DataConfig(backend="digits", batch_size=64), lr=0.1, base_batch_size=128,
                      schedule="constant", unit="step", length=1, out_dir=str(tmp_path), progress="off", plot=False)
    train(cfg)
    from fastresnet.training.metrics import read_jsonl

    (record,) = [r for r in read_jsonl(next(tmp_path.iterdir()) / "metrics.jsonl") if r["kind"] == "train"]
    assert math.isclose(record["lr"], 0.05)
