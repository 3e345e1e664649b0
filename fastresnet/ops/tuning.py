"""One measured choice for every op that has more than one way to compute.

A fused Triton kernel is not always faster than cuDNN, and the library must
never be slower than plain PyTorch. So every op that can run a problem (shape,
strides, dtype, ...) in several ways asks its `Tuned` object which to run:

    CONV_BN_ACT = Tuned("conv_bn_act")
    name = CONV_BN_ACT.choose(signature, x.device, names=..., fixed=..., key=..., runs=...)

The first call of a problem on a GPU times every allowed candidate on the real
inputs (`runs`), keeps the fastest and remembers it: per `signature` in
memory (a tuple: the hot path is one dict lookup), and under `key` (a string)
in one JSON file per (GPU, torch, triton) under ~/.cache/fastresnet/
($FASTRESNET_CACHE_DIR), written atomically. A file or an entry that does not
parse, or was written for other versions, is ignored with a warning.

Safe by default: a candidate that has never run on a GPU (not in its op's
`proven` table below, which names the bench/RESULTS.md run that showed it)
takes part only with FASTRESNET_EXPERIMENTAL=1, and its first call is then
compared with the op's known-good path: one that computes wrong warns and is
left out, however fast. An illegal memory access cannot be caught that way,
hence the opt-in.

Switches, read when a problem is first met (`override()` and `clear()` make a
change take effect inside a process):
  FASTRESNET_DISPATCH=measure   (default) time the candidates as above.
  FASTRESNET_DISPATCH=fixed     time nothing: every op runs its fixed rule.
  FASTRESNET_DISPATCH="conv_bn_act=cudnn_fused,batch_norm_act.backward=triton"
                                pin candidates per op (a name of OPS, or a prefix of
                                several: "batch_norm_act=triton" pins each batch_norm_act.*
                                op that has "triton"); "op=fixed" gives that op its rule.
                                A pinned candidate that cannot run a problem (cuBLASLt for
                                a 3x3 conv) leaves that problem to the fixed rule. An
                                unknown op or candidate is an error that lists the valid ones.
  FASTRESNET_EXPERIMENTAL=1     let never-run candidates compete (bench/gpu_check.sh sets it).
  FASTRESNET_TILES=fixed        time implementations but not the Triton kernels' tiles
                                (each tile timed is a compile: a shorter first call).

Where nothing can be timed the fixed rule runs: off a GPU (on the CPU an op's
rule runs its Triton kernels when Triton's interpreter is on, for the tests),
and inside a CUDA-graph capture, where a choice already made (memory or disk)
is kept and nothing new is remembered.

`decisions()` lists every choice of this process with its times; each new one
is also logged on the "fastresnet.tuning" logger (INFO).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

log = logging.getLogger("fastresnet.tuning")

CACHE_DIR_ENV = "FASTRESNET_CACHE_DIR"
DISPATCH_ENV = "FASTRESNET_DISPATCH"
EXPERIMENTAL_ENV = "FASTRESNET_EXPERIMENTAL"
TILES_ENV = "FASTRESNET_TILES"
# Bumped when a cached entry changes meaning; older files then count as stale. 3: candidates
# namespaced per op, "triton" is the inference conv's rule tile, tiles are "rule" or "tile:<name>".
CACHE_SCHEMA = 3

# The GPU runs that showed candidates running and computing right (bench/RESULTS.md).
RUN_1 = "H200 run 1, 2026-11-27, git 940f6a4"
RUN_2 = "H200 run 2, 2026-11-27, git f87519c"


@dataclass(frozen=True)
class Op:
    """What an op may choose from.

    candidates: every name it knows; "p:" stands for a family of names "p:<tile>".
    proven: the candidates that have run on a GPU, each with the run that showed it.
    check_against: the known-good candidate a new one is compared with on its first call
        (None where the op passes its own reference).
    family_rules: for a family, the candidate that runs its rule's tile ("triton:" -> "triton"),
        so that FASTRESNET_TILES=fixed drops the family; a family without one keeps its first member.
    """

    candidates: tuple[str, ...]
    proven: dict[str, str]
    check_against: Optional[str] = None
    family_rules: dict[str, str] = field(default_factory=dict)

    @property
    def tiles_only(self) -> bool:
        """Whether every candidate is a rule's tile or a family of other tiles (a kernel's tile choice)."""
        return set(self.candidates) <= set(self.family_rules) | set(self.family_rules.values())


_TILE_OP = Op(("rule", "tile:"), {"rule": RUN_2}, check_against="rule", family_rules={"tile:": "rule"})

# Every op that chooses, in one table: the overrides are checked against it.
OPS: dict[str, Op] = {
    # Inference conv + folded BN (+ residual) (+ ReLU): fastresnet/ops/conv_bn_act.py
    "conv_bn_act": Op(
        ("cudnn_fused", "cudnn_affine", "triton", "triton:", "triton_gemm:", "cublaslt_fused"),
        {"cudnn_fused": RUN_1, "cudnn_affine": RUN_1, "triton": RUN_1},
        family_rules={"triton:": "triton"},
    ),
    # BatchNorm + add + ReLU (fastresnet/ops/bn_act.py), each stage on its own.
    "batch_norm_act.forward": Op(("triton", "triton_single", "eager"), {"triton": RUN_1, "eager": RUN_1}, "triton"),
    "batch_norm_act.backward": Op(("triton", "triton_pipelined", "eager"), {"triton": RUN_1, "eager": RUN_1},
                                  "triton"),
    "batch_norm_act.step": Op(("triton", "triton_single", "eager"), {"triton": RUN_2, "eager": RUN_2}, "triton"),
    "batch_norm_act.eval": Op(("triton", "triton_wide", "triton_affine", "eager"),
                              {"triton_affine": RUN_2, "eager": RUN_2}, "triton_affine"),
    "batch_norm_act.eval_grad": Op(("triton", "eager"), {"triton": RUN_2, "eager": RUN_2}, "triton"),
    # Training conv with BN statistics (fastresnet/ops/conv_stats.py): its backward, its kernels' tiles.
    "conv_stats.backward": Op(("cudnn", "triton_wgrad", "triton_dgrad", "triton_bwd"), {"cudnn": RUN_2}, "cudnn"),
    "conv_stats.tile": _TILE_OP,
    "conv_wgrad.tile": Op(("rule", "tile:"), {}, check_against="rule", family_rules={"tile:": "rule"}),
    "conv_dgrad.tile": Op(("rule", "tile:"), {}, check_against="rule", family_rules={"tile:": "rule"}),
    # A fused training block's path (fastresnet/nn/blocks.py).
    "fused_block": Op(("triton", "mixed", "cudnn_graph", "cudnn_bnact", "eager"),
                      {"triton": RUN_2, "mixed": RUN_2, "cudnn_bnact": RUN_2, "eager": RUN_2}, "eager"),
    # The whole training step under torch.compile: fused blocks or plain ones (fastresnet/training).
    "train_step": Op(("fused", "plain"), {"fused": RUN_1, "plain": RUN_1}),
}


# ---------------------------------------------------------------------------
# The switches
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    fixed: bool  # FASTRESNET_DISPATCH=fixed
    pins: dict[str, str]  # op name or prefix -> candidate (or "fixed")
    experimental: bool
    tiles_fixed: bool

    def pin_for(self, op: str) -> Optional[str]:
        """The pinned candidate of `op`: its own pin, else the pin of the longest prefix that it has."""
        if op in self.pins:
            return self.pins[op]
        parts = op.split(".")
        for n in range(len(parts) - 1, 0, -1):
            pin = self.pins.get(".".join(parts[:n]))
            if pin is not None and (pin == "fixed" or _knows(OPS[op], pin)):
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


def settings() -> Settings:
    spec = _override if _override is not None else os.environ.get(DISPATCH_ENV, "")
    tiles = os.environ.get(TILES_ENV, "search").strip() or "search"
    if tiles not in ("search", "fixed"):
        raise ValueError(f"{TILES_ENV}={tiles!r}: expected 'search' (time every tile) or 'fixed' (one tile per rule)")
    experimental = os.environ.get(EXPERIMENTAL_ENV, "0").strip().lower() in ("1", "true", "yes", "on")
    fixed, pins = parse_dispatch(spec)
    return Settings(fixed, pins, experimental, tiles == "fixed")


@functools.lru_cache(maxsize=64)
def _parsed(spec: str) -> tuple[bool, tuple[tuple[str, str], ...]]:
    fixed, pins = False, []
    for item in (part.strip() for part in spec.split(",")):
        if item in ("", "measure"):
            continue
        if item == "fixed":
            fixed = True
            continue
        op, sep, candidate = (s.strip() for s in item.partition("="))
        if not sep:
            raise ValueError(f"{DISPATCH_ENV}: {item!r} is neither 'measure', 'fixed' nor 'op=candidate'; {_ops_help()}")
        matching = [name for name in OPS if name == op or name.startswith(op + ".")]
        if not matching:
            raise ValueError(f"{DISPATCH_ENV}: no op {op!r}; {_ops_help()}")
        if candidate != "fixed" and not any(_knows(OPS[name], candidate) for name in matching):
            valid = sorted({c for name in matching for c in OPS[name].candidates})
            raise ValueError(f"{DISPATCH_ENV}: {op!r} has no candidate {candidate!r}; it has {valid} "
                             "('p:' stands for 'p:<tile>') or 'fixed'")
        pins.append((op, candidate))
    return fixed, tuple(pins)


def parse_dispatch(spec: str) -> tuple[bool, dict[str, str]]:
    """(everything fixed?, {op: pinned candidate}) of a FASTRESNET_DISPATCH value; raises on a bad one."""
    fixed, pins = _parsed(spec)
    return fixed, dict(pins)


def _ops_help() -> str:
    return "ops: " + ", ".join(f"{name} {list(op.candidates)}" for name, op in OPS.items())


def _knows(op: Op, candidate: str) -> bool:
    family = candidate.partition(":")[0] + ":"
    return candidate in op.candidates or (":" in candidate and family in op.candidates)


def _family(name: str) -> Optional[str]:
    return name.partition(":")[0] + ":" if ":" in name else None


# ---------------------------------------------------------------------------
# Decisions: this process's memory and the disk cache
# ---------------------------------------------------------------------------

_decisions: dict[str, dict] = {}  # key -> {"op", "choice", "times_ms", "source"}
_disk: dict[str, dict] = {}  # cache file -> its entries, read once per process
_tuned: list["Tuned"] = []


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
    for tuned in _tuned:
        tuned.memo.clear()


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
    the GPU and versions they hold for; returns how many."""
    _, tag, stored = _disk_entries(device)
    entries = {**stored, **{k: {f: v for f, v in e.items() if f != "source"} for k, e in _decisions.items()}}
    save_cache(Path(path), tag, entries)
    return len(entries)


