"""`warmup`: ResNet-110's first steps with and without the paper's 0.01 warm-up.

The paper (Section 4.2) finds lr 0.1 "slightly too large to start converging" for ResNet-110, so it
trains at 0.01 until the training error is below 80% (about 400 iterations), then at 0.1. This trains
the first `--steps` steps of the same schedule twice: with the `paper-cifar` recipe's warm-up (the
very run `depth-sweep` trains and later continues) and without it. It compares their training error
curves: the first logged step below 80%, and whether either diverged (a non-finite loss, kept as
`diverged.json` in its run folder so that running the command again does not retrain it). The
warm-up is shown to matter if the run without it diverges or falls below 80% later than the run with it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastresnet.training import NonFiniteLoss, TrainConfig
from fastresnet.training.fields import replace_fields
from fastresnet.training.metrics import read_jsonl

from .figures import warmup_figure
from .runs import DONE_NAME, named, run_lock, train_or_resume_locked
from .settings import ConfigError, Settings, provenance, train_config
from .tables import markdown_table, publish, read_json_if_any, write_json

NAME = "warmup"
DEPTHS = (20, 32, 44, 56, 110)  # the paper warms up 110 only; the shallower ones make quick tests
THRESHOLD = 80.0  # percent training error: the paper's end of the warm-up
DEFAULT_DEPTH = 110  # the paper warms up ResNet-110 only
DEFAULT_STEPS = 800  # twice the paper's ~400 warm-up iterations
DIVERGED_NAME = "diverged.json"
VERDICT = {True: "yes", False: "no", None: f"not decided: neither run reached {THRESHOLD:g}% in these steps"}


def with_warmup(cfg: TrainConfig, warmup: bool) -> TrainConfig:
    """`cfg` with the paper's ResNet-110 warm-up (lr 0.01 until the training error is below 80%) or with
    none, named by its settings: ResNet-110 with the warm-up is the run `depth-sweep` trains."""
    if warmup:
        cfg = replace_fields(cfg, warmup=0.0, warmup_kind="constant", warmup_lr=0.01,
                             warmup_until_train_error=THRESHOLD)
    else:
        cfg = replace_fields(cfg, warmup=0.0, warmup_kind="linear", warmup_lr=0.0, warmup_until_train_error=0.0)
    return named(cfg)


def first_steps(cfg: TrainConfig, steps: int, say=print) -> dict | None:
    """The training records of the run's first `steps` steps, training (or resuming) it that far if its
    metrics do not reach there yet: {"records": [...], "diverged": message or None}; None if interrupted."""
    run_dir = Path(cfg.out_dir) / cfg.run_name
    with run_lock(run_dir, say):  # what the run holds is read after any other process training it is done
        diverged = read_json_if_any(run_dir / DIVERGED_NAME)
        if diverged is None and not (run_dir / DONE_NAME).is_file() and _logged_up_to(run_dir) < steps:
            say(f"{cfg.model} ({'with' if cfg.warmup_until_train_error else 'without'} warm-up): first {steps} "
                f"steps in {run_dir}")
            try:
                if train_or_resume_locked(replace_fields(cfg, stop_at_step=steps), run_dir).status == "interrupted":
                    return None
            except NonFiniteLoss as err:
                diverged = {"message": str(err), "step": _logged_up_to(run_dir)}
                write_json(run_dir / DIVERGED_NAME, diverged)
    records = [r for r in _train_records(run_dir) if r["step"] <= steps]
    return {"run_dir": str(run_dir), "records": records, "diverged": diverged and diverged["message"]}


def _train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    latest = {r["step"]: r for r in read_jsonl(path) if r.get("kind") == "train"} if path.is_file() else {}
    return [latest[step] for step in sorted(latest)]


def _logged_up_to(run_dir: Path) -> int:
    records = _train_records(run_dir)
    return records[-1]["step"] if records else 0


def first_below(records: list[dict], threshold: float = THRESHOLD) -> int | None:
    return next((r["step"] for r in records if r["error"] < threshold), None)


def run(settings: Settings, depth: int, steps: int, say=print) -> dict | None:
    if depth not in DEPTHS:
        raise ConfigError(f"--depth {depth}: choose one of {', '.join(map(str, DEPTHS))}")
    if not 0 < steps <= settings.budget().iterations:
        raise ConfigError(f"--steps {steps}: must lie in 1..{settings.budget().iterations}, the run's length")
    cfg = train_config(settings, f"resnet{depth}")
    variants = {"with warm-up": with_warmup(cfg, True), "without warm-up": with_warmup(cfg, False)}
    curves = {}
    for label, cfg in variants.items():
        curves[label] = first_steps(cfg, steps, say)
        if curves[label] is None:
            return None
    below = {label: first_below(c["records"]) for label, c in curves.items()}
    with_step, without_step = below["with warm-up"], below["without warm-up"]
    if curves["without warm-up"]["diverged"] or (with_step is not None and (without_step or steps + 1) > with_step):
        shown = True
    elif without_step is not None and (with_step is None or with_step >= without_step):
        shown = False
    else:  # neither run reached the threshold in these steps
        shown = None
    result = {"experiment": NAME, "dataset": settings.dataset, **provenance(settings), "model": f"resnet{depth}",
              "steps": steps, "threshold": THRESHOLD, "curves": curves, "first_below_threshold": below,
              "shown": shown,
              "criterion": f"shown if without warm-up the run diverges or its training error first falls below "
                           f"{THRESHOLD:g}% later than with the warm-up (lr 0.01 until then)"}
    folder = settings.outputs_folder(NAME, depth=(depth, DEFAULT_DEPTH), steps=(steps, DEFAULT_STEPS))
    return write_outputs(folder, result, say)


def write_outputs(folder: Path, result: dict, say) -> dict:
    curves = result["curves"]
    figure = warmup_figure(folder / "warmup.png", {label: c["records"] for label, c in curves.items()},
                           result["threshold"], f"{result['model']}: the first {result['steps']} steps")
    rows = []
    for label, c in curves.items():
        records = c["records"]
        first = result["first_below_threshold"][label]
        rows.append([label, first if first is not None else "not reached", records[0]["error"] if records else None,
                     records[-1]["error"] if records else None, max((r["loss"] for r in records), default=None),
                     "yes" if c["diverged"] else "no"])
    text = (
        f"# Warm-up, {result['model']} ({result['dataset']}, first {result['steps']} steps)\n\n"
        + markdown_table(["run", f"first step below {result['threshold']:g}% training error",
                          "first logged training error %", "last logged training error %", "largest logged loss",
                          "diverged"], rows)
        + f"\nWarm-up needed: **{VERDICT[result['shown']]}** ({result['criterion']}).\n"
    )
    return publish(folder, result, text, figure, say)


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH,
                        help=f"the ResNet depth, from {DEPTHS} (the paper's: {DEFAULT_DEPTH})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help="how many of the schedule's first steps to train and compare")


def main(args: argparse.Namespace, settings: Settings) -> dict | None:
    return run(settings, args.depth, args.steps)
