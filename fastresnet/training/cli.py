"""The command line of `python -m fastresnet.train`: TrainConfig as flags.

Every leaf field of TrainConfig is a flag of the same name (`--lr`,
`--data.batch_size`; `-` and `_` are interchangeable). Three flags are not
fields: `--recipe NAME|FILE` picks the base values, `--resume RUN_DIR`
continues a run from its checkpoint with its saved config (flags given with
it still win, e.g. a longer `--length`; a recipe cannot be given with it),
and `--profile N` profiles N steps instead of training (fastresnet.profile).
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

from fastresnet.data import DataConfig
from fastresnet.errors import ArgumentParser
from fastresnet.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fastresnet.training.config import TrainConfig, saved_values
from fastresnet.training.fields import ConfigError, apply_flat, flat_fields, unknown_name_error
from fastresnet.training.recipes import list_recipes, read_recipe, recipe_values


CONFIG_NAME = "config.json"


@dataclass
class Invocation:
    config: TrainConfig
    resume: Path | None  # the run directory to continue, or None
    recipe: str  # "" when none was given
    profile: int = 0  # > 0: profile this many steps (fastresnet.profile) instead of training


def build_parser(prog: str = "python -m fastresnet.train") -> ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        description="Train a ResNet of the fastresnet zoo. With no arguments: ResNet-20 on the small "
        "`digits` set, about a minute on a CPU.",
        allow_abbrev=False,
    )
    parser.add_argument("--recipe", default="", help=f"a named recipe ({', '.join(list_recipes())}) or a .toml file")
    parser.add_argument("--resume", default="", help="a run directory (or its checkpoint.pt) to continue")
    parser.add_argument("--profile", type=int, default=None, metavar="N",
                        help="profile N training steps instead of training: trace.json, profile.md and profile.png "
                        "in the run directory's profile/ (python -m fastresnet.profile has more options)")
    defaults = _flat_defaults(TrainConfig())
    comments = {**field_comments(TrainConfig), **field_comments(DataConfig, "data.")}
    for name, kind in flat_fields(TrainConfig).items():
        parser.add_argument(
            "--" + name,
            dest=name,
            default=None,  # None = not given; defaults come from TrainConfig, the recipe or the resumed run
            metavar=_metavar(kind),
            help=f"{comments.get(name, '')} (default: {defaults[name]!r})".replace("%", "%%"),
        )
    return parser


def field_comments(cls, prefix: str = "") -> dict[str, str]:
    """The `# comment` after each field in the class source: the units and meaning shown by --help."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, flags=re.MULTILINE)
    return {prefix + name: text.strip() for name, text in found}


def _metavar(kind) -> str:
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


def parse_invocation(argv: list[str] | None = None) -> Invocation:
    """Resolve defaults < recipe < resumed run's config < flags; raise ConfigError on any problem."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, unknown = parser.parse_known_args(_normalize_flags(argv))
    if unknown:
        name = unknown[0].lstrip("-").partition("=")[0]
        if unknown[0].startswith("--"):
            raise unknown_name_error(name, flat_fields(TrainConfig))
        raise ConfigError(f"unexpected argument {unknown[0]!r}: every setting is a --field value pair")
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("recipe", "resume", "profile")}
    if args.profile is not None and args.profile < 1:
        raise ConfigError(f"--profile {args.profile}: the number of steps to profile must be >= 1")

    cfg = TrainConfig()
    resume = resolve_run_dir(args.resume) if args.resume else None
    if resume is not None and args.recipe:
        raise ConfigError("--recipe cannot be combined with --resume: the resumed run keeps its saved config")
    if resume is not None:
        saved, source = read_saved_config(resume)
        cfg = apply_flat(cfg, saved_values(saved), source)
    elif args.recipe:
        recipe = read_recipe(args.recipe)
        # The recipe's per-model table follows the model that will be trained.
        model = given.get("model") or recipe.get("model") or cfg.model
        cfg = apply_flat(cfg, recipe_values(recipe, model), f"recipe {args.recipe}")
    cfg = apply_flat(cfg, given, "command line")
    return Invocation(config=cfg, resume=resume, recipe=args.recipe, profile=args.profile or 0)


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


def parse_command(argv: list[str], options: argparse.ArgumentParser, doc: str) -> tuple[argparse.Namespace, Invocation]:
    """(the command's own options, the training flags) of a command that takes both (fastresnet.profile,
    fastresnet.tune); --help prints `doc`, the options and the training flags, and exits."""
    if "-h" in argv or "--help" in argv:
        print(doc.strip() + "\n\n" + options.format_help().replace("options:", f"{options.prog} options:", 1))
        print("training flags (as python -m fastresnet.train's):")
        build_parser(prog=f"{options.prog} [options]").print_help()
        raise SystemExit(0)
    args, rest = options.parse_known_args(_normalize_flags(argv))
    return args, parse_invocation(rest)

