"""One measured choice for every op that can compute a problem in more than one way.

A fused Triton kernel is not always faster than cuDNN, and the library must never be slower than
plain PyTorch. So an op asks its `Op` once per call which path to run, then runs it:

    CONV_BN_ACT = tuning.Op("conv_bn_act", {"cudnn_fused": None, "cudnn_affine": None, "triton": applies})
    path = CONV_BN_ACT.choose(problem, x.device, default, timed=lambda name: lambda: ..., args=(x, weight, ...))

`problem` is a tuple of what the choice depends on (shapes, strides, dtypes, flags). As it is, it keys
the memory of this process (the hot path is one dict lookup); written out (`key()`), the disk cache.
The first call of a problem on a device where candidates can be timed (a GPU) runs each candidate that
applies (`applies(*args)`) on the real inputs (timed(name) gives the call to time), keeps the fastest and
remembers it:
in memory, and in one JSON file per (device, torch, triton) under ~/.cache/fastresnet/
($FASTRESNET_CACHE_DIR), written atomically. A file or an entry that does not parse, or was written for
other versions, is ignored with a warning. Timing and the cache live here alone: an op asks before it
calls its custom op, which runs the path it is given.

The candidates of the main tree have run on a GPU (bench/RESULTS.md names the run per op). Those that
have not wait on the experimental shelf (fastresnet.experimental), whose candidates are offered only
with FASTRESNET_EXPERIMENTAL=1 (bench/gpu_check.sh sets it); the switch loads the shelf.

Switches, read when a problem is first met (`override()` and `clear()` make a change take effect inside
a process):
  FASTRESNET_DISPATCH=measure   (the default) time the candidates as above.
  FASTRESNET_DISPATCH=default   time nothing: every op runs its default ("fixed" is the same).
  FASTRESNET_DISPATCH="conv_bn_act=cudnn_fused,batch_norm_act.backward=triton"
                                pin candidates per op (a name of OPS, or a prefix of several:
                                "batch_norm_act=triton" pins each batch_norm_act.* op that has "triton");
                                "op=default" gives that op its default. A pinned candidate that cannot run
                                a problem leaves that problem to the default. An unknown op or candidate
                                is an error that lists the valid ones.
  FASTRESNET_EXPERIMENTAL=1     offer the experimental shelf's candidates too.

Where nothing can be timed the default runs: on a device that is not timed (the CPU: there the Triton
kernels run in Triton's interpreter, for the tests), under torch.compile (a choice made eagerly before
is kept), and inside a CUDA-graph capture (a choice made before, in memory or on disk, else the default,
not remembered). `decisions()` lists every choice of this process with its times; each new one is also
logged on the "fastresnet.tuning" logger (INFO).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

log = logging.getLogger("fastresnet.tuning")

CACHE_DIR_ENV = "FASTRESNET_CACHE_DIR"
DISPATCH_ENV = "FASTRESNET_DISPATCH"
EXPERIMENTAL_ENV = "FASTRESNET_EXPERIMENTAL"
DEFAULT = "default"
# "fixed" is what the README first called the default: kept as a synonym.
_SYNONYMS = {"fixed": DEFAULT}
# Bumped when a cached entry changes meaning; older files then count as stale. 4: keys are the problem
# tuples written out, the experimental candidates left the main tree.
CACHE_SCHEMA = 4

OPS: dict[str, "Op"] = {}


# ---------------------------------------------------------------------------
# The switches
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    use_default: bool  # FASTRESNET_DISPATCH=default
    pins: dict[str, str]  # op name or prefix -> candidate (or DEFAULT)
    experimental: bool

    def pin_for(self, op: str) -> Optional[str]:
        """The pinned candidate of `op`: its own pin, else the pin of the longest prefix that it has."""
        if op in self.pins:
            return self.pins[op]
        parts = op.split(".")
        for n in range(len(parts) - 1, 0, -1):
            pin = self.pins.get(".".join(parts[:n]))
            if pin is not None and (pin == DEFAULT or OPS[op].knows(pin, self.experimental)):
                return pin
        return None


_override: Optional[str] = None


def override(spec: Optional[str]) -> None:
    """The same as FASTRESNET_DISPATCH, from Python (it wins over the variable); None goes back to the
    variable. Forgets this process's choices, so that the new setting applies to every problem."""
    global _override
    if spec is not None:
        parse_dispatch(spec)  # an error now, not at the first op
    _override = spec
    clear()


