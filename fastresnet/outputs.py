"""What a command will write, checked before it starts work.

Every command that writes (train's run directory, tune's `--export` and the
tuning cache, profile's `--out`, an experiment's `--out`, evaluate's
`--output`, make-fake-imagenet's folder) asks here first. A place it cannot
write (a file where a folder goes or on the way to it, a folder where a file
goes, a read-only folder, /proc) is then a one-line error before minutes of
work, not a traceback after them; and a result that is already there is
refused, never overwritten.

Nothing is made here: the nearest folder that exists on the way is checked by
creating and removing a temporary file in it (permission bits alone do not say
whether root may write, or whether the file system takes files), and the
command makes the missing folders when it writes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fastresnet.errors import DISK_FULL, UserError


def writable_folder(path: str | os.PathLike, what: str, *, empty: bool = False) -> Path:
    """`path` as a folder this process can write into (made later, where it is missing).

    `what` names it in the message (a flag such as "--out"). With `empty`, a folder that holds
    anything is refused: the command writes a result there and overwrites nothing."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        advice = "give a new folder (nothing is overwritten)" if empty else "give a folder"
        raise UserError(f"{what} {path}: that is a file, not a folder; {advice}")
    if empty and path.is_dir() and any(path.iterdir()):
        raise UserError(f"{what} {path}: that folder holds files already; give a new folder, or an empty one "
                        "(nothing is overwritten)")
    _check_can_create_in(path, path, what)
    return path


def new_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a file the command will write: nothing is there yet, and its folder can be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{what} {path}: that is a folder; give the path of the file to write")
    if path.exists() or path.is_symlink():
        raise UserError(f"{what} {path}: that file exists; give a new file name, or move it away "
                        "(nothing is overwritten)")
    _check_can_create_in(path.parent, path, what)
    return path


def _check_can_create_in(folder: Path, path: Path, what: str) -> None:
    """That files can be made in `folder` (the folder of `path`, the user's), or in the deepest folder
    on the way to it that exists; a file on the way is the user's mistake."""
    folder = _nearest_existing(folder, path, what)
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastresnet-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if err.errno in DISK_FULL:
            raise  # told as a full disk by fastresnet.errors
        raise UserError(f"{what} {path}: cannot create files in {folder} ({err.strerror}); give a folder this "
                        "user can write") from None


def _nearest_existing(folder: Path, path: Path, what: str) -> Path:
    for parent in [folder, *folder.parents]:
        if parent.is_dir():
            return parent
        if parent.exists() or parent.is_symlink():
            kind = "a file" if parent.exists() else "a broken symbolic link"
            raise UserError(f"{what} {path}: {parent} is {kind}, so nothing can be made under it; "
                            "give a path in a folder")
    return Path(folder.absolute().anchor)
