"""The training program end to end on the CPU: default run, accuracy, resume, signals, DDP."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastresnet.data import DataConfig
from fastresnet.training import NonFiniteLoss, TrainConfig, train
from fastresnet.testing import spawn_ranks
from fastresnet.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    # One intra-op thread: on a shared 2-core CI machine, two OpenMP threads per process
    # run up to 8x slower than one when other jobs compete for the cores (measured).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def digits_config(tmp_path: Path, **changes) -> TrainConfig:
    data = changes.pop("data", DataConfig(backend="digits", batch_size=128))
    defaults = dict(out_dir=str(tmp_path), run_name="run", progress="off", plot=False, data=data)
    defaults.update(changes)
    return TrainConfig(**defaults)


def run_module(*args: str, timeout: float = 120, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def test_default_run_completes_and_says_where_outputs_went(tmp_path):
    # The defaults exactly, except a shorter length (the full default is 15 epochs, under a minute).
    proc = run_module("fastresnet.train", "--length", "0.3", "--out_dir", str(tmp_path), "--run_name", "default")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    for text in ("training resnet20", "img/s", "loss", "train err", "top-1", "outputs in"):
        assert text in out, f"{text!r} missing from the output:\n{out}"
    run = tmp_path / "default"
    for name in ("config.json", "env.json", "metrics.jsonl", "curves.png", "checkpoint.pt"):
        assert (run / name).is_file(), name
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["git_revision"]
    # the command as typed, so that pasting it reruns the run; the CPU named as the tuning cache names it
    assert shlex.split(env["command"])[1:] == ["-m", "fastresnet.train", "--length", "0.3", "--out_dir", str(tmp_path),
                                               "--run_name", "default"]
    if not torch.cuda.is_available():
        assert env["device_name"].endswith("] 1 threads"), env["device_name"]  # OMP_NUM_THREADS=1
    assert env["speed"]["fused_blocks"] == "off" and env["speed"]["compile"] == "off"  # auto on a CPU
    assert "fused blocks off" in out
    choice = env["speed"]["amp_choice"]  # what --amp auto resolved to, and why, in env.json and the first lines
    assert env["speed"]["amp"] == choice["amp"] and f"speed: amp {choice['amp']} ({choice['source']}" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "eval"} <= {r["kind"] for r in records}

    # Standalone evaluation of the checkpoint gives the run's own final test accuracy.
    from fastresnet.evaluate import main as evaluate_main

    assert evaluate_main(["--checkpoint", str(run), "--output", str(tmp_path / "eval.json")]) == 0
    standalone = json.loads((tmp_path / "eval.json").read_text())
    final = [r for r in records if r["kind"] == "eval"][-1]
    assert standalone["top1"] == pytest.approx(final["top1"]) and standalone["images"] == 297


def test_resnet20_on_digits_reaches_95_percent(tmp_path):
    # Measured: 97.6% test accuracy after 4 epochs at batch 64 for seeds 0 and 1 (and 98-99% after
    # 8 epochs at batch 128 for seeds 0, 1, 2); 5,600 training images, ~10 s on 2 idle CPU cores.
    data = DataConfig(backend="digits", batch_size=64)
    result = train(digits_config(tmp_path, data=data, length=4, eval_every=0, seed=0))
    assert result["status"] == "completed"
    assert result["test_top1"] >= 95.0, result


def _weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir)["model"]


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path):
    # batch 64: 22 steps per epoch; the interruption is mid-epoch and the resumed run crosses an epoch end.
    data = DataConfig(backend="digits", batch_size=64)
    common = dict(data=data, unit="step", length=26, schedule="cosine", warmup=4, warmup_lr=0.01, log_every=4)
    straight = train(digits_config(tmp_path, run_name="straight", **common))
    first = train(digits_config(tmp_path, run_name="resumed", stop_at_step=10, **common))
    assert first["status"] == "stopped-at-step" and first["step"] == 10
    state = load_checkpoint(Path(first["run_dir"]))
    assert (state["epoch"], state["batches_done"], state["step"]) == (0, 10, 10)
    second = train(digits_config(tmp_path, run_name="resumed", **common), resume=first["run_dir"])
    assert second["status"] == "completed" and second["step"] == 26
    env = json.loads((Path(second["run_dir"]) / "env.json").read_text())
    assert env["started_at_step"] == 10  # and the first start's record kept, in order
    assert [start["started_at_step"] for start in env["earlier_starts"]] == [0]
    assert "earlier_starts" not in env["earlier_starts"][0]

    expected, actual = _weights(Path(straight["run_dir"])), _weights(Path(second["run_dir"]))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs after resume"
    assert second["test_top1"] == straight["test_top1"]


def test_sigterm_finishes_the_step_saves_and_exits_cleanly(tmp_path):
    proc = run_module("fastresnet.train", "--length", "1000", "--log_every", "1", "--progress", "lines",
                      "--out_dir", str(tmp_path), "--run_name", "preempted")
    lines = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("step 2/"):
            break
    else:
        proc.kill()
        pytest.fail("no training step within 90 s:\n" + "".join(lines))
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    out = "".join(lines) + out
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM" in out and "--resume" in out
    state = load_checkpoint(tmp_path / "preempted")
    assert 2 <= state["step"] < 1000 * 11
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from fastresnet.training import loop

    original = loop.Trainer._step

    def poisoned_step(self, images, labels):  # from step 13 on, the inputs are NaN
        return original(self, images * float("nan") if self.step >= 13 else images, labels)

    monkeypatch.setattr(loop.Trainer, "_step", poisoned_step)
    cfg = digits_config(tmp_path, length=3, log_every=5, eval_every=1, checkpoint_every=1)
    with pytest.raises(NonFiniteLoss, match="NaN or infinite.*last good checkpoint is kept"):
        train(cfg)
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 11  # the end of epoch 1, before the poison
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def _ddp_worker(rank: int, port: int, world_size: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fastresnet.training import distributed
    from fastresnet.training.loop import Trainer
    from fastresnet.training.signals import StopRequest

    cfg = digits_config(Path(out), data=DataConfig(backend="digits", batch_size=32), unit="step", length=12,
                        log_every=4, device="cpu")
    info, device = distributed.setup(cfg.device, cfg.dist_backend)
    try:
        trainer = Trainer(cfg, info, device, None, StopRequest())
        result = trainer.run()
        torch.save({"weights": trainer.model.state_dict(), "result": result}, Path(out) / f"rank{rank}.pt")
    finally:
        distributed.teardown()


def test_two_process_gloo_ddp_ranks_end_with_identical_weights(tmp_path):
    spawn_ranks(_ddp_worker, 2, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for name, tensor in rank0["weights"].items():
        assert torch.equal(tensor, rank1["weights"][name]), f"{name} differs between ranks"
    # Metrics are all-reduced: both ranks report the same test accuracy over the whole test set.
    assert rank0["result"]["test_top1"] == rank1["result"]["test_top1"]
    assert rank0["result"]["test_images"] == 297
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["run"]  # only rank 0 wrote a run dir


def test_fused_blocks_train_like_the_plain_blocks_and_keep_the_state_dict(tmp_path, monkeypatch):
    # fused_blocks=on swaps in fastresnet.nn.FusedBasicBlock: the same losses step for step and the
    # same checkpoint keys as the plain model. The reference path, as a CPU run without the Triton
    # interpreter takes (the interpreter would cost minutes here; the kernels have their own tests).
    monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1")
    runs = {}
    for fused in ("off", "on"):
        torch.manual_seed(0)
        cfg = digits_config(tmp_path, run_name=f"fused-{fused}", fused_blocks=fused, data=DataConfig(
            backend="digits", batch_size=64), unit="step", length=6, log_every=1)
        train(cfg)
        run = tmp_path / f"fused-{fused}"
        losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                  if r["kind"] == "train"]
        runs[fused] = (losses, _weights(run))
    (plain_losses, plain_weights), (fused_losses, fused_weights) = runs["off"], runs["on"]
    assert len(fused_losses) >= 5
    assert fused_losses == pytest.approx(plain_losses, rel=1e-3, abs=1e-4)
    assert fused_weights.keys() == plain_weights.keys()


# --- what a newcomer reads of a run: its first figures, config.json, curves.png, a resume of a finished run


def digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


SHORT_RUN = ["--unit", "step", "--length", "2", "--log_every", "1", "--progress", "lines", "--plot", "true"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A two-step digits run that logs every step, and the figures its curves.png was drawn from."""
    from matplotlib.figure import Figure

    from fastresnet.train import main as train_main

    out, figures, save = tmp_path_factory.mktemp("short"), [], Figure.savefig

    def recording_savefig(figure, *args, **kwargs):
        figures.append(figure)
        return save(figure, *args, **kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "savefig", recording_savefig)
        assert train_main([*SHORT_RUN, "--out_dir", str(out), "--run_name", "run"]) == 0
    torch.set_num_threads(threads)
    return out / "run", figures