def experimental() -> bool:
    """FASTRESNET_EXPERIMENTAL is on; then the shelf is loaded (once), which adds its candidates."""
    on = os.environ.get(EXPERIMENTAL_ENV, "0").strip().lower() in ("1", "true", "yes", "on")
    if on:  # by name: the shelf depends on the main tree, never the other way
        importlib.import_module("fastresnet.experimental")
    return on


def settings() -> Settings:
    spec = _override if _override is not None else os.environ.get(DISPATCH_ENV, "")
    shelf = experimental()
    use_default, pins = parse_dispatch(spec)
    return Settings(use_default, pins, shelf)


def parse_dispatch(spec: str) -> tuple[bool, dict[str, str]]:
    """(everything on its default?, {op: pinned candidate}) of a FASTRESNET_DISPATCH value; raises on a
    bad one."""
    use_default, pins = _parsed(spec, experimental())
    return use_default, dict(pins)


@functools.lru_cache(maxsize=64)
def _parsed(spec: str, shelf: bool) -> tuple[bool, tuple[tuple[str, str], ...]]:
    use_default, pins = False, []
    for item in (part.strip() for part in spec.split(",")):
        item = _SYNONYMS.get(item, item)
        if item in ("", "measure"):
            continue
        if item == DEFAULT:
            use_default = True
            continue
        op, sep, candidate = (s.strip() for s in item.partition("="))
        candidate = _SYNONYMS.get(candidate, candidate)
        if not sep:
            raise ValueError(f"{DISPATCH_ENV}: {item!r} is neither 'measure', 'default' nor 'op=candidate'; "
                             f"{_ops_help(shelf)}")
        matching = [name for name in OPS if name == op or name.startswith(op + ".")]
        if not matching:
            raise ValueError(f"{DISPATCH_ENV}: no op {op!r}; {_ops_help(shelf)}")
        if candidate != DEFAULT and not any(OPS[name].knows(candidate, shelf) for name in matching):
            valid = sorted({c for name in matching for c in OPS[name].offered(shelf)})
            raise ValueError(f"{DISPATCH_ENV}: {op!r} has no candidate {candidate!r}; it has {valid} or 'default'"
                             + ("" if shelf else f" ({EXPERIMENTAL_ENV}=1 offers the experimental ones)"))
        pins.append((op, candidate))
    return use_default, tuple(pins)


def _ops_help(shelf: bool) -> str:
    return "ops: " + ", ".join(f"{name} {op.offered(shelf)}" for name, op in OPS.items())


# ---------------------------------------------------------------------------
# Decisions: this process's memory and the disk cache
# ---------------------------------------------------------------------------

_decisions: dict[str, dict] = {}  # key -> {"op", "choice", "times_ms", "source"}
_disk: dict[str, dict] = {}  # cache file -> its entries, read once per process


def decisions() -> list[dict]:
    """Every choice timed or read from disk in this process: op, key, choice, times (ms), source."""
    return [{"key": key, **entry} for key, entry in _decisions.items()]


def decision(key: str) -> Optional[dict]:
    entry = _decisions.get(key)
    return None if entry is None else {"key": key, **entry}


def clear() -> None:
    """Forget this process's choices (the disk cache stays)."""
    _decisions.clear()
    _disk.clear()
    for op in OPS.values():
        op.memo.clear()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "fastresnet")


def environment_tag(device: torch.device) -> dict:
    """What a measurement depends on besides the problem: the device and the software versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"schema": CACHE_SCHEMA, "device": name, "torch": torch.__version__, "triton": triton_version}


def cache_path(tag: dict) -> Path:
    stem = f"dispatch-{tag['device']}-torch{tag['torch']}-triton{tag['triton']}"
    return cache_dir() / (re.sub(r"[^A-Za-z0-9_.+-]+", "_", stem) + ".json")


def valid_entry(entry: object) -> bool:
    """{"choice": name, "times_ms": {name: finite ms >= 0}, "failed": [name, ...] (optional)} with the
    choice among the times."""
    if not isinstance(entry, dict) or not isinstance(entry.get("choice"), str):
        return False
    times, failed = entry.get("times_ms"), entry.get("failed", [])
    return (isinstance(times, dict) and entry["choice"] in times and all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        for k, v in times.items()) and isinstance(failed, list) and all(isinstance(n, str) for n in failed))


def load_cache(path: Path, tag: dict) -> dict:
    """The valid entries stored at `path`, or {} (with a warning) when it is corrupt or stale."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("decisions"), dict):
            raise ValueError("no 'decisions' table")
    except (OSError, ValueError, RecursionError) as err:
        warnings.warn(f"fastresnet: ignoring corrupt dispatch cache {path}: {type(err).__name__}: {err}",
                      RuntimeWarning, stacklevel=3)
        return {}
    recorded = {k: data.get(k) for k in tag}
    if recorded != tag:
        warnings.warn(f"fastresnet: ignoring stale dispatch cache {path}: recorded for {recorded}, running {tag}",
                      RuntimeWarning, stacklevel=3)
        return {}
    entries = {k: v for k, v in data["decisions"].items() if valid_entry(v)}
    dropped = len(data["decisions"]) - len(entries)
    if dropped:
        warnings.warn(f"fastresnet: ignoring {dropped} malformed entries of dispatch cache {path} "
                      "(each is measured again)", RuntimeWarning, stacklevel=3)
    return entries


