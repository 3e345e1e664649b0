"""Training the runs of an experiment, each once: skip what is finished, resume what is not.

Every experiment trains its nets with `fastresnet.training.train` into
`<out>/runs/<model>[-<shortcut>]-<hash>/`, where the hash is taken over the
fields of the run's resolved config that differ from TrainConfig's defaults
(without the fields that only change how it is shown). So a run is defined by
its settings: an experiment re-run with the same settings finds its runs;
`layer-responses` finds the nets `degradation` trained with the same budget;
different budgets never mix; and a field added to TrainConfig later, at its
default, leaves the names of runs that take hours to train unchanged.

A run is finished when `done.json` sits beside its checkpoint (written after
`train` returned "completed", with the run's summary and its layer responses,
so that its record serves every experiment without the checkpoint). A run with a checkpoint but no `done.json` was
interrupted (SIGTERM, Ctrl-C, a crash, a kill): it is resumed from that
checkpoint, after the metrics logged past the checkpoint's step are dropped
so that no step is counted twice. A run folder with no checkpoint starts over.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from fastresnet.flops import count_params
from fastresnet.models import get_model
from fastresnet.training import TrainConfig, train
from fastresnet.training.checkpoint import CHECKPOINT_NAME, CheckpointError
from fastresnet.training.fields import replace_fields
from fastresnet.training.fields import to_dict
from fastresnet.training.metrics import read_jsonl

from .responses import measure
from .tables import write_json

DONE_NAME = "done.json"
LOCKS_NAME = ".locks"  # beside the run folders: one lock file per run
# Fields that change how a run is shown or stopped, not what it computes.
PRESENTATION_FIELDS = ("out_dir", "run_name", "progress", "plot", "stop_at_step")
# Settings a run name leaves unsaid besides TrainConfig's defaults: fp32, which the experiments train in on
# a CPU (settings.pinned_precision), as every run named before that did.
UNSAID = {"amp": "off"}
# The final training error is the mean over this last fraction of the iterations
# (a single logging window is too noisy to compare nets by).
FINAL_WINDOW = 0.1


def run_name(cfg: TrainConfig) -> str:
    defaults = {**flat_values(to_dict(TrainConfig())), **UNSAID}
    settings = {k: v for k, v in flat_values(to_dict(cfg)).items()
                if k not in PRESENTATION_FIELDS and (k not in defaults or v != defaults[k])}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    shortcut = f"-{cfg.shortcut}" if cfg.shortcut else ""
    return f"{cfg.model}{shortcut}-{digest}"


def flat_values(tree: dict, prefix: str = "") -> dict:
    """{"lr": 0.1, "data.batch_size": 128, ...}; tuples as lists, as config.json holds them."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_values(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out