def test_the_first_logged_speed_is_a_measured_figure(short_run):
    run, _ = short_run
    first = next(r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train")
    assert first["step"] == 1 and first["images_per_s"] > 0 and first["compute_images_per_s"] > 0, first
    assert first["tflops"] > 0


def test_config_json_holds_the_settings_the_back_end_reads_and_loads_back(short_run):
    from fastresnet.train import parse
    from fastresnet.training.config import saved_values
    from fastresnet.training.fields import apply_flat

    run, _ = short_run
    config = json.loads((run / "config.json").read_text())
    # num_classes: unset, the data's count (a number given is checked against it on every back end)
    assert sorted(config["data"]) == ["backend", "batch_size", "drop_last", "dtype", "num_classes",
                                      "val_batch_size"], config["data"]
    assert config["data"]["num_classes"] is None
    ran = parse([*SHORT_RUN, "--out_dir", str(run.parent), "--run_name", "run"]).config
    assert apply_flat(TrainConfig(), saved_values(config), "config.json") == ran
    saved = load_checkpoint(run)["config"]  # the checkpoint's copy, which resume falls back on: the same record
    assert saved["data"] == config["data"] and apply_flat(TrainConfig(), saved_values(saved), "checkpoint") == ran


def test_curves_have_a_legend_on_both_panels_and_name_the_data_set(short_run):
    _, figures = short_run
    figure = figures[-1]
    error_axes, loss_axes = figure.axes[:2]
    labels = [[text.get_text() for text in axes.get_legend().get_texts()] for axes in (error_axes, loss_axes)]
    assert labels == [["train error", "test error"], ["train loss", "learning rate"]]
    assert figure.get_suptitle() == "resnet20 on digits"


def test_resuming_a_finished_run_says_so_and_changes_nothing_and_a_longer_length_extends_it(short_run, tmp_path,
                                                                                           capsys):
    from fastresnet.train import main as train_main

    run = Path(shutil.copytree(short_run[0], tmp_path / "run"))
    before = digest(run)
    capsys.readouterr()
    assert train_main(["--resume", str(run)]) == 0
    assert digest(run) == before
    out = capsys.readouterr().out
    assert f"{run} is finished (step 2 of 2" in out and "nothing changed" in out, out

    assert train_main(["--resume", str(run), "--length", "3"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 3]
    assert load_checkpoint(run)["step"] == 3


def test_a_finished_run_whose_checkpoint_does_not_record_its_final_test_runs_it_once_and_then_is_finished(
        short_run, tmp_path, capsys):
    """A checkpoint saved before its run's final test, or written before checkpoints recorded the step of
    their last evaluation: the first resume tests once more and records it; the next says finished."""
    from fastresnet.train import main as train_main
    from fastresnet.training.checkpoint import CHECKPOINT_NAME, save_atomic

    run = Path(shutil.copytree(short_run[0], tmp_path / "run"))
    state = load_checkpoint(run)
    del state["evaluated_at"]
    save_atomic(state, run / CHECKPOINT_NAME)
    assert train_main(["--resume", str(run)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 2]
    assert load_checkpoint(run)["evaluated_at"] == 2
    before = digest(run)
    capsys.readouterr()
    assert train_main(["--resume", str(run)]) == 0
    assert digest(run) == before and "is finished" in capsys.readouterr().out
