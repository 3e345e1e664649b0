"""What every experiment shares: where outputs go, which data, the training budget.

Every run starts from the `paper-cifar` recipe (batch 128, lr 0.1, weight
decay 1e-4, momentum 0.9, ResNet-110 warmed up at 0.01). The budget follows
the data (`--dataset`, else inferred from `--data`):

- cifar10 (`--data` a cifar-10-batches-py folder): the paper's (lr divided by
  10 at 32k and 48k iterations, stop at 64k, evaluation every epoch on the 10k
  test images);
- fashion-mnist (`--data` its folder, default /usr/share/datasets/fashion-mnist):
  the paper's on a GPU; on a CPU the paper's step schedule compressed to 30
  epochs (FASHION_MNIST_CPU_BUDGET), the same for every net and experiment so
  that they share their runs: `layer-responses`, `depth-sweep` and `shortcuts`
  reuse the nets `degradation` trained. `--quick` is a 1.3-epoch look
  (FASHION_MNIST_QUICK_BUDGET) that shows whether the pipeline works, not
  what deeper nets reach;
- digits (no `--data`): a small budget on the bundled 1500 training images (11
  steps per epoch at batch 128), seconds on a GPU, minutes on a CPU.

Any TrainConfig field can still be set with `--set field=value` (for example
`--set compile=off`), and `--iterations` overrides every preset. On a CPU the
runs train fp32 unless `--set amp=bf16` (pinned_precision: `amp=auto` would
differ from one CPU to the next).
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastresnet.data import DataConfig
from fastresnet.data.build import is_fashion_mnist_folder
from fastresnet.data.fashion_mnist import resolve_root
from fastresnet.training import TrainConfig
from fastresnet.training.fields import ConfigError, apply_flat, replace_fields
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
# Fashion-MNIST's 60,000 training images are 468 steps of 128. The paper's schedule (64k steps,
# lr / 10 at 1/2 and 3/4 of the run) compressed to 30 epochs: 15 epochs divided the lr while ResNet-56
# was still catching up with ResNet-20 (docs/results/fashion-mnist.md), 30 keep lr 0.1 for 15 epochs.
# About 3 hours for ResNet-20 and 7.5 for ResNet-56 on one core of a 2-core CPU.
FASHION_MNIST_EPOCHS = 30
_FASHION_MNIST_STEPS = FASHION_MNIST_EPOCHS * 468
FASHION_MNIST_CPU_BUDGET = Budget(iterations=_FASHION_MNIST_STEPS,
                                  milestones=(_FASHION_MNIST_STEPS // 2, _FASHION_MNIST_STEPS * 3 // 4), eval_every=1)
# A quick look (1.3 epochs, minutes per net): the ranking it gives is how fast nets start, not where they end.
FASHION_MNIST_QUICK_BUDGET = Budget(iterations=600, milestones=(300, 450), eval_every=1)
DATASETS = ("digits", "cifar10", "fashion-mnist")
PAPER_BATCH = 128  # images per step
RECIPE = "paper-cifar"  # fastresnet/recipes/paper-cifar.toml: lr, momentum, weight decay, ResNet-110 warm-up


@dataclass
class Settings:
    out: Path = Path("experiments")  # the experiment's outputs and its runs/ go here
    data: str | None = None  # the dataset's folder (cifar10: required; fashion-mnist: None = the apt install's)
    dataset: str = ""  # digits | cifar10 | fashion-mnist; "": cifar10 or fashion-mnist by the --data folder, else digits
    iterations: int | None = None  # None: the budget of the data (paper's for CIFAR-10)
    milestones: tuple[int, ...] | None = None  # steps; None: the budget's (scaled with --iterations if given)
    eval_every: int | None = None  # epochs; None: the budget's
    batch_size: int = PAPER_BATCH
    seeds: tuple[int, ...] = (0,)  # every net trains once per seed; tables give best (mean +- std) over them
    overrides: dict[str, str] = field(default_factory=dict)  # TrainConfig fields, dotted names
    progress: str = "auto"
    quick: bool = False  # Fashion-MNIST on a CPU: FASHION_MNIST_QUICK_BUDGET instead of the 30 epochs
    stop_at_step: int = 0  # > 0: every run stops (checkpointed) at this step, as if preempted

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1 image per step, got {self.batch_size}")
        if not self.dataset:
            self.dataset = "digits" if self.data is None else inferred_dataset(self.data)
        if self.dataset not in DATASETS:
            raise ConfigError(f"--dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(f"--seeds {','.join(map(str, self.seeds))}: give distinct whole numbers >= 0")
        if self.quick and self.dataset != "fashion-mnist":
            raise ConfigError(f"--quick is a Fashion-MNIST preset; --dataset is {self.dataset}")
        if self.dataset == "digits" and self.data is not None:
            raise ConfigError(f"--data {self.data}: the digits set is bundled and reads no folder")

    def base_budget(self) -> Budget:
        """The dataset's preset: the paper's, except digits and Fashion-MNIST on a CPU."""
        if self.dataset == "digits":
            return DIGITS_BUDGET
        if self.dataset == "fashion-mnist" and not self.on_gpu:
            return FASHION_MNIST_QUICK_BUDGET if self.quick else FASHION_MNIST_CPU_BUDGET
        return PAPER_CIFAR_BUDGET

    @property
    def on_gpu(self) -> bool:
        """Whether the runs will train on CUDA: the training program's device, auto unless --set."""
        device = self.overrides.get("device", "auto")
        return torch.cuda.is_available() if device == "auto" else device.startswith("cuda")

    def budget(self) -> Budget:
        base = self.base_budget()
        iterations = self.iterations or base.iterations
        milestones = self.milestones
        if milestones is None:  # the paper's milestones at the same fractions (1/2 and 3/4) of the run
            milestones = tuple(round(m * iterations / base.iterations) for m in base.milestones)
            milestones = tuple(m for m in milestones if 0 < m < iterations)
        elif not all(0 < m < iterations for m in milestones):
            raise ConfigError(f"--milestones {milestones}: each must lie inside the run's 1..{iterations - 1} steps")
        return Budget(iterations, milestones, self.eval_every if self.eval_every is not None else base.eval_every)

    def outputs_folder(self, name: str, **choices: tuple) -> Path:
        """Where experiment `name` writes its figure, table and numbers: <out>/<name>, suffixed with each
        choice (key=(value, default)) that is not its default and with the seeds unless they are seed 0
        alone, so that the same experiment run on other nets or seeds keeps each one's outputs."""
        parts = [name]
        parts += [f"{key}-{_joined(value)}" for key, (value, default) in choices.items() if value != default]
        if self.seeds != (0,):
            parts.append(f"seeds-{_joined(self.seeds)}")
        return self.out / "-".join(parts)

    def data_config(self) -> DataConfig:
        if self.dataset == "digits":
            return DataConfig(backend="digits", batch_size=self.batch_size, val_batch_size=500)
        if self.dataset == "fashion-mnist":
            try:
                root = resolve_root(self.data)
            except FileNotFoundError as error:
                raise ConfigError(f"--dataset fashion-mnist: {error}") from None
            return DataConfig(backend="fashion-mnist", root=str(root), batch_size=self.batch_size,
                              val_batch_size=1000)
        if self.data is None:
            raise ConfigError("--dataset cifar10 reads a cifar-10-batches-py folder: give it with --data")
        root = Path(self.data).expanduser()
        if not (root / "data_batch_1").is_file():
            raise ConfigError(f"--data {self.data}: not a cifar-10-batches-py folder (no {root / 'data_batch_1'}) "
                              "nor a folder of Fashion-MNIST's IDX files")
        return DataConfig(backend="cifar10", root=str(root), batch_size=self.batch_size, val_batch_size=1000)


