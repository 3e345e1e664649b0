"""What every command writes is checked before it starts work, and nothing that exists is overwritten.

tune --export, the tuning cache, profile --out, experiments --out, evaluate --output and train's
--out_dir go through fastresnet.outputs: a path that cannot be written (a folder where a file goes, a
file where a folder goes or on the way to it, /proc, a read-only file system) or a result already
there is one `error:` line and exit 2, before the command's work, which these tests replace by a
failure.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_user_errors import digest, one_line_error

from fastresnet import profile, tune
from fastresnet.errors import UserError
from fastresnet.experiments.__main__ import main as experiments_main
from fastresnet.ops import tuning
from fastresnet.outputs import new_file, writable_folder
from fastresnet.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
TINY = ["--model", "resnet20", "--data.batch_size", "4", "--compile", "off", "--amp", "off"]


def must_not_run(*args, **kwargs):
    raise AssertionError("the command started its work before it checked where it writes")


@pytest.fixture
def places(tmp_path) -> Path:
    """A file and a folder to write at or under."""
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "a-folder").mkdir()
    return tmp_path


# Where a file cannot go: (the path under the fixture's folder, or absolute; words of the error). A
# read-only file system is test_a_read_only_file_system_is_one_line_and_exit_2's.
NOT_A_FILE = [
    ("a-folder", "that is a folder"),
    ("a-file/decisions.json", "is a file, so nothing can be made under it"),
    ("/proc/decisions.json", "cannot create files in /proc"),
    ("a-file", "that file exists"),
]
# Where a folder cannot go
NOT_A_FOLDER = [
    ("a-file", "that is a file, not a folder"),
    ("a-file/out", "is a file, so nothing can be made under it"),
    ("/proc/out", "cannot create files in /proc"),
]


def resolve(places: Path, path: str) -> Path:
    return Path(path) if path.startswith("/") else places / path


@pytest.mark.parametrize("path, message", NOT_A_FILE, ids=[p for p, _ in NOT_A_FILE])
def test_tune_checks_its_export_before_tuning(places, monkeypatch, capsys, path, message):
    monkeypatch.setattr(tune, "tune_run", must_not_run)
    target = resolve(places, path)
    before = digest(places)
    assert tune.main([*TINY, "--export", str(target)]) == 2
    one_line_error(capsys, f"--export {target}", message)
    assert digest(places) == before


@pytest.mark.parametrize("path, message", NOT_A_FOLDER, ids=[p for p, _ in NOT_A_FOLDER])
def test_the_tuning_cache_is_checked_before_an_import(places, monkeypatch, capsys, path, message):
    decisions = places / "a-folder" / "decisions.json"
    tuning.save_cache(decisions, tuning.environment_tag(CPU), {})  # a valid file of this machine
    cache = resolve(places, path)
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(cache))
    assert tune.main(["--import", str(decisions)]) == 2
    one_line_error(capsys, f"FASTRESNET_CACHE_DIR {cache}", message)


def test_tune_import_and_export_do_both(tmp_path, monkeypatch, capsys):
    """The imported decisions join the cache, which is then exported: one command moves a file's decisions
    into this machine's cache and writes what the cache holds now."""
    monkeypatch.setattr(tune, "tune_run", must_not_run)
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path / "cache"))
    tag = tuning.environment_tag(CPU)
    entries = {"k": {"op": "fused_block", "choice": "eager", "times_ms": {"eager": 1.0}}}
    tuning.save_cache(tmp_path / "valid.json", tag, entries)
    assert tune.main(["--import", str(tmp_path / "valid.json"), "--export", str(tmp_path / "both.json")]) == 0
    out = capsys.readouterr().out
    assert "1 decisions from" in out and f"written to {tmp_path / 'both.json'}" in out
    assert tuning.load_cache(tmp_path / "both.json", tag) == entries


@pytest.mark.parametrize("path, message", NOT_A_FOLDER, ids=[p for p, _ in NOT_A_FOLDER])
def test_profile_checks_its_out_before_profiling(places, monkeypatch, capsys, path, message):
    monkeypatch.setattr(profile, "run_profile", must_not_run)
    target = resolve(places, path)
    assert profile.main([*TINY, "--out", str(target)]) == 2
    one_line_error(capsys, f"--out {target}", message)


