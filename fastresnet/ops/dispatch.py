"""Per-shape choice between implementations of one op, measured once per GPU and cached on disk.

A fused Triton kernel is not always faster than cuDNN (public reports put naive
Triton convs well behind it), and the library must never be slower than plain
PyTorch. So the first call of an op for a given problem key (shape, stride,
dtype, ...) on a GPU times every candidate implementation on the real inputs,
keeps the fastest, and remembers the choice:

- in memory, for the rest of the process;
- on disk, in one JSON file per (GPU name, torch version, triton version) under
  ~/.cache/fastresnet/ (or $FASTRESNET_CACHE_DIR), written atomically (a temp
  file in the same folder, then os.replace), so two processes never see half a
  file. A file that does not parse, or whose recorded versions do not match, is
  ignored with a warning and rewritten.

Switches (read at call time):
  FASTRESNET_DISPATCH=measure  (default) time the candidates as above.
  FASTRESNET_DISPATCH=fixed    no timing: the op's fixed rule decides.
  FASTRESNET_DISPATCH=<name>   always that candidate where it is available.
  set_dispatch_mode(...)       the same from Python; overrides the variable.
  FASTRESNET_TILES=fixed       time implementations but not the Triton kernels' tiles: each
                               kernel runs its fixed-rule tile (a shorter first call: every
                               tile is a compile; default "search").

`decisions()` lists every choice of this process with the measured times, and
each new choice is logged on the "fastresnet.dispatch" logger (INFO).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("fastresnet.dispatch")

CACHE_DIR_ENV = "FASTRESNET_CACHE_DIR"
DISPATCH_ENV = "FASTRESNET_DISPATCH"
TILES_ENV = "FASTRESNET_TILES"
CACHE_SCHEMA = 2  # bump when the meaning of a cached entry changes: older files then count as stale
# 2: conv_bn_act's Triton candidates are "triton:<tile>" (one per tile), and "cublaslt_fused" joined

_mode_override: str | None = None
_memory: dict[str, dict] = {}  # problem key -> {"choice": name, "times_ms": {name: ms}, "source": ...}
_disk_loaded: dict[str, dict] = {}  # cache file path -> its decisions, read once per process


def set_dispatch_mode(mode: str | None) -> None:
    """"measure", "fixed", a candidate name, or None to go back to $FASTRESNET_DISPATCH."""
    global _mode_override
    _mode_override = mode


def dispatch_mode() -> str:
    if _mode_override is not None:
        return _mode_override
    return os.environ.get(DISPATCH_ENV, "measure").strip() or "measure"


def tile_search() -> bool:
    """Whether the Triton kernels' tiles compete as candidates ($FASTRESNET_TILES, "search" or "fixed")."""
    value = os.environ.get(TILES_ENV, "search").strip() or "search"
    if value not in ("search", "fixed"):
        raise ValueError(f"{TILES_ENV}={value!r}: expected 'search' (time every tile) or 'fixed' (one tile per rule)")
    return value == "search"


def decisions() -> list[dict]:
    """Every choice made in this process: key, choice, measured times (ms), and where it came from."""
    return [{"key": key, **entry} for key, entry in _memory.items()]


def decision(key: str) -> dict | None:
    """This process's choice for `key` (choice, times_ms, source), or None if not made yet."""
    entry = _memory.get(key)
    return None if entry is None else {"key": key, **entry}


def clear_memory() -> None:
    """Forget this process's decisions (the disk cache stays); for tests."""
    _memory.clear()
    _disk_loaded.clear()


# ---------------------------------------------------------------------------
# The disk cache
# ---------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "fastresnet")


def environment_tag(device: torch.device) -> dict:
    """What a measurement depends on besides the problem: the GPU and the software versions."""
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"schema": CACHE_SCHEMA, "device": name, "torch": torch.__version__, "triton": triton.__version__}


def cache_path(tag: dict) -> Path:
    stem = f"dispatch-{tag['device']}-torch{tag['torch']}-triton{tag['triton']}"
    return cache_dir() / (re.sub(r"[^A-Za-z0-9_.+-]+", "_", stem) + ".json")