def _joined(value) -> str:
    return "-".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def inferred_dataset(data: str) -> str:
    """fashion-mnist for a folder of its IDX files, else cifar10 (whose folder is checked when used)."""
    return "fashion-mnist" if is_fashion_mnist_folder(Path(data).expanduser()) else "cifar10"


def train_config(settings: Settings, model: str, shortcut: str = "", seed: int | None = None) -> TrainConfig:
    """The `paper-cifar` recipe for `model` (with its ResNet-110 warm-up), the settings' budget and data;
    `seed` None: the settings' first seed."""
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
        progress=settings.progress, seed=settings.seeds[0] if seed is None else seed, stop_at_step=settings.stop_at_step,
    )
    cfg = apply_flat(cfg, settings.overrides, "--set")
    cfg = pinned_precision(cfg, settings)
    return apply_flat(cfg, {"run_name": run_name(cfg)}, "run name")


def pinned_precision(cfg: TrainConfig, settings: Settings) -> TrainConfig:
    """fp32 where `amp=auto` would time the choice. On a CPU auto trains bf16 where the machine's bf16 units
    win a timed step and fp32 elsewhere, so the same command would give fp32 runs on one CPU and bf16 runs
    on another, under one name, and mix them in one table. On a CPU the experiments therefore train fp32,
    the paper's precision and every recorded run's; `--set amp=bf16` asks for bf16 runs, which get names of
    their own. On CUDA auto is bf16 on every GPU, so it stays."""
    if cfg.amp == "auto" and not settings.on_gpu:
        return replace_fields(cfg, amp="off")
    return cfg