def save_cache(path: Path, tag: dict, entries: dict) -> None:
    """Write atomically: a temp file in the same folder, then os.replace over the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({**tag, "decisions": entries}, indent=1, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _disk_entries(device: torch.device) -> tuple[Path, dict, dict]:
    tag = environment_tag(device)
    path = cache_path(tag)
    if str(path) not in _disk:
        _disk[str(path)] = load_cache(path, tag)
    return path, tag, _disk[str(path)]


def _remember_on_disk(device: torch.device, key: str, entry: dict) -> None:
    path, tag, stored = _disk_entries(device)
    merged = {**load_cache(path, tag), **stored, key: entry}  # keep what other processes chose since
    stored.update(merged)
    try:
        save_cache(path, tag, merged)
    except OSError as err:  # a read-only home must not stop a run
        warnings.warn(f"fastresnet: could not write dispatch cache {path}: {err}", RuntimeWarning, stacklevel=3)


def remembered(key: str, allowed: Sequence[str], device: torch.device) -> Optional[str]:
    """The fastest of `allowed` by a decision already made for `key` (memory, else disk), when that
    decision timed every one of them (or saw it fail); else None (a candidate allowed since must be timed)."""
    entry, source = _decisions.get(key), None
    if entry is None:
        entry, source = _disk_entries(device)[2].get(key), "disk cache"
    if entry is None or not set(allowed) <= set(entry["times_ms"]) | set(entry.get("failed", [])):
        return None
    timed = [name for name in allowed if name in entry["times_ms"]]
    if not timed:
        return None
    choice = min(timed, key=entry["times_ms"].get)
    if source is not None:
        _decisions[key] = {**entry, "choice": choice, "source": source}
    return choice


def export_decisions(path: Path, device: torch.device) -> int:
    """Write every decision known here for `device` (the disk cache, and this process's) to `path`, with
    the device and versions they hold for; returns how many."""
    _, tag, stored = _disk_entries(device)
    entries = {**stored, **{k: {f: v for f, v in e.items() if f != "source"} for k, e in _decisions.items()}}
    save_cache(Path(path), tag, entries)
    return len(entries)


def import_decisions(path: Path, device: torch.device) -> int:
    """Add the decisions of a file written by export_decisions to this machine's cache; returns how many.
    Raises ValueError, naming what differs, for a file made on another device or other versions, or one
    that is not such a file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise ValueError(f"{path}: not a fastresnet decisions file ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("decisions"), dict):
        raise ValueError(f"{path}: not a fastresnet decisions file (no 'decisions' table); "
                         "write one with python -m fastresnet.tune --export FILE")
    tag = environment_tag(device)
    recorded = {k: data.get(k) for k in tag}
    if recorded != tag:
        differ = ", ".join(f"{k} {recorded[k]!r} there, {tag[k]!r} here" for k in tag if recorded[k] != tag[k])
        raise ValueError(f"{path}: made for another machine or versions ({differ}); its timings say nothing here")
    entries = {k: v for k, v in data["decisions"].items() if valid_entry(v)}
    if len(entries) != len(data["decisions"]):
        raise ValueError(f"{path}: {len(data['decisions']) - len(entries)} malformed entries; re-export it")
    cache, _, stored = _disk_entries(device)
    merged = {**load_cache(cache, tag), **entries}
    save_cache(cache, tag, merged)
    stored.update(merged)
    return len(entries)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10) -> float:
    """Median time of fn() in milliseconds after `warmup` untimed calls: CUDA events on a GPU, the host
    clock elsewhere (where a call returns when its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(candidates: dict[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
    """Time each candidate; one that raises is left out (logged), never fatal."""
    times = {}
    for name, fn in candidates.items():
        try:
            times[name] = time_ms(fn, device)
        except Exception as err:  # an unsupported cuDNN configuration, a Triton compile error, a failed check
            log.info("tuning: candidate %s failed and is left out: %s", name, err)
    return times


class TuningProgress:
    """A line on `stream` as each candidate starts, so that a first call's measurement (every candidate
    compiled, then timed) is no silent pause: which problem and candidate, and an estimate of what is
    left of the problem from what its candidates so far took (their compiles included). A problem
    measured inside a candidate's first call (a backward after each forward) is indented."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.problems = 0
        self.started = time.perf_counter()
        self._open: list[tuple[list[str], list[float]]] = []  # (candidates, start times) per problem under way

    def problem(self, op: str, key: str, names: Sequence[str]) -> None:
        self.problems += 1
        self._print(f"tuning problem {self.problems} ({op}): {key}: {len(names)} candidates")
        self._open.append((list(names), []))

    def reporting(self, name: str, run: Callable[[], object]) -> Callable[[], object]:
        """run, whose first call is announced."""
        names, starts = self._open[-1]
        announced = False

        def call():
            nonlocal announced
            if not announced:
                announced = True
                self._starting(name, names, starts)
            return run()

        return call

    def _starting(self, name: str, names: list[str], starts: list[float]) -> None:
        now = time.perf_counter()
        starts.append(now)
        done = len(starts) - 1
        left = f"; about {(now - starts[0]) / done * (len(names) - done):.0f} s left for this problem" if done else ""
        self._print(f"  [{done + 1}/{len(names)}] {name}{left}")

    def chosen(self, choice: str, times: dict[str, float]) -> None:
        self._open.pop()
        timed = ", ".join(f"{n} {ms:.3f} ms" for n, ms in sorted(times.items(), key=lambda kv: kv[1]))
        self._print(f"  -> {choice} ({timed}; {time.perf_counter() - self.started:.0f} s since the first problem)")

    def failed(self) -> None:
        self._open.pop()

    def _print(self, line: str) -> None:
        print("  " * len(self._open) + line, file=self.stream, flush=True)


