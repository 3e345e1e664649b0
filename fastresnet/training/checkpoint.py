"""Checkpoints that survive a crash mid-write, and the state a resume needs.

A checkpoint is written to a temporary file in the same directory, flushed
and fsync'ed, then renamed over the old one with os.replace (atomic on
POSIX), and the directory is fsync'ed so the rename itself is durable. A
crash at any point leaves either the old checkpoint or the new one, never a
torn file.

Resume is exact at any step: the data order of an epoch is a function of
(seed, epoch), so the checkpoint records the epoch, how many of its batches
were done, and the RNG states both at the start of that epoch (to rebuild the
epoch's iterator) and at the moment of saving (to continue from).
"""

from __future__ import annotations

import errno
import io
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from fastresnet.errors import DISK_FULL, UserError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1
MB = 1e6


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable or not the one the run needs."""


class NoSpaceError(UserError, OSError):
    """The disk cannot take the next checkpoint; the last good one is kept."""

    def __str__(self) -> str:
        return self.strerror


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """Write `obj` to `path` whole or not at all (the previous file stays until the new one is complete).

    The bytes are made in memory first, so that their size is known: a disk without room for them
    (beside the previous checkpoint, which stays until the rename) is told before anything is
    written. Temporary files left by a save that was killed are removed first: they are never
    complete, and they hold the room the next save needs."""
    path = Path(path)
    remove_stale_temporaries(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    free = shutil.disk_usage(path.parent).free
    if free < len(data):
        raise no_space(path, len(data), free)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            raise no_space(path, len(data), shutil.disk_usage(path.parent).free) from err
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temporaries(path: Path) -> None:
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if stale.name != f".{path.name}.tmp-{os.getpid()}":
            stale.unlink(missing_ok=True)


def no_space(path: Path, needed: int, free: int) -> NoSpaceError:
    kept = f"the last good checkpoint {path} is kept" if path.is_file() else "no checkpoint was written yet"
    return NoSpaceError(
        errno.ENOSPC,
        f"no space left on {path.parent}: {needed / MB:.1f} MB needed for {path.name}, {free / MB:.1f} MB free; "
        f"{kept}. Free some space and continue with --resume {path.parent}",
    )


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, needs: tuple[str, ...] = ()) -> dict:
    """The checkpoint dict, on the CPU, holding the entries `needs`; CheckpointError if it is missing,
    damaged or not a fastresnet checkpoint."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: give a run directory or its {CHECKPOINT_NAME}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types (zip, pickle, EOF): all mean "cannot read"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"cannot read checkpoint {path} ({path.stat().st_size} bytes): it is damaged or not a fastresnet "
            f"checkpoint ({type(err).__name__}: {reason[:200]}). Restore it from a copy, or start the run again"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a fastresnet checkpoint (format {FORMAT_VERSION}): give a run directory "
                              "written by python -m fastresnet.train")
    missing = [key for key in needs if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: it is not a checkpoint of python -m fastresnet.train")
    return state


def load_weights(model: torch.nn.Module, state: dict, path: str | os.PathLike, what: str) -> None:
    """model.load_state_dict(state["model"]), or a CheckpointError saying whose weights these are."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as err:
        saved = state.get("config", {}).get("model", "another model") if isinstance(state.get("config"), dict) else "?"
        first = str(err).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else (first[0] if first else "")
        raise CheckpointError(f"{path} holds weights of {saved} that do not fit {what} ({detail[:200]})") from None


# A resumed run continues where its checkpoint stopped only with these as they were: the position in
# the epoch and every length of the schedule count batches of the run's batch size and number of
# processes, and the data order and the weights follow the seed and the model.
RESUME_FIXED = ("model", "shortcut", "seed", "data.batch_size", "data.drop_last")


def check_resumable(state: dict, cfg, world_size: int, path: str | os.PathLike) -> None:
    """A ConfigError naming the first flag that differs from the checkpoint's run where it must not."""
    from fastresnet.training.fields import ConfigError, flatten, to_dict

    saved, now = flatten(state["config"]), flatten(to_dict(cfg))
    for name in RESUME_FIXED:
        if name in saved and saved[name] != now[name]:
            raise ConfigError(
                f"--resume {Path(path).parent}: --{name} {now[name]!r} differs from the run's {saved[name]!r}, which "
                "a resumed run must keep (its checkpoint counts batches and draws data by them); drop the flag, or "
                "start a new run"
            )
    saved_world = state.get("world_size", world_size)
    if saved_world != world_size:
        raise ConfigError(f"--resume {Path(path).parent}: the run trained with {saved_world} processes, this one has "
                          f"{world_size}; resume it with {saved_world} (its position counts batches of every process)")


# --- random number generator states, in a form torch.load(weights_only=True) accepts


def capture_rng() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached), "kind": kind},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
