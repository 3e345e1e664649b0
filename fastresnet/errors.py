"""What a user can get wrong, and how every command says so.

A `UserError` is a problem with what the user gave (a flag, a value, a dataset
file, a checkpoint, the disk), not a bug in the library. Its message names the
thing (path, flag, value) and what to do. The commands (`python -m
fastresnet.train`, `.evaluate`, `.data`, `.experiments`) all run through
`command`, which prints a user error as one line, `error: ...`, and exits with
status 2; a full disk met by any write is told the same way. Anything else is
a bug in the library and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import functools
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """A mistake in the input or the environment; the message says what and what to do."""


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
