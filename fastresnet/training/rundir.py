"""The run directory: everything a result needs to be traced.

runs/<name>/config.json   the resolved TrainConfig, less the data fields the run's back end does not read
runs/<name>/env.json      versions, GPU, git revision, command line, world size, the speed
                          settings as resolved and the measured choices behind them, the step
                          this start began at, and a resumed run's earlier starts
runs/<name>/metrics.jsonl one JSON object per log interval and evaluation
runs/<name>/curves.png    the training curves
runs/<name>/checkpoint.pt the latest checkpoint (atomic)
runs/<name>/launch.json   under torchrun: the elastic agents that run it, whose restarts continue it

A run directory that exists is never written into, except by `--resume` and by
a restart of the torchrun launch that created it. torchelastic restarts a
failed worker group with the same command line, so a restarted group must find
its run again by itself, while a user who repeats a run name by mistake must
still be refused. The restart count (TORCHELASTIC_RESTART_COUNT) cannot tell
them apart: a first attempt refused for a taken name fails, and its restart
would count 1. What does tell them apart is the launch: each worker's parent is
its node's elastic agent, alive across the restarts of one launch and new with
every launch, so the run records the agents (run id, host, pid, start time)
of the group that created it, and a group with one of them continues the run.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastresnet
from fastresnet.ops.onednn import describe_cpu
from fastresnet.outputs import writable_folder
from fastresnet.training import distributed
from fastresnet.training.config import TrainConfig
from fastresnet.training.fields import ConfigError, to_dict


def default_run_name(cfg: TrainConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{cfg.model}-{cfg.data.backend}-{stamp}"


LAUNCH_NAME = "launch.json"


def create_run_dir(cfg: TrainConfig) -> Path:
    """A new run directory: --run_name's, refused if it exists; else <model>-<backend>-<time>[-N], free."""
    out = writable_folder(cfg.out_dir, "--out_dir")
    if cfg.run_name:
        return make_folder(out / cfg.run_name, cfg)
    name = default_run_name(cfg)
    for suffix in ["", *(f"-{n}" for n in range(2, 100))]:  # two runs started in the same second
        if not (out / (name + suffix)).exists():
            return make_folder(out / (name + suffix), cfg)
    raise ConfigError(f"--out_dir {out}: too many runs named {name}-N; give --run_name")


def make_folder(folder: Path, cfg: TrainConfig) -> Path:
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        raise ConfigError(
            f"run directory {folder} exists: continue that run with --resume {folder}, or give another --run_name "
            "(a run directory is never written into by a new run)"
        ) from None
    except OSError as err:
        raise ConfigError(f"--out_dir {cfg.out_dir}: cannot create {folder} ({err.strerror})") from None
    return folder


def launch_token() -> str | None:
    """This worker's torchelastic launch: run id, host, and the pid and start time of its agent
    (its parent process); None outside torchrun."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return None
    agent = os.getppid()
    return f"{run_id}@{socket.gethostname()}:{agent}:{process_start_time(agent)}"


def process_start_time(pid: int) -> str:
    """Clock ticks after boot at which `pid` started (Linux), which with the pid names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before it may hold spaces


def open_run_dir(cfg: TrainConfig, is_main: bool) -> tuple[Path, bool]:
    """On every rank: (the run directory, whether this torchrun launch made it before a restart and
    continues it). Rank 0 decides, and a refusal reaches every rank, so that none waits for the others."""
    tokens = [token for token in distributed.gather(launch_token()) if token]
    decision = None
    if is_main:
        try:
            folder, own = claim_run_dir(cfg, tokens)
            decision = (str(folder), own, None)
        except ConfigError as err:
            decision = (None, False, str(err))
    folder, own, error = distributed.rank0_choice(decision)
    if error is not None:
        raise ConfigError(error)
    return Path(folder), own


def claim_run_dir(cfg: TrainConfig, tokens: list[str]) -> tuple[Path, bool]:
    """(the run directory, whether this launch continues it): the run this torchrun launch created
    before a restart (any of `tokens`, its workers' launch tokens, recorded there), else a new one."""
    own = own_run_dir(cfg, set(tokens)) if tokens else None
    folder = own or create_run_dir(cfg)
    if tokens:
        recorded = read_launch(folder)
        write_json(folder / LAUNCH_NAME, {"agents": sorted(recorded | set(tokens))})
    return folder, own is not None


def own_run_dir(cfg: TrainConfig, tokens: set[str]) -> Path | None:
    out = Path(cfg.out_dir)
    folders = [out / cfg.run_name] if cfg.run_name else [p.parent for p in sorted(out.glob(f"*/{LAUNCH_NAME}"))]
    return next((folder for folder in folders if read_launch(folder) & tokens), None)


def read_launch(folder: Path) -> set[str]:
    try:
        return set(json.loads((folder / LAUNCH_NAME).read_text())["agents"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def write_json(path: Path, obj) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def git_revision() -> str:
    """The fastresnet source tree's commit (+ "-dirty"), or "unknown" outside a git checkout."""
    source = Path(fastresnet.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device, world_size: int) -> dict:
    env = {
        "fastresnet": fastresnet.__version__,
        "git_revision": git_revision(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        # what was typed: a run trained by `python -m fastresnet.experiments` reruns from that command
        "command": shlex.join([sys.executable, *sys.orig_argv[1:]]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else describe_cpu(),
        "world_size": world_size,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for module in ("torchvision", "triton", "numpy"):
        try:
            env[module] = __import__(module).__version__
        except Exception:
            env[module] = None
    return env


def run_config(cfg: TrainConfig, backend: str) -> dict:
    """The run's config as config.json and the checkpoint record it: every field, less the data fields that
    `backend` (the back end the run uses) does not read. Those hold their defaults (validate refuses any
    other value), so loading the record into TrainConfig gives the run's config back exactly."""
    from fastresnet.data.config import reads

    record = to_dict(cfg)
    record["data"] = {name: value for name, value in record["data"].items() if reads(backend, name, cfg.data.recipe)}
    return record


def write_run_files(folder: Path, cfg: TrainConfig, backend: str, device: torch.device, world_size: int,
                    speed: dict | None = None, start_step: int = 0) -> None:
    """config.json (run_config: the fields `backend` reads), and env.json with `speed`: what the speed
    settings resolved to and the measured choices behind them (fused blocks or plain under compile, each
    op's dispatch). A run started again in its folder (a resume, a torchrun restart) keeps the env.json of
    each earlier start."""
    write_json(folder / "config.json", run_config(cfg, backend))
    env = {**environment(device, world_size), "started_at_step": start_step, "speed": speed or {}}
    write_json(folder / "env.json", {**env, "earlier_starts": earlier_starts(folder / "env.json")})


def earlier_starts(env_path: Path) -> list[dict]:
    """The starts recorded in an existing env.json, oldest first. A run resumed on another machine, with
    other threads or at another revision trains each part under different sums, so its record says
    where each part trained."""
    if not env_path.is_file():
        return []
    try:
        previous = json.loads(env_path.read_text())
    except json.JSONDecodeError:
        return [{"unreadable": f"{env_path} was not valid JSON when the run resumed"}]
    return previous.pop("earlier_starts", []) + [previous]
