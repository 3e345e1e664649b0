"""The run directory: everything a result needs to be traced.

runs/<name>/config.json   the resolved TrainConfig
runs/<name>/env.json      versions, GPU, git revision, command line, world size, the speed
                          settings as resolved and the measured choices behind them
runs/<name>/metrics.jsonl one JSON object per log interval and evaluation
runs/<name>/curves.png    the training curves
runs/<name>/checkpoint.pt the latest checkpoint (atomic)
"""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastresnet
from fastresnet.training.config import TrainConfig
from fastresnet.training.fields import to_dict


def default_run_name(cfg: TrainConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{cfg.model}-{cfg.data.backend}-{stamp}"


def create_run_dir(cfg: TrainConfig) -> Path:
    folder = Path(cfg.out_dir) / (cfg.run_name or default_run_name(cfg))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_json(path: Path, obj) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


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
        "command": " ".join([sys.executable, "-m", "fastresnet.train", *sys.argv[1:]]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "world_size": world_size,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for module in ("torchvision", "triton", "numpy"):
        try:
            env[module] = __import__(module).__version__
        except Exception:
            env[module] = None
    return env


def write_run_files(folder: Path, cfg: TrainConfig, device: torch.device, world_size: int,
                    speed: dict | None = None) -> None:
    """config.json, and env.json with `speed`: what the speed settings resolved to and the measured
    choices behind them (fused blocks or plain under compile, each op's dispatch)."""
    write_json(folder / "config.json", to_dict(cfg))
    write_json(folder / "env.json", {**environment(device, world_size), "speed": speed or {}})