def configs_over_seeds(settings: Settings, nets: list[tuple[str, str]]) -> list[TrainConfig]:
    """Every (model, shortcut) once per seed, all nets of a seed before the next seed: results come in
    seed by seed, so a first table exists long before the last seed finishes."""
    return [train_config(settings, model, shortcut, seed) for seed in settings.seeds for model, shortcut in nets]


# --- the command-line flags every experiment shares


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="experiments", help="folder for the outputs and the runs/ they train")
    parser.add_argument("--dataset", default="", choices=("", *DATASETS), metavar="{" + ",".join(DATASETS) + "}",
                        help="default: cifar10 or fashion-mnist by the --data folder's files, digits without --data")
    parser.add_argument("--data", default=None,
                        help="the dataset's folder: cifar-10-batches-py, or Fashion-MNIST's IDX files (default "
                        "/usr/share/datasets/fashion-mnist); without it and --dataset: the bundled digits set")
    parser.add_argument("--iterations", type=int, default=None,
                        help=f"steps per run (default: {PAPER_CIFAR_BUDGET.iterations} on CIFAR-10 and on "
                        f"Fashion-MNIST with a GPU, {FASHION_MNIST_CPU_BUDGET.iterations} ({FASHION_MNIST_EPOCHS} "
                        f"epochs) on Fashion-MNIST on a CPU, {DIGITS_BUDGET.iterations} on digits)")
    parser.add_argument("--quick", action="store_true",
                        help=f"Fashion-MNIST on a CPU: a {FASHION_MNIST_QUICK_BUDGET.iterations}-step look at "
                        "whether it all runs (too short to rank nets by depth)")
    parser.add_argument("--milestones", default=None,
                        help="steps where the lr is divided by 10, comma-separated (default: 1/2 and 3/4 of the run)")
    parser.add_argument("--eval-every", type=int, default=None, help="epochs between test evaluations")
    parser.add_argument("--batch-size", type=int, default=PAPER_BATCH, help="images per step")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated; every net trains once per seed (all nets of a seed first), and the "
                        "tables give the test error as the paper does: best (mean +- std)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="any python -m fastresnet.train field, e.g. --set compile=off (repeatable)")
    parser.add_argument("--progress", default="auto", choices=("auto", "bar", "lines", "off"))
    parser.add_argument("--stop-at-step", type=int, default=0, metavar="STEP",
                        help="stop each run at this step with a checkpoint, as if interrupted (the same command "
                        "without it continues): a slice of a long queue, or a check of a run's first steps")


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
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: expected whole numbers separated by commas") from None
    if args.iterations is not None and args.iterations < 1:
        raise ConfigError(f"--iterations must be >= 1, got {args.iterations}")
    return Settings(
        out=Path(args.out), data=args.data, dataset=args.dataset, iterations=args.iterations, milestones=milestones,
        eval_every=args.eval_every, batch_size=args.batch_size, seeds=seeds, overrides=overrides,
        progress=args.progress, quick=args.quick, stop_at_step=args.stop_at_step,
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
    return environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"), world_size=1)
