"""The command line of the commands that take TrainConfig's fields as flags: train, evaluate, tune, profile.

Every leaf field of TrainConfig is a flag of the same name (`--lr`,
`--data.batch_size`; `-` and `_` are interchangeable), defined here once. Each
command (a `Command`) takes the fields that change what it does, and refuses
the others by name: a setting is applied or refused, never ignored. The
commands that prepare or time a training run (train, tune, profile) also take
`--recipe NAME|FILE` (the base values) and `--resume RUN_DIR` (a run's saved
config; flags given with it still win, e.g. a longer `--length`; a recipe
cannot be given with it).
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fastresnet.data import DataConfig
from fastresnet.errors import ArgumentParser
from fastresnet.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fastresnet.training.config import TrainConfig, saved_values
from fastresnet.training.fields import ConfigError, apply_flat, flat_fields, unknown_name_error
from fastresnet.training.recipes import list_recipes, read_recipe, recipe_values


CONFIG_NAME = "config.json"

# TrainConfig's fields by what they set, so that each command can name the ones it reads.
MODEL_FIELDS = ("model", "shortcut", "zero_init_residual")
SCHEDULE_FIELDS = ("unit", "length", "lr", "base_batch_size", "schedule", "lr_milestones", "lr_decay",
                   "plateau_patience", "plateau_threshold", "min_lr", "warmup", "warmup_kind", "warmup_lr",
                   "warmup_until_train_error")
OPTIMIZER_FIELDS = ("momentum", "nesterov", "weight_decay", "no_bn_bias_decay", "label_smoothing", "optimizer_impl")
SPEED_FIELDS = ("device", "amp", "channels_last", "compile", "fused_blocks", "cudnn_benchmark", "dist_backend")
RUN_FIELDS = ("eval_every", "log_every", "progress", "out_dir", "run_name", "checkpoint_every", "plot", "seed",
              "stop_at_step")
DATA_FIELDS = tuple(name for name in flat_fields(TrainConfig) if name.startswith("data."))
TRAIN_ONLY_DATA_FIELDS = ("data.recipe", "data.rrc_scale", "data.scale_range", "data.lighting_std",
                          "data.drop_last", "data.synthetic_steps")  # the training split's augmentation and length
STEP_FIELDS = (*MODEL_FIELDS, *DATA_FIELDS, *OPTIMIZER_FIELDS,  # what one training step of a run is made of
               *(name for name in SPEED_FIELDS if name != "dist_backend"), "seed")


@dataclass
class Invocation:
    config: TrainConfig
    resume: Path | None  # the run directory to continue, or None
    recipe: str  # "" when none was given
    profile: int = 0  # > 0: profile this many steps (fastresnet.profile) instead of training


@dataclass
class Command:
    """One command's command line: `--help` shows `doc` (the module docstring), `usage`, the command's own
    options (`add_options`) and the TrainConfig `fields` it reads; any other TrainConfig field given is
    refused, saying `refusal` (why it cannot apply here) or the flag's entry of `hints`."""

    prog: str
    doc: str
    usage: str
    fields: tuple[str, ...]
    add_options: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    run_config: bool = True  # takes --recipe and --resume: a training run's config
    refusal: str = ""
    hints: dict[str, str] = field(default_factory=dict)  # flag name -> what to give this command instead
    defaults_from: str = ""  # where unset fields come from, when not TrainConfig's defaults ("" = those)

    def parser(self) -> ArgumentParser:
        parser = ArgumentParser(prog=self.prog, usage=self.usage, description=self.doc.strip(), allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_options(parser)
        if self.run_config:
            add_run_config_flags(parser.add_argument_group("a training run's config (one of)"))
        add_field_flags(parser.add_argument_group(
            "settings (fields of TrainConfig, with their units)"), self.fields, self.defaults_from)
        return parser

    def parse(self, argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
        """(the command's own options, the settings given: dotted field name -> text); a ConfigError for a
        flag this command does not take, naming it."""
        args, unknown = self.parser().parse_known_args(_normalize_flags(argv))
        if unknown:
            raise self._refusal(unknown[0])
        given = {name: vars(args).pop(name) for name in self.fields}
        return args, {name: value for name, value in given.items() if value is not None}

    def invocation(self, argv: list[str]) -> tuple[argparse.Namespace, Invocation]:
        """(the command's own options, the run's config resolved as defaults < recipe < resumed run < flags)."""
        args, given = self.parse(argv)
        return args, resolve(given, recipe=args.recipe, resume=args.resume)

    def _refusal(self, arg: str) -> ConfigError:
        if not arg.startswith("-"):
            return ConfigError(f"unexpected argument {arg!r}: every setting is a --field value pair")
        name = arg.lstrip("-").partition("=")[0]
        if name in self.hints:
            return ConfigError(f"--{name}: {self.hints[name]}")
        if name in flat_fields(TrainConfig):
            return ConfigError(f"--{name}: {self.prog} does not use it ({self.refusal}); "
                               "--help lists the flags it takes")
        return unknown_name_error(name, self.fields)


def add_run_config_flags(group) -> None:
    group.add_argument("--recipe", default="", metavar="NAME|FILE",
                       help=f"a named recipe ({', '.join(list_recipes())}) or a .toml file")
    group.add_argument("--resume", default="", metavar="RUN_DIR",
                       help="a run directory (or its checkpoint.pt): its saved config, which the flags given override")


def add_field_flags(group, fields: Iterable[str], defaults_from: str = "") -> None:
    """One flag per dotted field name, its help the field's comment (units, meaning) and its default."""
    kinds = flat_fields(TrainConfig)
    defaults = _flat_defaults(TrainConfig())
    comments = {**field_comments(TrainConfig), **field_comments(DataConfig, "data.")}
    for name in fields:
        default = defaults_from or repr(defaults[name])
        group.add_argument(
            "--" + name,
            dest=name,
            default=None,  # None = not given; defaults come from TrainConfig, the recipe or the resumed run
            metavar=_metavar(kinds[name]),
            help=f"{comments.get(name, '')} (default: {default})".replace("%", "%%"),
        )


def field_comments(cls, prefix: str = "") -> dict[str, str]:
    """The `# comment` after each field in the class source: the units and meaning shown by --help."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, flags=re.MULTILINE)
    return {prefix + name: text.strip() for name, text in found}


def _metavar(kind) -> str:
    members = [member for member in typing.get_args(kind) if member is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(members) == 1:
        return _metavar(members[0])  # an optional field: "none" unsets it
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(kind))) + "}"
    if origin in (tuple, list):
        return "A,B,..."
    return getattr(kind, "__name__", "VALUE").upper()


def _flat_defaults(cfg) -> dict:
    out = {}
    for name in flat_fields(type(cfg)):
        value = cfg
        for part in name.split("."):
            value = getattr(value, part)
        out[name] = value
    return out


def _normalize_flags(argv: list[str]) -> list[str]:
    """--data.batch-size -> --data.batch_size; --flag=value kept whole."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    return out


def resolve(given: dict[str, str], recipe: str = "", resume: str = "") -> Invocation:
    """The config of a run: TrainConfig's defaults < the recipe < the resumed run's saved config < `given`."""
    cfg = TrainConfig()
    run_dir = resolve_run_dir(resume) if resume else None
    if run_dir is not None and recipe:
        raise ConfigError("--recipe cannot be combined with --resume: the resumed run keeps its saved config")
    if run_dir is not None:
        saved, source = read_saved_config(run_dir)
        cfg = apply_flat(cfg, saved_values(saved), source)
    elif recipe:
        values = read_recipe(recipe)
        # The recipe's per-model table follows the model that will be trained.
        model = given.get("model") or values.get("model") or cfg.model
        cfg = apply_flat(cfg, recipe_values(values, model), f"recipe {recipe}")
    cfg = apply_flat(cfg, given, "command line")
    return Invocation(config=cfg, resume=run_dir, recipe=recipe)


def resolve_run_dir(path: str) -> Path:
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not (p / CONFIG_NAME).is_file() and not (p / CHECKPOINT_NAME).is_file():
        raise ConfigError(f"--resume {path}: no run directory there (expected {p / CONFIG_NAME})")
    return p


def read_saved_config(run_dir: Path) -> tuple[dict, str]:
    """(the run's config, where it came from): config.json, or the checkpoint's copy where config.json is gone."""
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        return load_checkpoint(run_dir, needs=("config",))["config"], f"{run_dir / CHECKPOINT_NAME} (its config)"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--resume: cannot read {path} ({err}); restore it, or delete it to resume with the copy of "
                          f"the config that {CHECKPOINT_NAME} holds") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {path} is not a run's config (a JSON object of TrainConfig fields); restore it, "
                          f"or delete it to resume with the copy of the config that {CHECKPOINT_NAME} holds")
    return saved, str(path)