def named(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the run name its settings give."""
    return replace_fields(cfg, run_name=run_name(cfg))


@dataclass
class RunOutcome:
    name: str  # run folder name
    model: str
    run_dir: Path
    status: str  # "completed", "interrupted", "stopped-at-step"
    action: str  # "trained", "resumed" or "finished earlier"
    summary: dict = field(default_factory=dict)  # summarize(run_dir) once completed

    @property
    def finished(self) -> bool:
        return self.status == "completed"


@contextlib.contextmanager
def run_lock(run_dir: Path, say=print, wait: bool = True):
    """One process at a time trains a run: two experiment commands sharing an --out (one per core, say)
    never train the same run twice or into each other. Yields whether this process holds the lock: the
    second process waits here, then finds the run finished; with `wait` False it is told False at once.
    The lock is a file in a hidden folder beside the run's (a new run must not find its own folder existing)."""
    locks = run_dir.parent / LOCKS_NAME
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{run_dir.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            say(f"    another process is training {run_dir.name}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield True  # the lock goes with the file's closing, also when the process dies


def train_or_resume(cfg: TrainConfig, say=print, wait: bool = True) -> RunOutcome | None:
    """Train the run described by `cfg` (whose run_name and out_dir say where), or finish or skip it.
    None when another process is training it and `wait` is False."""
    run_dir = Path(cfg.out_dir) / cfg.run_name
    with run_lock(run_dir, say, wait) as held:
        return train_or_resume_locked(cfg, run_dir) if held else None


def train_or_resume_locked(cfg: TrainConfig, run_dir: Path) -> RunOutcome:
    """train_or_resume for a caller that holds the run's lock."""
    done = run_dir / DONE_NAME
    if done.is_file():
        return RunOutcome(cfg.run_name, cfg.model, run_dir, "completed", "finished earlier", summarize(run_dir))
    checkpoint = run_dir / CHECKPOINT_NAME
    if checkpoint.is_file():  # train drops the metrics logged past the checkpoint's step
        result, action = train(cfg, resume=run_dir), "resumed"
    else:
        if run_dir.exists():  # died before its first checkpoint: nothing to keep
            shutil.rmtree(run_dir)
        result, action = train(cfg), "trained"
    outcome = RunOutcome(cfg.run_name, cfg.model, run_dir, result["status"], action)
    if outcome.finished:
        outcome.summary = summarize(run_dir)
        write_json(done, {"result": result, "summary": outcome.summary, "responses": measure(run_dir)})
    return outcome


def recorded_responses(run_dir: Path) -> dict:
    """A finished run's layer responses (responses.measure): those its record holds, measured when it
    finished, so that the record alone, without the checkpoint, serves `layer-responses`; else, for a run
    finished before records held them, measured now from its checkpoint."""
    record = json.loads((run_dir / DONE_NAME).read_text())
    if "responses" in record:
        return record["responses"]
    if not (run_dir / CHECKPOINT_NAME).is_file():
        raise CheckpointError(f"{run_dir} finished before run records held their layer responses, and its "
                              f"{CHECKPOINT_NAME} is not there to measure them (another machine trained it?): "
                              "delete the folder to train it again, or put its checkpoint back")
    return measure(run_dir)


def summarize(run_dir: Path) -> dict:
    """The numbers an experiment reports for one run, all read from its metrics.jsonl and config.json."""
    config = json.loads((run_dir / "config.json").read_text())
    records = latest_per_step(read_jsonl(run_dir / "metrics.jsonl"))
    train_records = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    last_step = max((r["step"] for r in records), default=0)
    window = [r for r in train_records if r["step"] > (1 - FINAL_WINDOW) * last_step] or train_records[-1:]
    model = get_model(config["model"], **({"shortcut": config["shortcut"]} if config.get("shortcut") else {}))
    return {
        "model": config["model"],
        "shortcut": config.get("shortcut") or "",
        "seed": config["seed"],
        "params": count_params(model),
        "steps": last_step,
        "train_curve": [[r["step"], r["error"]] for r in train_records],
        "test_curve": [[r["step"], r["top1_error"]] for r in evals],
        "by_epoch": by_epoch(train_records, evals),
        "final_train_error": mean([r["error"] for r in window]),
        "final_test_error": evals[-1]["top1_error"] if evals else math.nan,
        "run_dir": str(run_dir),
    }


def by_epoch(train_records: list[dict], evals: list[dict]) -> list[dict]:
    """Per epoch: the lr it ended at, the mean of the training-error windows logged in it (a window counts
    for the epoch it ends in) and the test error after it (None where it was not tested). A last, partial
    epoch counts as one."""
    rows: dict[int, dict] = {}
    for r in train_records + evals:
        rows.setdefault(epoch_number(r), {"lr": None, "windows": [], "test_error": None})
    for r in train_records:
        rows[epoch_number(r)]["windows"].append(r["error"])
        rows[epoch_number(r)]["lr"] = r["lr"]
    for r in evals:
        rows[epoch_number(r)]["test_error"] = r["top1_error"]
    return [{"epoch": n, "lr": row["lr"], "train_error": mean(row["windows"]) if row["windows"] else None,
             "test_error": row["test_error"]} for n, row in sorted(rows.items())]


def epoch_number(record: dict) -> int:
    """The epoch, from 1, that a record's step ends in: with 468 steps an epoch, steps 1 to 468 are epoch 1."""
    return max(1, math.ceil(round(record["epoch"], 6)))


def latest_per_step(records: list[dict]) -> list[dict]:
    """One record per (kind, step), the last written: a run resumed from its final checkpoint evaluates again."""
    latest = {(r.get("kind"), r.get("step")): r for r in records}
    return sorted(latest.values(), key=lambda r: (r.get("step", 0), r.get("kind") != "train"))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def over_seeds(summaries: list[dict]) -> dict:
    """One net trained once per seed, as one summary: the first seed's curves (a figure draws one run, as
    the paper's do), the by-epoch errors as means over the seeds, and each final error the mean over the
    seeds, beside its per-seed values, sample std and best (the paper's "best (mean +- std)")."""
    combined = dict(summaries[0], seeds=[s["seed"] for s in summaries])
    if len(summaries) > 1:
        combined["by_epoch"] = by_epoch_over_seeds([s["by_epoch"] for s in summaries])
    for key in ("final_train_error", "final_test_error"):
        values = [s[key] for s in summaries]
        combined[key] = mean(values)
        combined[f"{key}_seeds"] = values
        combined[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        combined[f"{key}_best"] = min(values)
    return combined


def by_epoch_over_seeds(runs: list[list[dict]]) -> list[dict]:
    """by_epoch rows of several runs of one schedule as one: each error the mean over the runs, None in an
    epoch where some run has none (a mean of the seeds that have it would mix seeds from epoch to epoch)."""
    per_run = [{row["epoch"]: row for row in rows} for rows in runs]
    combined = []
    for epoch in sorted(set().union(*per_run)):
        epoch_rows = [rows.get(epoch, {}) for rows in per_run]
        row = {"epoch": epoch, "lr": next((r["lr"] for r in epoch_rows if r), None)}
        for key in ("train_error", "test_error"):
            values = [r.get(key) for r in epoch_rows]
            row[key] = None if None in values else mean(values)
        combined.append(row)
    return combined


def by_net(outcomes: list[RunOutcome]) -> dict[str, dict]:
    """{model or model-shortcut: over_seeds(its runs' summaries)}, in the order the nets first trained."""
    groups: dict[str, list[dict]] = {}
    for outcome in outcomes:
        s = outcome.summary
        groups.setdefault(s["model"] + (f"-{s['shortcut']}" if s["shortcut"] else ""), []).append(s)
    return {name: over_seeds(summaries) for name, summaries in groups.items()}


def train_all(configs: list[TrainConfig], say=print) -> tuple[list[RunOutcome], bool]:
    """Train the runs in order; stop at the first one that is interrupted. A run that another process is
    training (a second queue on the other core) is put off until the others are done, then waited for, so
    that two queues meeting on a run keep both cores training. Returns (outcomes in the configs' order,
    all finished)."""
    outcomes: dict[int, RunOutcome] = {}
    attempts = [(i, False) for i in range(len(configs))]  # (index, wait for another process)
    for i, wait in attempts:  # a run put off is appended, and so comes again after the others
        cfg = configs[i]
        say(f"[{i + 1}/{len(configs)}] {describe(cfg)}{', put off earlier' if wait else ''}: "
            f"{Path(cfg.out_dir) / cfg.run_name}")
        outcome = train_or_resume(cfg, say, wait)
        if outcome is None:
            say(f"    another process is training {cfg.run_name}; coming back to it after the others")
            attempts.append((i, True))
            continue
        outcomes[i] = outcome
        if not record(outcome, say):
            break
    ordered = [outcomes[i] for i in sorted(outcomes)]
    return ordered, len(ordered) == len(configs) and all(o.finished for o in ordered)


def describe(cfg: TrainConfig) -> str:
    return f"{cfg.model}{' shortcut ' + cfg.shortcut if cfg.shortcut else ''} seed {cfg.seed}"


def record(outcome: RunOutcome, say) -> bool:
    """Say how a run ended; whether it finished."""
    if not outcome.finished:
        say(f"run {outcome.name} stopped ({outcome.status}) with a checkpoint; "
            "run the same command again to continue where it stopped")
        return False
    say(f"    {outcome.action}: test error {outcome.summary['final_test_error']:.2f}%, "
        f"final training error {outcome.summary['final_train_error']:.2f}%")
    return True
