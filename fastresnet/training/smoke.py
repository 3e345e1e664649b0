"""FASTRESNET_SMOKE=1: a check that a command works end to end, not a result.

Every training run takes one optimizer step and every evaluation reads one batch, each batch of at
most 16 images; a profile times one step after one warm-up step. A smoke run says so when it starts,
and its config.json and env.json record it. tests/test_readme.py runs the README's commands so.
"""

from __future__ import annotations

import itertools
import os

from fastresnet.errors import ConfigError

VARIABLE = "FASTRESNET_SMOKE"
STEPS = 1  # optimizer steps of a training run; profiled steps, and warm-up steps at most
BATCH = 16  # images per batch at most, training and evaluation


def on() -> bool:
    """Whether FASTRESNET_SMOKE asks for smoke runs (1); 0 or unset: no. Any other value is a ConfigError."""
    text = os.environ.get(VARIABLE, "").strip()
    if text not in ("", "0", "1"):
        raise ConfigError(f"{VARIABLE}={text!r}: 1 for smoke runs, 0 or unset for real ones")
    return text == "1"


def shrink(cfg):
    """`cfg` with batches of at most BATCH images, under FASTRESNET_SMOKE=1; else `cfg` itself."""
    if not on():
        return cfg
    from fastresnet.training.fields import replace_fields

    return replace_fields(cfg, **{"data.batch_size": min(cfg.data.batch_size, BATCH),
                                  "data.val_batch_size": min(cfg.data.eval_batch_size, BATCH)})


def batches(loader):
    """The loader's batches, or only the first STEPS of them under FASTRESNET_SMOKE=1."""
    return itertools.islice(loader, STEPS) if on() else iter(loader)


def note(what: str) -> str:
    return f"{VARIABLE}=1: a smoke {what}: its figures are not results"