def load_cache(path: Path, tag: dict) -> dict:
    """The decisions stored at `path`, or {} (with a warning) when it is corrupt or stale."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("decisions"), dict):
            raise ValueError("no 'decisions' table")
    except (OSError, ValueError) as err:
        warnings.warn(f"fastresnet: ignoring corrupt dispatch cache {path}: {err}", RuntimeWarning, stacklevel=3)
        return {}
    recorded = {k: data.get(k) for k in tag}
    if recorded != tag:
        warnings.warn(
            f"fastresnet: ignoring stale dispatch cache {path}: recorded for {recorded}, running {tag}",
            RuntimeWarning,
            stacklevel=3,
        )
        return {}
    return {k: v for k, v in data["decisions"].items() if isinstance(v, dict) and "choice" in v}


def save_cache(path: Path, tag: dict, decisions_by_key: dict) -> None:
    """Write atomically: a temp file in the same folder, then os.replace over the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({**tag, "decisions": decisions_by_key}, indent=1, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _disk_decisions(device: torch.device) -> tuple[Path, dict, dict]:
    tag = environment_tag(device)
    path = cache_path(tag)
    key = str(path)
    if key not in _disk_loaded:
        _disk_loaded[key] = load_cache(path, tag)
    return path, tag, _disk_loaded[key]


def _remember_on_disk(device: torch.device, key: str, entry: dict) -> None:
    path, tag, stored = _disk_decisions(device)
    # Re-read so that choices other processes made since we loaded are kept.
    merged = {**load_cache(path, tag), **stored, key: entry}
    stored.update(merged)
    try:
        save_cache(path, tag, merged)
    except OSError as err:  # a read-only home must not break inference
        warnings.warn(f"fastresnet: could not write dispatch cache {path}: {err}", RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------
# Timing and choosing
# ---------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10) -> float:
    """Median time of fn() in milliseconds, with CUDA events (after `warmup` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure(candidates: dict[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
    """Time each candidate; one that raises is left out (logged), never fatal."""
    times = {}
    for name, fn in candidates.items():
        try:
            times[name] = time_ms(fn, device)
        except Exception as err:  # an unsupported config in cuDNN or a Triton compile error
            log.info("dispatch: candidate %s failed and is skipped: %s", name, err)
    return times


# A candidate's output may differ from a known-good one's by rounding (bf16: about 2^-8 per element);
# ||out - expected|| / ||expected|| stays far below this unless the candidate computes something else.
CHECK_RTOL = 3e-2


def checked_on_first_call(op: str, name: str, run: Callable[[], object], expected: Callable[[], object],
                          outputs: Callable[[object], tuple] = lambda out: (out,),
                          rtol: float = CHECK_RTOL) -> Callable[[], object]:
    """run, whose first call (the measurement's first, untimed warm-up) also compares its output tensors
    (`outputs(result)`, None entries skipped) with expected()'s; a mismatch warns and raises, which
    leaves the candidate out of the measurement.

    For kernels that enter a dispatch before they have ever run on a GPU: being fast must not be
    enough to win if the output is wrong. `expected` is a reference or a known-good candidate (cache
    it: it runs once per problem, only when the dispatch measures, never for a decision from disk)."""
    checked = False

    def call():
        nonlocal checked
        out = run()
        if not checked:
            for got, want in zip(outputs(out), outputs(expected())):
                if got is None or want is None:
                    continue
                want = want.float()
                error = ((got.float() - want).norm() / want.norm().clamp_min(1e-30)).item()
                if not error <= rtol:  # also catches NaN
                    message = f"{op}: candidate {name} is off the reference by {error:.2e} (relative); left out"
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
                    raise RuntimeError(message)
            checked = True
        return out

    return call


def _can_measure(device: torch.device) -> bool:
    return device.type == "cuda"


def _capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is capturing a CUDA graph (never off CUDA)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def choose(key: str, candidates: dict[str, Callable[[], object]], fixed: str, device: torch.device) -> str:
    """The name of the candidate to run for problem `key`.

    `candidates` maps names to zero-argument callables that run the op on the
    real inputs (only called when timing). `fixed` is the op's rule when
    measurement is off or impossible (not on a GPU).
    """
    mode = dispatch_mode()
    if mode in candidates:
        return mode
    if mode == "fixed" or not _can_measure(device):
        return fixed
    if mode != "measure":
        raise ValueError(
            f"{DISPATCH_ENV}={mode!r} is neither 'measure', 'fixed' nor a candidate of {key} ({sorted(candidates)})"
        )
    if _capturing(device):
        # Inside a CUDA-graph capture timing cannot run (its event sync, and a first-call check's
        # .item(), are errors there that also break the capture): a choice already made, else the rule.
        return remembered_choice(key, candidates, device) or fixed
    return measured_choice(key, candidates, device)


def remembered_choice(key: str, candidates: dict[str, Callable[[], object]], device: torch.device) -> str | None:
    """The choice for `key` from this process's memory, else from the disk cache (then also kept in
    memory), or None when neither has one that is still a candidate."""
    if key in _memory:
        return _memory[key]["choice"]
    _, _, stored = _disk_decisions(device)
    entry = stored.get(key)
    if entry is not None and entry["choice"] in candidates:
        _memory[key] = {**entry, "source": "disk cache"}
        return entry["choice"]
    return None


def measured_choice(key: str, candidates: dict[str, Callable[[], object]], device: torch.device) -> str:
    """The fastest candidate for `key`: from this process's memory, else the disk cache, else timed now
    (and remembered in both). `choose` without its switches, for callers with switches of their own."""
    remembered = remembered_choice(key, candidates, device)
    if remembered is not None:
        return remembered
    times = measure(candidates, device)
    if not times:
        raise RuntimeError(f"fastresnet dispatch: every candidate failed for {key}: {sorted(candidates)}")
    choice = min(times, key=times.get)
    entry = {"choice": choice, "times_ms": {k: round(v, 5) for k, v in times.items()}}
    _memory[key] = {**entry, "source": "measured"}
    log.info("dispatch %s -> %s (%s)", key, choice, ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(times.items())))
    _remember_on_disk(device, key, entry)
    return choice