_progress: Optional[TuningProgress] = None


def show_progress(progress: Optional[TuningProgress]) -> None:
    """Report every measurement to `progress` (None: quietly, the default)."""
    global _progress
    _progress = progress


def can_measure(device: torch.device) -> bool:
    """Whether candidates are timed on `device`: a GPU (tests make the CPU pretend)."""
    return device.type == "cuda"


def capturing(device: torch.device) -> bool:
    """Whether `device`'s current stream is capturing a CUDA graph (timing would spoil the capture)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------------
# The choice
# ---------------------------------------------------------------------------


def _text(value) -> str:
    """One field of a problem as the disk cache's key writes it."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, bool):
        return str(int(value))
    if value is None:
        return "-"
    if isinstance(value, (tuple, list)):
        if all(isinstance(v, bool) for v in value):
            return "".join(str(int(v)) for v in value)
        return "x".join(map(_text, value)) if all(isinstance(v, int) for v in value) else \
            "(" + ",".join(map(_text, value)) + ")"
    return str(value)


class Op:
    """The measured choice of one op: its candidates (name -> applies(*args), None where every problem
    can run it), the experimental shelf's (offered only with FASTRESNET_EXPERIMENTAL=1), and the choices
    made in this process."""

    def __init__(self, name: str, candidates: dict[str, Optional[Callable[..., bool]]]):
        self.name = name
        self.candidates = dict(candidates)
        self.shelf: dict[str, Optional[Callable[..., bool]]] = {}
        self.families: dict[str, Callable[..., list[str]]] = {}  # the shelf's "prefix:" -> names(*args)
        self.memo: dict[tuple, str] = {}  # (device, problem) -> choice
        OPS[name] = self

    def add_experimental(self, name: str, applies: Optional[Callable[..., bool]] = None) -> None:
        """A candidate of the experimental shelf; a name ending in ":" is a family of them ("triton:" for
        "triton:<tile>"), `applies` then giving the names that can run a problem."""
        (self.families if name.endswith(":") else self.shelf)[name] = applies

    def offered(self, shelf: bool) -> list[str]:
        return list(self.candidates) + ([*self.shelf, *(f + "<tile>" for f in self.families)] if shelf else [])

    def knows(self, candidate: str, shelf: bool) -> bool:
        return candidate in self.offered(shelf) or (shelf and candidate.partition(":")[0] + ":" in self.families)

    def key(self, problem: tuple) -> str:
        """The problem as the disk cache's key: the op's name and each field written out."""
        return ":".join([self.name, *map(_text, problem)])

    def known(self, problem: tuple, device: torch.device) -> Optional[str]:
        """The choice already made for `problem` on `device`, or None."""
        try:
            return self.memo.get((device, problem))
        except TypeError:  # symbolic sizes (a trace with dynamic shapes) key nothing
            return None

    def remember(self, problem: tuple, device: torch.device, choice: str) -> None:
        """Fix the choice for `problem` without timing (a fallback when timing failed)."""
        self.memo[(device, problem)] = choice

    def choose(self, problem: tuple, device: torch.device, default: str,
               timed: Optional[Callable[[str], Callable[[], object]]], args: tuple = ()) -> str:
        """The candidate to run for `problem` on `device`: remembered, else pinned, else timed (each
        candidate that applies to `args`; timed(name) is a call running it on the real inputs, made for
        every candidate before any is timed), else `default`. Under torch.compile nothing is timed: a
        choice made before, a pin, or the default."""
        try:
            choice = self.memo.get((device, problem))
        except TypeError:  # symbolic sizes (a trace with dynamic shapes): nothing to look up or time
            return default
        if choice is not None:
            return choice
        if torch.compiler.is_compiling():
            pin = _pinned(self.name)
            return pin if pin in self.candidates and (self.candidates[pin] is None or self.candidates[pin](*args)) \
                else default
        choice, final = self._decide(problem, device, default, timed, args)
        if final:
            self.memo[(device, problem)] = choice
        return choice

    def _applying(self, args: tuple, shelf: bool) -> list[str]:
        table = {**self.candidates, **(self.shelf if shelf else {})}
        names = [name for name, applies in table.items() if applies is None or applies(*args)]
        return names + ([name for names_of in self.families.values() for name in names_of(*args)] if shelf else [])

    def _decide(self, problem, device, default, timed, args) -> tuple[str, bool]:
        """(choice, whether to remember it)."""
        current = settings()
        pin = current.pin_for(self.name)
        if pin is not None and pin != DEFAULT:
            runnable = pin in self._applying(args, current.experimental)
            if not runnable:
                log.info("tuning: %s pinned to %s, which cannot run %s: its default %s runs", self.name, pin,
                         self.key(problem), default)
            return (pin if runnable else default), True
        if pin == DEFAULT or current.use_default or not can_measure(device):
            return default, True
        allowed = self._applying(args, current.experimental)
        if default not in allowed:
            allowed.insert(0, default)
        if len(allowed) == 1:
            return allowed[0], True
        key = self.key(problem)
        choice = remembered(key, allowed, device)
        if choice is not None:
            return choice, True
        if capturing(device):  # no timing inside a capture: the default, not kept
            return default, False
        return self._measure(key, allowed, device, timed), True

    def _measure(self, key: str, allowed: list[str], device: torch.device,
                 timed: Callable[[str], Callable[[], object]]) -> str:
        candidates = {name: timed(name) for name in allowed}
        if _progress is not None:
            _progress.problem(self.name, key, allowed)
            candidates = {name: _progress.reporting(name, fn) for name, fn in candidates.items()}
        times = measure(candidates, device)
        if not times:
            if _progress is not None:
                _progress.failed()
            raise RuntimeError(f"fastresnet {self.name}: every candidate failed for {key}: {allowed}")
        choice = min(times, key=times.get)
        entry = {"op": self.name, "choice": choice, "times_ms": {k: round(v, 5) for k, v in times.items()}}
        failed = [name for name in allowed if name not in times]
        if failed:  # remembered too: a later process need not try them again
            entry["failed"] = failed
        _decisions[key] = {**entry, "source": "measured"}
        log.info("tuning %s -> %s (%s)", key, choice, ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(times.items())))
        _remember_on_disk(device, key, entry)
        if _progress is not None:
            _progress.chosen(choice, times)
        return choice


@torch.compiler.assume_constant_result
def _pinned(op: str) -> Optional[str]:
    """The pinned candidate of `op` (not DEFAULT), read as a constant while torch.compile traces."""
    pin = settings().pin_for(op)
    return None if pin == DEFAULT else pin