def import_decisions(path: Path, device: torch.device) -> int:
    """Add the decisions of a file written by export_decisions to this machine's cache; returns how many.
    Raises ValueError, naming what differs, for a file made on another GPU or other versions, or one
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
# Timing and checking
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
        except Exception as err:  # an unsupported cuDNN configuration, a Triton compile error, a failed check
            log.info("tuning: candidate %s failed and is left out: %s", name, err)
    return times


class Progress:
    """A line on `stream` as each candidate starts, so that a first call's measurement (every candidate
    compiled, then timed) is no silent pause: which problem and candidate, and an estimate of what is
    left of the problem from what its candidates so far took (their compiles included). A problem
    measured inside a candidate's first call (a kernel's tile inside a backward path) is indented."""

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


_progress: Optional[Progress] = None


def show_progress(progress: Optional[Progress]) -> None:
    """Report every measurement to `progress` (None: quietly, the default)."""
    global _progress
    _progress = progress


# ||out - expected|| / ||expected|| of a candidate that computes the same thing is rounding (bf16: about
# 2^-8 per element): far below this unless the candidate computes something else.
CHECK_RTOL = 3e-2


def checked_on_first_call(op: str, name: str, run: Callable[[], object], expected: Callable[[], object],
                          outputs: Callable[[object], Iterable] = lambda out: (out,),
                          rtol: float = CHECK_RTOL) -> Callable[[], object]:
    """run, whose first call (the measurement's first, untimed warm-up) also compares its output
    tensors (`outputs(result)`, None entries skipped) with expected()'s; a mismatch warns and raises,
    which leaves the candidate out of the measurement."""
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


def can_measure(device: torch.device) -> bool:
    """Whether candidates can be timed on `device` (a GPU); tests make the CPU pretend."""
    return device.type == "cuda"


def needs_proof(device: torch.device) -> bool:
    """Whether a candidate must have run on a GPU before it may compete on `device` (a GPU: an illegal
    memory access there ends the process; the CPU's interpreter cannot do that harm)."""
    return device.type == "cuda"


def capturing(device: torch.device) -> bool:
    """Whether `device`'s current stream is capturing a CUDA graph (timing would spoil the capture)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------------
# The choice
# ---------------------------------------------------------------------------


class Tuned:
    """The measured choice of one op of OPS (see the module docstring)."""

    def __init__(self, name: str):
        if name not in OPS:
            raise KeyError(f"no op {name!r} in fastresnet.ops.tuning.OPS")
        self.name, self.op = name, OPS[name]
        self.memo: dict[tuple, str] = {}  # signature -> choice
        _tuned.append(self)

    def known(self, signature: tuple) -> Optional[str]:
        """The choice already made for `signature`, or None."""
        return self.memo.get(signature)

    def remember(self, signature: tuple, choice: str) -> None:
        """Fix the choice for `signature` without timing (a fallback when timing failed)."""
        self.memo[signature] = choice

    def choose(self, signature: tuple, device: torch.device, *,
               names: Sequence[str] | Callable[[], Sequence[str]], fixed: str, key: Callable[[], str],
               runs: Callable[[Sequence[str]], dict[str, Callable[[], object]]],
               expected: Optional[Callable[[], object]] = None,
               outputs: Callable[[object], Iterable] = lambda out: (out,)) -> str:
        """The candidate to run for the problem of `signature`.

        names: the candidates that can run this problem (or a function giving them); fixed: the one
        that runs where nothing is timed; key(): the problem as a string (the disk cache's key);
        runs(names): zero-argument callables running those candidates on the real inputs;
        expected(): the known-good result a never-run candidate's first call is compared with
        (default: the op's check_against candidate); outputs(result): the tensors compared.
        """
        choice = self.memo.get(signature)
        if choice is None:
            choice, final = self._decide(device, names if callable(names) else lambda: names, fixed, key, runs,
                                         expected, outputs)
            if final:
                self.memo[signature] = choice
        return choice

    def allowed(self, names: Sequence[str], device: torch.device, current: Optional[Settings] = None) -> list[str]:
        """The candidates of `names` that may be timed on `device` under the switches."""
        current = current or settings()
        names = list(names)
        if current.tiles_fixed:
            kept, seen = [], set()
            for name in names:
                family = _family(name)
                if family is None:
                    kept.append(name)
                elif family not in self.op.family_rules and family not in seen:
                    kept.append(name)  # a family without a rule tile keeps its first member
                seen.add(family)
            names = kept
        if needs_proof(device) and not current.experimental:
            names = [name for name in names if name in self.op.proven]
        return names

    def _decide(self, device, names, fixed, key, runs, expected, outputs) -> tuple[str, bool]:
        """(choice, whether to remember it for the signature); names() is only asked where needed (it may
        read the GPU's properties)."""
        current = settings()
        pin = current.pin_for(self.name)
        if pin is not None and pin != "fixed":
            runnable = pin in names()
            if not runnable:
                log.info("tuning: %s pinned to %s, which cannot run %s: the fixed rule %s runs", self.name, pin,
                         key(), fixed)
            return (pin if runnable else fixed), True
        if pin == "fixed" or current.fixed or not can_measure(device) or (current.tiles_fixed and self.op.tiles_only):
            return fixed, True
        allowed = self.allowed(names(), device, current)
        if fixed not in allowed:
            allowed.insert(0, fixed)
        if len(allowed) == 1:
            return allowed[0], True
        problem = key()
        if capturing(device):  # no timing inside a capture: a choice made before, else the rule (not kept)
            choice = remembered(problem, allowed, device)
            return (choice, True) if choice is not None else (fixed, False)
        choice = remembered(problem, allowed, device)
        if choice is None:
            choice = self._measure(problem, allowed, device, runs, expected, outputs)
        return choice, True

    def _measure(self, problem, allowed, device, runs, expected, outputs) -> str:
        candidates = dict(runs(allowed))
        unproven = [name for name in candidates if name not in self.op.proven]
        if unproven:
            if expected is None:
                expected = runs([self.op.check_against])[self.op.check_against]
            expected = functools.cache(expected)
            for name in unproven:
                candidates[name] = checked_on_first_call(self.name, name, candidates[name], expected, outputs)
        if _progress is not None:
            _progress.problem(self.name, problem, list(candidates))
            candidates = {name: _progress.reporting(name, run) for name, run in candidates.items()}
        times = measure(candidates, device)
        if not times:
            if _progress is not None:
                _progress.failed()
            raise RuntimeError(f"fastresnet {self.name}: every candidate failed for {problem}: {sorted(candidates)}")
        choice = min(times, key=times.get)
        entry = {"op": self.name, "choice": choice, "times_ms": {k: round(v, 5) for k, v in times.items()}}
        failed = [name for name in candidates if name not in times]
        if failed:  # remembered too: a later process need not try them again
            entry["failed"] = failed
        _decisions[problem] = {**entry, "source": "measured"}
        log.info("tuning %s -> %s (%s)", problem, choice,
                 ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(times.items())))
        _remember_on_disk(device, problem, entry)
        if _progress is not None:
            _progress.chosen(choice, times)
        return choice


def proven_candidates() -> dict[str, dict[str, str]]:
    """{op: {candidate: the run that showed it}}: what a default run on a GPU can reach."""
    return {name: dict(op.proven) for name, op in OPS.items()}
