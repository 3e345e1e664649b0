"""Named recipes: TOML files in fastresnet/recipes/ (or any path to a .toml).

A recipe holds config fields at the top level, data fields in a `[data]`
table, and per-model differences in `[for_model.<name>]` tables, applied
when the resolved model is <name> (the paper warms ResNet-110 up at a lower
learning rate; the other CIFAR nets use the same recipe without it).
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

from fastresnet.training.fields import ConfigError, flatten

PER_MODEL_TABLE = "for_model"


def list_recipes() -> list[str]:
    folder = resources.files("fastresnet") / "recipes"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def read_recipe(name_or_path: str) -> dict:
    """The recipe as a nested dict (TOML tables), from a name or a file path."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        text = path.read_text()
    else:
        resource = resources.files("fastresnet") / "recipes" / f"{name_or_path}.toml"
        if not resource.is_file():
            raise ConfigError(f"unknown recipe {name_or_path!r}; the recipes are: {', '.join(list_recipes())}")
        text = resource.read_text()
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"recipe {name_or_path}: not valid TOML: {err}") from None


def recipe_values(recipe: dict, model: str) -> dict:
    """Flat dotted values of a recipe for `model`: the common part, then its for_model table."""
    common = {k: v for k, v in recipe.items() if k != PER_MODEL_TABLE}
    values = flatten(common)
    per_model = recipe.get(PER_MODEL_TABLE, {})
    if not isinstance(per_model, dict):
        raise ConfigError(f"recipe: [{PER_MODEL_TABLE}] must be a table of tables")
    values.update(flatten(per_model.get(model, {})))
    return values