def test_profile_never_overwrites_a_profile(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(profile, "run_profile", must_not_run)
    (tmp_path / "profile.md").write_text("the user's own profile")
    before = digest(tmp_path)
    assert profile.main([*TINY, "--out", str(tmp_path)]) == 2
    one_line_error(capsys, f"--out {tmp_path}", "holds files already", "nothing is overwritten")
    assert digest(tmp_path) == before


def test_profile_of_a_resumed_run_never_overwrites_its_profile(tmp_path, monkeypatch, capsys):
    """train --profile N --resume RUN writes RUN/profile/: a second one is refused, not written over."""
    import fastresnet.profile

    monkeypatch.setattr(fastresnet.profile, "run_profile", must_not_run)
    run = tmp_path / "run"
    (run / "profile").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "profile" / "profile.md").write_text("the first profile")
    assert train_main(["--resume", str(run), "--profile", "1"]) == 2
    one_line_error(capsys, f"--resume {run}: its profile folder {run / 'profile'}", "holds files already")
    assert (run / "profile" / "profile.md").read_text() == "the first profile"


@pytest.mark.parametrize("path, message", NOT_A_FOLDER, ids=[p for p, _ in NOT_A_FOLDER])
def test_experiments_check_their_out_before_training(places, monkeypatch, capsys, path, message):
    from fastresnet.experiments import degradation

    monkeypatch.setattr(degradation, "main", must_not_run)
    target = resolve(places, path)
    assert experiments_main(["degradation", "--out", str(target)]) == 2
    one_line_error(capsys, f"--out {target}", message)


@pytest.mark.parametrize("path, message", NOT_A_FOLDER, ids=[p for p, _ in NOT_A_FOLDER])
def test_train_checks_its_out_dir_before_reading_data(places, monkeypatch, capsys, path, message):
    from fastresnet.training import loop

    monkeypatch.setattr(loop, "Trainer", must_not_run)
    target = resolve(places, path)
    assert train_main(["--out_dir", str(target)]) == 2
    one_line_error(capsys, f"--out_dir {target}", message)


def test_evaluate_never_overwrites_its_output(tmp_path, capsys):
    from test_user_errors import SYNTHETIC

    from fastresnet.evaluate import main as evaluate_main

    assert train_main([*SYNTHETIC, "--unit", "step", "--length", "1", "--out_dir", str(tmp_path),
                       "--run_name", "run"]) == 0
    (tmp_path / "eval.json").write_text("the user's results")
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "eval.json")]) == 2
    one_line_error(capsys, f"--output {tmp_path / 'eval.json'}", "that file exists")
    assert (tmp_path / "eval.json").read_text() == "the user's results"
    assert evaluate_main(["--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "new" / "eval.json")]) == 0
    assert (tmp_path / "new" / "eval.json").is_file()


@pytest.mark.parametrize("command", [["fastresnet.tune", "--export", "{ro}/decisions.json"],
                                     ["fastresnet.profile", "--out", "{ro}/profile"]])
def test_a_read_only_file_system_is_one_line_and_exit_2(tmp_path, command):
    """A read-only mount (a tmpfs in a private mount namespace: no root needed where user namespaces are
    allowed) refuses root too, which a folder's permission bits do not."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a read-only tmpfs")
    ro = tmp_path / "ro"
    ro.mkdir()
    mount = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c"]
    probe = subprocess.run([*mount, f"mount -t tmpfs -o ro tmpfs {ro}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.decode().strip()}")
    argv = [sys.executable, "-m", *(arg.replace("{ro}", str(ro)) for arg in command), "--data.batch_size", "4"]
    script = f"mount -t tmpfs -o ro tmpfs {ro} && cd {shlex.quote(str(REPO))} && exec {shlex.join(argv)}"
    result = subprocess.run([*mount, script], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"error: {command[1]} {ro}/")
    assert "cannot create files in" in result.stderr and "Read-only file system" in result.stderr
    assert "Traceback" not in result.stderr


# --- the helper itself


def test_nothing_is_made_or_left_by_a_check(tmp_path):
    assert writable_folder(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert new_file(tmp_path / "c" / "x.json", "--export") == tmp_path / "c" / "x.json"
    assert list(tmp_path.iterdir()) == []


def test_an_empty_folder_is_taken_where_a_new_one_is_asked(tmp_path):
    assert writable_folder(tmp_path, "--out", empty=True) == tmp_path
    (tmp_path / ".hidden").write_text("")
    with pytest.raises(UserError, match="holds files already"):
        writable_folder(tmp_path, "--out", empty=True)


def test_a_broken_link_on_the_way_is_named(tmp_path):
    (tmp_path / "gone").symlink_to(tmp_path / "deleted")
    with pytest.raises(UserError, match=f"{tmp_path / 'gone'} is a broken symbolic link"):
        new_file(tmp_path / "gone" / "x.json", "--export")


def test_a_relative_path_is_checked_where_the_command_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert new_file("x.json", "--export") == Path("x.json")
    (tmp_path / "x.json").write_text("the user's")
    with pytest.raises(UserError, match="--export x.json: that file exists"):
        new_file("x.json", "--export")
    assert os.listdir(tmp_path) == ["x.json"]
