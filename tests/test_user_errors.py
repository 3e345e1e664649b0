"""A user's mistake or a damaged input ends every command with one line naming the thing and exit 2.

Each kind of case is one parametrized test: flags and values, damaged checkpoints (through
`train --resume` and `evaluate --checkpoint`), damaged datasets met during training and by
`verify`, run directories that exist, and a full disk. Nothing the user had may change.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_helpers import add_bad_file, idx_bytes, small_folder, write_fake_fashion_mnist

from fastresnet.data import dali_available
from fastresnet.data.__main__ import main as data_main
from fastresnet.evaluate import main as evaluate_main
from fastresnet.train import main as train_main
from fastresnet.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
# Nothing but the steps: 2 batches of 4 random 8-pixel images per epoch
SYNTHETIC = ["--data.backend", "synthetic", "--data.image_size", "8", "--data.batch_size", "4", "--data.num_classes",
             "10", "--data.synthetic_steps", "2", "--data.synthetic_val_steps", "1", "--progress", "off",
             "--plot", "false"]
# The same for a small ImageFolder (tests/data_helpers.small_folder) at 32 pixels
FOLDER = ["--data.image_size", "32", "--data.batch_size", "2", "--data.workers", "0", "--unit", "epoch",
          "--length", "1", "--progress", "lines", "--plot", "false", "--eval_every", "0"]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_train.py: far faster on a loaded 2-core machine
    yield
    torch.set_num_threads(previous)


def one_line_error(capsys, *texts: str) -> str:
    """The command's stderr: exactly one line, `error: ...`, holding every one of `texts`."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line:\n{err}"
    for text in texts:
        assert text in lines[0], f"{text!r} missing from: {lines[0]}"
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` and a hash of its bytes: what 'nothing changed' compares."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- flags and values


BAD_FLAGS = [
    (["--data.batch_size", "2.5e0"], "expected a whole number"),
    (["--data.val_batch_size", "0"], "val_batch_size must be >= 1"),
    (["--data.val_batch_size", "-3"], "val_batch_size must be >= 1"),
    (["--data.batch_size", "-5"], "batch_size must be >= 1"),
    (["--data.rrc_scale", "0.9,0.1"], "rrc_scale must be (min, max)"),  # reversed
    (["--data.rrc_scale", "0,0"], "rrc_scale must be (min, max)"),  # empty
    (["--data.rrc_scale=-0.5,1"], "rrc_scale must be (min, max)"),  # negative
    (["--data.scale_range", "480,256"], "scale_range must be (min, max)"),  # reversed
    (["--data.val_resize", "0"], "val_resize must be >= 1"),
    (["--data.lighting_std", "-1"], "lighting_std must be >= 0"),
    (["--shortcut", "B", "--model", "plain20"], "plain20 is a plain net"),
    (["--data.root", "{tmp}"], "the digits back end reads no dataset folder"),
    (["--run_name", ".."], "a run name is one folder name"),
    (["--run_name", "."], "a run name is one folder name"),
    (["--out_dir", "{tmp}/a-file"], "that is a file, not a folder"),
    (["--resume", "{tmp}/nowhere"], "no run directory there"),
    (["--lr"], "argument --lr: expected one argument"),
    (["--lr_milestones", "0.5"], "the cosine schedule does not use them"),
    (["--data.num_classes", "3"], "--data.num_classes 3: the digits back end has 10 classes"),
    (["--data.image_size", "32", "--data.val_resize", "8"], "val_resize (8 pixels) must be >= image_size (32)"),
    (["--seed", "-1"], "seed must be in [0, 2**32)"),
]
if not torch.cuda.is_available():
    BAD_FLAGS.append((["--device", "cuda"], "no CUDA GPU is visible"))


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_bad_flag_is_one_line_and_exit_2_before_anything_starts(tmp_path, capsys, argv, message):
    (tmp_path / "a-file").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out_dir = [] if "--out_dir" in argv else ["--out_dir", str(tmp_path / "runs")]
    short = ["--unit", "step", "--length", "1", "--progress", "off"]  # should the flag be taken, a short run
    assert train_main([*short, *argv, *out_dir]) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "runs").exists(), "nothing may start on a bad flag"


def test_ten_crops_of_an_image_smaller_than_the_crop_are_refused(tmp_path, capsys):
    """val_resize under the crop leaves nothing to cut ten crops from: each would be the whole image."""
    small_folder(tmp_path / "data")
    argv = [*FOLDER, "--data.backend", "torchvision", "--data.root", str(tmp_path / "data"), "--data.val_resize", "8",
            "--data.ten_crop", "true", "--out_dir", str(tmp_path / "runs")]
    assert train_main(argv) == 2
    one_line_error(capsys, "val_resize (8 pixels) must be >= image_size (32)")
    assert not (tmp_path / "runs").exists()


def test_a_class_count_that_the_data_fixes_is_refused_and_one_that_fits_is_taken(tmp_path, capsys):
    small_folder(tmp_path / "data")  # two classes
    argv = [*FOLDER, "--data.backend", "torchvision", "--data.root", str(tmp_path / "data"),
            "--out_dir", str(tmp_path / "runs"), "--unit", "step"]
    assert train_main([*argv, "--data.num_classes", "5"]) == 2
    one_line_error(capsys, "--data.num_classes 5: the torchvision back end has 2 classes")
    assert train_main([*argv, "--data.num_classes", "2"]) == 0


def test_a_config_saved_when_num_classes_defaulted_to_1000_still_serves():
    """Runs saved before num_classes became optional hold 1000 on every back end; read as not given, a digits
    run's config builds its 10 classes as it did then."""
    from fastresnet.data import build_loaders
    from fastresnet.training.config import TrainConfig, saved_values
    from fastresnet.training.fields import apply_flat, to_dict

    saved = to_dict(TrainConfig())
    saved["data"]["num_classes"] = 1000
    cfg = apply_flat(TrainConfig(), saved_values(saved), "an old config.json")
    assert cfg.data.num_classes is None
    assert build_loaders(cfg.data, device=torch.device("cpu")).num_classes == 10


def test_a_training_set_smaller_than_a_batch_says_what_to_change(tmp_path, capsys):
    root = write_fake_fashion_mnist(tmp_path / "fm")  # 24 training images
    argv = ["--data.backend", "fashion-mnist", "--data.root", str(root), "--data.batch_size", "32",
            "--out_dir", str(tmp_path / "runs"), "--progress", "off", "--unit", "step", "--length", "1"]
    assert train_main(argv) == 2
    one_line_error(capsys, "24 images per epoch for this process, against --data.batch_size 32",
                   "lower --data.batch_size to 24 or less, or give --data.drop_last false")
    assert train_main([*argv, "--data.drop_last", "false"]) == 0


def test_tune_on_a_dataset_whose_counts_disagree_is_one_line(tmp_path, capsys):
    from fastresnet import tune

    root = write_fake_fashion_mnist(tmp_path / "fm")
    labels = root / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(torch.zeros(20), 0x801)))
    assert tune.main(["--data.backend", "fashion-mnist", "--data.root", str(root), "--data.batch_size", "4"]) == 2
    one_line_error(capsys, "holds 24 images but", f"{labels} 20 labels")


# --- damaged checkpoints, through train --resume and evaluate --checkpoint


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    torch.set_num_threads(1)
    assert train_main([*SYNTHETIC, "--unit", "step", "--length", "2", "--out_dir", str(out), "--run_name", "run"]) == 0
    return out / "run"


def other_models_weights(path: Path) -> None:
    from fastresnet.models import get_model

    state = torch.load(path, weights_only=True)
    state["model"] = get_model("resnet32", num_classes=10).state_dict()
    torch.save(state, path)


class Pickled:  # an object torch.load(weights_only=True) refuses to build
    pass


DAMAGES = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "zero bytes": lambda p: p.write_bytes(b""),
    "random bytes": lambda p: p.write_bytes(os.urandom(4096)),
    "foreign torch file": lambda p: torch.save({"weights": torch.ones(3)}, p),
    "pickled object": lambda p: p.write_bytes(pickle.dumps(Pickled(), protocol=2)),
    "another model's weights": other_models_weights,
    "missing": lambda p: p.unlink(),
}
MESSAGES = {
    "truncated": "cannot read checkpoint", "zero bytes": "cannot read checkpoint",
    "random bytes": "cannot read checkpoint", "foreign torch file": "is not a fastresnet checkpoint",
    "pickled object": "cannot read checkpoint", "another model's weights": "do not fit resnet20",
    "missing": "no checkpoint at",
}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("command", ["train --resume", "evaluate"])
def test_a_damaged_checkpoint_is_one_line_and_exit_2(finished_run, tmp_path, capsys, damage, command):
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    DAMAGES[damage](run / "checkpoint.pt")
    before = digest(run)
    if command == "evaluate":
        status = evaluate_main(["--checkpoint", str(run)])
    else:
        status = train_main(["--resume", str(run), "--length", "4"])
    assert status == 2
    line = one_line_error(capsys, MESSAGES[damage])
    assert str(run) in line
    assert digest(run) == before, "a failed resume must change nothing in the run directory"


RESUME_MISTAKES = [
    (["--model", "resnet32"], "--model 'resnet32' differs from the run's 'resnet20'"),
    (["--data.batch_size", "8"], "--data.batch_size 8 differs from the run's 4"),
    (["--seed", "3"], "--seed 3 differs"),
    (["--shortcut", "B"], "--shortcut 'B' differs"),
]


@pytest.mark.parametrize("argv, message", RESUME_MISTAKES)
def test_a_resume_that_changes_what_the_checkpoint_counts_by_is_refused(finished_run, tmp_path, capsys, argv, message):
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    before = digest(run)
    assert train_main(["--resume", str(run), "--length", "4", *argv]) == 2
    one_line_error(capsys, message, f"--resume {run}")
    assert digest(run) == before


@pytest.mark.parametrize("config", ["{not json", "[1, 2]", ""])
def test_a_damaged_config_json_is_one_line_and_the_checkpoint_copy_serves_once_it_is_removed(
        finished_run, tmp_path, capsys, config):
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    (run / "config.json").write_text(config)
    before = digest(run)
    assert train_main(["--resume", str(run)]) == 2
    one_line_error(capsys, str(run / "config.json"), "delete it")
    assert digest(run) == before
    (run / "config.json").unlink()
    assert train_main(["--resume", str(run), "--length", "3"]) == 0
    assert load_checkpoint(run)["step"] == 3


@pytest.mark.parametrize("main, argv, message", [
    (evaluate_main, [], "the following arguments are required: --checkpoint"),
    (data_main, ["verify"], "the following arguments are required: root"),
    (data_main, ["verify", "x", "--workers", "many"], "invalid int value: 'many'"),
    (data_main, ["convert"], "invalid choice: 'convert'"),
])
def test_an_argument_the_parser_refuses_is_one_line_too(capsys, main, argv, message):
    assert main(argv) == 2
    one_line_error(capsys, message)


def test_evaluate_with_another_model_names_both(finished_run, capsys):
    assert evaluate_main(["--checkpoint", str(finished_run), "--model", "resnet32"]) == 2
    one_line_error(capsys, "--model: python -m fastresnet.evaluate does not use it", "come from the checkpoint")
    assert evaluate_main(["--checkpoint", str(finished_run), "--data.num_classes", "7"]) == 2
    one_line_error(capsys, "holds weights of resnet20 that do not fit resnet20 with 7 classes")


# --- run directories


def test_a_run_directory_that_exists_is_never_written_into_by_a_new_run(finished_run, capsys):
    before = digest(finished_run)
    assert train_main([*SYNTHETIC, "--out_dir", str(finished_run.parent), "--run_name", "run"]) == 2
    one_line_error(capsys, f"run directory {finished_run} exists", f"--resume {finished_run}")
    assert digest(finished_run) == before


def test_default_run_names_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    from fastresnet.training import rundir
    from fastresnet.training.config import TrainConfig

    monkeypatch.setattr(rundir, "default_run_name", lambda cfg: "resnet20-digits-20260101-000000")
    cfg = TrainConfig(out_dir=str(tmp_path))
    first, second = rundir.create_run_dir(cfg), rundir.create_run_dir(cfg)
    assert (first.name, second.name) == ("resnet20-digits-20260101-000000", "resnet20-digits-20260101-000000-2")


# --- damaged datasets, met while training


def bad_during_training(root: Path, kind: str) -> Path:
    small_folder(root)
    return add_bad_file(root, kind)


BACKENDS = ["torchvision", "torchvision-workers", "nvjpeg"] + (["dali"] if dali_available() else [])


# Every kind on every back end is tests/test_data_bad_input.py's; here: what reaches the command line
MET_IN_TRAINING = [(backend, "corrupt_jpeg") for backend in BACKENDS] + [("nvjpeg", "broken_after_header")] + (
    [("dali", "refused_by_libjpeg")] if dali_available() else [])


@pytest.mark.parametrize("backend, kind", MET_IN_TRAINING)
def test_a_bad_image_met_in_training_is_one_line_and_the_progress_is_kept(tmp_path, capsys, backend, kind):
    bad = bad_during_training(tmp_path / "data", kind)
    workers = ["--data.workers", "1"] if backend == "torchvision-workers" else []
    argv = [*FOLDER, *workers, "--data.backend", backend.split("-")[0], "--data.root", str(tmp_path / "data"),
            "--out_dir", str(tmp_path / "runs"), "--run_name", "run"]
    assert train_main(argv) == 2
    line = one_line_error(capsys, bad.name, "--data.bad_files skip", f"--resume {tmp_path / 'runs' / 'run'}")
    saved = re.search(r"checkpoint saved at step (\d+)", line)
    if saved:  # the bad file was met after the first step
        assert load_checkpoint(tmp_path / "runs" / "run")["step"] == int(saved.group(1))


def broken_link(root: Path) -> Path:
    small_folder(root)
    link = root / "train" / "a" / "gone.JPEG"
    link.symlink_to(root / "train" / "a" / "deleted-long-ago.JPEG")
    return link


def test_a_broken_symlink_stops_training_at_the_start_naming_it(tmp_path, capsys):
    link = broken_link(tmp_path / "data")
    argv = [*FOLDER, "--data.backend", "torchvision", "--data.root", str(tmp_path / "data"),
            "--out_dir", str(tmp_path / "runs")]
    assert train_main(argv) == 2
    one_line_error(capsys, str(link), "broken symbolic link")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("batch_size", ["1", "2"])  # 1: every bad file is a whole batch
def test_skipped_files_are_reported_by_path_and_a_whole_bad_batch_shortens_the_epoch(tmp_path, capsys, batch_size):
    root = tmp_path / "data"
    link = broken_link(root)
    bad = add_bad_file(root, "corrupt_jpeg")
    argv = [*FOLDER, "--data.backend", "torchvision", "--data.root", str(root), "--data.bad_files", "skip",
            "--data.batch_size", batch_size, "--data.drop_last", "false", "--length", "2",
            "--out_dir", str(tmp_path / "runs"), "--run_name", "run"]
    assert train_main(argv) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "skipped_files.txt" in out
    listed = (tmp_path / "runs" / "run" / "skipped_files.txt").read_text().splitlines()
    assert sorted(line.split(": ")[0] for line in listed) == sorted([str(link), str(bad)])  # each once
    assert load_checkpoint(tmp_path / "runs" / "run")["epoch"] == 2


def test_verify_lists_a_broken_symlink_with_every_other_problem(tmp_path, capsys):
    link = broken_link(tmp_path)
    bad = add_bad_file(tmp_path, "truncated_jpeg")
    assert data_main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"error  {link}: a broken symbolic link" in out and f"error  {bad}" in out
    assert "2 error(s)" in out


@pytest.mark.parametrize("target, message", [("missing", "no such folder"), ("a-file", "that is a file"),
                                             ("empty", "not a dataset folder that verify knows")])
def test_verify_of_no_dataset_is_one_line_naming_the_formats(tmp_path, capsys, target, message):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty").mkdir()
    assert data_main(["verify", str(tmp_path / target)]) == 2
    one_line_error(capsys, f"verify {tmp_path / target}: {message}", "ImageFolder", "cifar-10-batches-py",
                   "Fashion-MNIST")


def test_verify_says_that_a_folder_without_val_cannot_train(tmp_path, capsys):
    small_folder(tmp_path)
    shutil.rmtree(tmp_path / "val")
    assert data_main(["verify", str(tmp_path)]) == 1
    assert f"error  {tmp_path / 'val'}: missing" in capsys.readouterr().out


@pytest.mark.parametrize("target", ["a-file", "not-empty"])
def test_make_fake_imagenet_never_writes_into_what_exists(tmp_path, capsys, target):
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "not-empty").mkdir()
    (tmp_path / "not-empty" / "mine.txt").write_text("mine")
    before = digest(tmp_path)
    assert data_main(["make-fake-imagenet", str(tmp_path / target), "--classes", "1", "--images-per-class", "1"]) == 2
    one_line_error(capsys, str(tmp_path / target), "give a new folder")
    assert digest(tmp_path) == before


# --- a full disk


def test_a_checkpoint_that_does_not_fit_says_how_much_and_keeps_the_last_good_one(tmp_path, capsys, monkeypatch):
    from fastresnet.training import checkpoint

    real = shutil.disk_usage
    saves = []

    def disk_usage(path):  # room for the first checkpoint only
        usage = real(path)
        saves.append(path)
        return usage if len(saves) == 1 else usage._replace(free=1_000_000)

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", disk_usage)
    argv = [*SYNTHETIC, "--unit", "epoch", "--length", "2", "--out_dir", str(tmp_path), "--run_name", "run"]
    assert train_main(argv) == 2
    one_line_error(capsys, f"no space left on {tmp_path / 'run'}", "MB needed", "1.0 MB free",
                   "the last good checkpoint", "--resume")
    assert load_checkpoint(tmp_path / "run")["step"] == 2  # the end of epoch 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []


def test_a_disk_that_fills_during_the_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from fastresnet.training import checkpoint

    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"format": 1, "step": 1}, path)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(checkpoint.NoSpaceError, match=f"no space left on {tmp_path}: .* MB needed"):
        checkpoint.save_atomic({"format": 1, "step": 2, "w": torch.zeros(10**5)}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_temporary_files_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    from fastresnet.training.checkpoint import save_atomic

    for pid in (4242, 4343):
        (tmp_path / f".checkpoint.pt.tmp-{pid}").write_bytes(b"half a checkpoint")
    save_atomic({"format": 1, "step": 3}, tmp_path / "checkpoint.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.slow
def test_a_real_full_disk_keeps_the_last_good_checkpoint(tmp_path):
    """On a 4 MB tmpfs (a private mount namespace: no root needed where user namespaces are allowed),
    the first checkpoint (2.3 MB) fits and the second does not."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=4m tmpfs {disk}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.decode().strip()}")
    train = [sys.executable, "-m", "fastresnet.train", *SYNTHETIC, "--unit", "epoch", "--length", "2",
             "--out_dir", str(disk), "--run_name", "run"]
    script = (f"mount -t tmpfs -o size=4m tmpfs {disk} && cd {shlex.quote(str(REPO))} && "
              f"{{ {shlex.join(train)}; echo status $?; }} && cp -a {disk}/run {tmp_path}/after")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = result.stdout + result.stderr
    assert "status 2" in out, out
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"no space left on {disk / 'run'}" in errors[0] and "MB needed" in errors[0], out
    assert load_checkpoint(tmp_path / "after")["step"] == 2  # the checkpoint of epoch 1, intact
    assert not list((tmp_path / "after").glob(".checkpoint.pt.tmp*"))
