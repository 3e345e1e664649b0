"""Typed dataclass fields <-> flat, dotted names and checked values.

The command line, the recipe files and the saved `config.json` of a run all
go through here, so a value is checked the same way wherever it comes from:
an unknown name or a value of the wrong type is a `ConfigError` that names
the field, what was given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from fastresnet.errors import ConfigError


def flat_fields(cls, prefix: str = "") -> dict[str, Any]:
    """{"lr": float, "data.batch_size": int, ...}: every leaf field with its type."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out.update(flat_fields(kind, prefix + f.name + "."))
        else:
            out[prefix + f.name] = kind
    return out


def unknown_name_error(name: str, known) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `--help` lists them all"
    return ConfigError(f"unknown config field {name!r}{hint}")


def _type_name(kind) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _is_union(kind) -> bool:
    return typing.get_origin(kind) in (Union, types.UnionType)


def coerce(name: str, value, kind):
    """Check `value` (text from the command line, or a TOML/JSON value) against `kind`."""
    try:
        return _coerce(value, kind)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"bad value for {name}: {value!r} ({err}; expected {_type_name(kind)})") from None


def _coerce(value, kind):
    origin = typing.get_origin(kind)
    if _is_union(kind):
        members = typing.get_args(kind)
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if type(None) in members:
                return None
        errors = []
        for member in members:
            if member is type(None):
                continue
            try:
                return _coerce(value, member)
            except (ValueError, TypeError) as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        allowed = typing.get_args(kind)
        for choice in allowed:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ValueError(f"choose one of {', '.join(map(str, allowed))}")
    if origin in (tuple, list):
        args = typing.get_args(kind)
        item = args[0] if args else str
        if isinstance(value, str):
            parts = [p for p in (s.strip() for s in value.strip("()[] ").split(",")) if p]
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            raise TypeError("expected a list")
        if len(args) > 1 and args[1] is not Ellipsis and len(parts) != len(args):
            raise ValueError(f"expected {len(args)} values, got {len(parts)}")
        items = [_coerce(p, item) for p in parts]
        return tuple(items) if origin is tuple else items
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return _parse_bool(value)
        raise TypeError("expected true or false")
    if kind is int:
        if isinstance(value, bool):
            raise TypeError("expected an integer")
        if isinstance(value, str) and "e" in value.lower():  # 1e3 is a whole number; 2.5e0 is not
            value = float(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("expected a whole number")
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise TypeError("expected a number")
        result = float(value)
        if result != result:
            raise ValueError("NaN is not a setting")
        return result
    if kind is str:
        if not isinstance(value, str):
            raise TypeError("expected text")
        return value
    raise TypeError(f"fields of type {_type_name(kind)} cannot be set")


def replace_fields(cfg, **changes):
    """`dataclasses.replace` that understands dotted names (`data.batch_size`)."""
    nested: dict[str, dict] = {}
    flat = {}
    for name, value in changes.items():
        head, _, rest = name.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[name] = value
    for head, sub in nested.items():
        flat[head] = replace_fields(flat.get(head, getattr(cfg, head)), **sub)
    return dataclasses.replace(cfg, **flat)


def apply_flat(cfg, values: dict[str, Any], source: str):
    """A copy of `cfg` with dotted-name `values` checked and applied."""
    known = flat_fields(type(cfg))
    checked = {}
    for name, value in values.items():
        if name not in known:
            err = unknown_name_error(name, known)
            raise ConfigError(f"{source}: {err}") from None
        try:
            checked[name] = coerce(name, value, known[name])
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    try:
        return replace_fields(cfg, **checked)
    except (ValueError, TypeError) as err:  # a nested dataclass's own __post_init__ check
        raise ConfigError(f"{source}: {err}") from None


def flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """{"data": {"backend": "x"}} -> {"data.backend": "x"} (nested TOML/JSON tables)."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(flatten(value, prefix + key + "."))
        else:
            out[prefix + key] = value
    return out


def to_dict(cfg) -> dict:
    """JSON-ready nested dict (tuples as lists)."""
    return dataclasses.asdict(cfg)
