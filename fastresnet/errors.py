"""What a user can get wrong, and how every command says so.

A `UserError` is a problem with what the user gave (a flag, a value, a dataset
file, a checkpoint, the disk), not a bug in the library. Its message names the
thing (path, flag, value) and what to do. The commands (`python -m
fastresnet.train`, `.evaluate`, `.data`, `.experiments`) all run through
`command`, which prints a user error as one line, `error: ...`, and exits with
status 2; a full disk met by any write is told the same way. Anything else is
a bug in the library and keeps its traceback. Running out of memory is the
user's to fix too (a smaller batch, bf16): `out_of_memory_exit` says what to
change and exits with status 3.
"""

from __future__ import annotations

import argparse
import errno
import functools
import sys
from collections.abc import Callable

import torch

EXIT_USER_ERROR = 2
EXIT_OOM = 3
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """A mistake in the input or the environment; the message says what and what to do."""


class ConfigError(UserError, ValueError):
    """A configuration problem: a flag, a value, a run directory, a resume that cannot be right."""


class ArgumentParser(argparse.ArgumentParser):
    """The commands' parser: a flag it cannot parse is a UserError (one line), not the usage text."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (--help lists the flags)")


def one_line(message: str) -> str:
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def user_message(err: BaseException) -> str | None:
    """The line to print for a user's problem, or None for a bug (which keeps its traceback)."""
    if isinstance(err, UserError):
        return one_line(str(err))
    if isinstance(err, OSError) and err.errno in DISK_FULL:
        where = f" writing {err.filename}" if err.filename else ""
        return f"no space left on the device{where}: free some space (nothing written before is lost)"
    return None


def command(main: Callable[..., int]) -> Callable[..., int]:
    """`main(argv) -> exit status`, with user errors printed as one line and exit status 2."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except Exception as err:
            message = user_message(err)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            return EXIT_USER_ERROR

    return run


def out_of_memory_advice(cfg, err: BaseException) -> str:
    """What to change so that the run of `cfg` (a TrainConfig) fits in memory."""
    device = "GPU" if torch.cuda.is_available() and cfg.device != "cpu" else "host"
    batch = cfg.data.batch_size
    lines = [
        f"out of {device} memory training {cfg.model} at {batch} images per process "
        f"(amp {cfg.amp}, compile {cfg.compile}, image size {cfg.data.image_size}).",
        "To fit, change one of:",
        f"  --data.batch_size {max(1, batch // 2)}   (set --base_batch_size to the recipe's batch so the lr scales with it)",
        "  --amp bf16                 (half the activation memory of fp32)",
        "  a smaller --model or --data.image_size, or more GPUs with torchrun (the batch is per GPU)",
    ]
    if device == "GPU":
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        peak = torch.cuda.max_memory_allocated() / 2**30
        lines.insert(1, f"The GPU has {total:.1f} GiB; torch had allocated up to {peak:.1f} GiB.")
    lines.append(f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
    return "\n".join(lines)


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def out_of_memory_exit(cfg, err: RuntimeError | MemoryError) -> int:
    """EXIT_OOM, with what to change printed, for running out of memory while running `cfg` (a
    TrainConfig); any other error (or one before there was a config) is raised again."""
    if cfg is None or not (is_out_of_memory(err) or isinstance(err, MemoryError)):
        raise err
    print(f"error: {out_of_memory_advice(cfg, err)}", file=sys.stderr)
    return EXIT_OOM
