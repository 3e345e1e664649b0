"""What every experiment shares: where outputs go, which data, the training budget.

Every run starts from the `paper-cifar` recipe (batch 128, lr 0.1, weight
decay 1e-4, momentum 0.9, ResNet-110 warmed up at 0.01). The budget defaults
to the paper's when a CIFAR-10 folder is given (lr divided by 10 at 32k and
48k iterations, stop at 64k, evaluation every epoch on the 10k test images)
and to a small one on the bundled `digits` set (1500 training images: 11
steps per epoch at batch 128), which trains in seconds on a GPU
and minutes on a CPU. Any TrainConfig field can still be set with
`--set field=value` (for example `--set compile=off`).
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastresnet.data import DataConfig
from fastresnet.training import TrainConfig
from fastresnet.training.config import replace_fields
from fastresnet.training.fields import ConfigError, apply_flat
from fastresnet.training.recipes import read_recipe, recipe_values
from fastresnet.training.rundir import environment

from .runs import run_name


@dataclass(frozen=True)
class Budget:
    iterations: int  # optimizer steps per run
    milestones: tuple[int, ...]  # steps at which the lr is divided by 10
    eval_every: int  # epochs between test evaluations (the bold curves of Figure 6)


PAPER_CIFAR_BUDGET = Budget(iterations=64000, milestones=(32000, 48000), eval_every=1)
DIGITS_BUDGET = Budget(iterations=400, milestones=(200, 300), eval_every=2)
PAPER_BATCH = 128  # images per step
RECIPE = "paper-cifar"  # fastresnet/recipes/paper-cifar.toml: lr, momentum, weight decay, ResNet-110 warm-up


@dataclass
class Settings:
    out: Path = Path("experiments")  # the experiment's outputs and its runs/ go here
    data: str | None = None  # a cifar-10-batches-py folder; None: the bundled digits set
    iterations: int | None = None  # None: the budget of the data (paper's for CIFAR-10)
    milestones: tuple[int, ...] | None = None  # steps; None: the budget's (scaled with --iterations if given)
    eval_every: int | None = None  # epochs; None: the budget's
    batch_size: int = PAPER_BATCH
    seed: int = 0
    overrides: dict[str, str] = field(default_factory=dict)  # TrainConfig fields, dotted names
    progress: str = "auto"
    stop_at_step: int = 0  # > 0: every run stops (checkpointed) at this step, as if preempted (tests)

    def budget(self) -> Budget:
        base = PAPER_CIFAR_BUDGET if self.data else DIGITS_BUDGET
        iterations = self.iterations or base.iterations
        milestones = self.milestones
        if milestones is None:  # the paper's milestones at the same fractions (1/2 and 3/4) of the run
            milestones = tuple(round(m * iterations / base.iterations) for m in base.milestones)
            milestones = tuple(m for m in milestones if 0 < m < iterations)
        elif not all(0 < m < iterations for m in milestones):
            raise ConfigError(f"--milestones {milestones}: each must lie inside the run's 1..{iterations - 1} steps")
        return Budget(iterations, milestones, self.eval_every if self.eval_every is not None else base.eval_every)

    def data_config(self) -> DataConfig:
        if self.data is None:
            return DataConfig(backend="digits", batch_size=self.batch_size, val_batch_size=500)
        root = Path(self.data).expanduser()
        if not (root / "data_batch_1").is_file():
            raise ConfigError(f"--data {self.data}: not a cifar-10-batches-py folder (no {root / 'data_batch_1'})")
        return DataConfig(backend="cifar10", root=str(root), batch_size=self.batch_size, val_batch_size=1000)

    @property
    def dataset(self) -> str:
        return "cifar10" if self.data else "digits"


def train_config(settings: Settings, model: str, shortcut: str = "") -> TrainConfig:
    """The `paper-cifar` recipe for `model` (with its ResNet-110 warm-up), the settings' budget and data."""
    budget = settings.budget()
    if shortcut == "A":  # the CIFAR nets' default: the same run as no option given (degradation's ResNets)
        shortcut = ""
    recipe = recipe_values(read_recipe(RECIPE), model)
    cfg = apply_flat(TrainConfig(), {**recipe, "model": model}, f"recipe {RECIPE}")
    log_every = min(cfg.log_every, max(1, budget.iterations // 50))  # short runs still draw a curve
    cfg = replace_fields(
        cfg, shortcut=shortcut, data=settings.data_config(), unit="step", length=float(budget.iterations),
        schedule="step" if budget.milestones else "constant", lr_milestones=tuple(float(m) for m in budget.milestones),
        eval_every=budget.eval_every, log_every=log_every, out_dir=str(settings.out / "runs"),
        progress=settings.progress, seed=settings.seed, stop_at_step=settings.stop_at_step,
    )
    cfg = apply_flat(cfg, settings.overrides, "--set")
    return apply_flat(cfg, {"run_name": run_name(cfg)}, "run name")


# --- the command-line flags every experiment shares


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="experiments", help="folder for the outputs and the runs/ they train")
    parser.add_argument("--data", default=None,
                        help="a cifar-10-batches-py folder (the paper's budget); without it: the bundled digits set")
    parser.add_argument("--iterations", type=int, default=None,
                        help=f"steps per run (default: {PAPER_CIFAR_BUDGET.iterations} on CIFAR-10, "
                        f"{DIGITS_BUDGET.iterations} on digits)")
    parser.add_argument("--milestones", default=None,
                        help="steps where the lr is divided by 10, comma-separated (default: 1/2 and 3/4 of the run)")
    parser.add_argument("--eval-every", type=int, default=None, help="epochs between test evaluations")
    parser.add_argument("--batch-size", type=int, default=PAPER_BATCH, help="images per step")
    parser.add_argument("--seed", type=int, default=0, help="the same seed for every net")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="any python -m fastresnet.train field, e.g. --set compile=off (repeatable)")
    parser.add_argument("--progress", default="auto", choices=("auto", "bar", "lines", "off"))
    parser.add_argument("--stop-at-step", type=int, default=0, help=argparse.SUPPRESS)


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {}
    for item in args.set:
        name, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE")
        overrides[name.strip()] = value.strip()
    milestones = None
    if args.milestones is not None:
        try:
            milestones = tuple(int(m) for m in args.milestones.split(",") if m.strip())
        except ValueError:
            raise ConfigError(f"--milestones {args.milestones!r}: expected whole steps separated by commas") from None
    if args.iterations is not None and args.iterations < 1:
        raise ConfigError(f"--iterations must be >= 1, got {args.iterations}")
    return Settings(
        out=Path(args.out), data=args.data, iterations=args.iterations, milestones=milestones,
        eval_every=args.eval_every, batch_size=args.batch_size, seed=args.seed, overrides=overrides,
        progress=args.progress, stop_at_step=args.stop_at_step,
    )


def parse_depths(text: str, allowed: tuple[int, ...]) -> tuple[int, ...]:
    try:
        depths = tuple(int(d) for d in text.split(",") if d.strip())
    except ValueError:
        raise ConfigError(f"depths {text!r}: expected whole numbers separated by commas") from None
    bad = [d for d in depths if d not in allowed]
    if bad or not depths:
        raise ConfigError(f"depths {text!r}: choose from {', '.join(map(str, allowed))}")
    return tuple(sorted(set(depths)))


def provenance(settings: Settings) -> dict:
    """What a result needs to be traced: the experiment's settings, versions, device and git revision."""
    return {"settings": {**settings.__dict__, "out": str(settings.out), "budget": settings.budget().__dict__},
            "environment": _environment()}


@functools.lru_cache(maxsize=1)
def _environment() -> dict:
    """Once per process: the git and device queries take a second or two."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device, world_size=1)
    env["command"] = " ".join([sys.executable, "-m", "fastresnet.experiments", *sys.argv[1:]])
    return env
