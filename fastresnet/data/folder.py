"""ImageFolder datasets (`train/<class>/<image>`) and the bad input policy.

The policy, one place for every back end:
- A missing folder, a split without class folders, or a val class that train
  does not have is always an error naming the path: no run starts on a
  dataset whose labels cannot be right.
- An empty class folder, a file that is not an image (by name, or because it
  will not decode), and a truncated or corrupt JPEG are "bad files":
  bad_files="fail" (the default) stops at the first one with its path;
  bad_files="skip" leaves it out and counts it (`loader.skipped`, reported at
  the end of the epoch). An empty class keeps its label index either way, so
  labels never shift.
- Grayscale, CMYK and palette images and a PNG (or other format) named .JPEG
  are not errors: they are decoded to RGB.
- Dotfiles (.DS_Store ...) are ignored.
Class indices are the sorted train class folder names, as torchvision's
ImageFolder numbers them, and val uses the same mapping.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from fastresnet.errors import UserError

# torchvision ImageFolder's extensions; every one decodes in Pillow, torchvision and DALI
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


class BadImageError(UserError, ValueError):
    """A dataset file that cannot be used; the message starts with its path.

    Also constructible from the message alone, as DataLoader does when it
    re-raises a worker's exception in the main process: from its text (the
    worker's traceback) the original message is taken back."""

    def __init__(self, path: str | Path, reason: str | None = None) -> None:
        if reason is None and WORKER_TRACEBACK in str(path):
            path, _, reason = worker_message(str(path)).partition(": ")
        super().__init__(str(path) if reason is None else f"{path}: {reason}")
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # through a worker process's pipe whole
        return type(self), (self.path, self.reason)


WORKER_TRACEBACK = "Original Traceback"


def worker_message(text: str) -> str:
    """The original exception's message: the last line of the worker's traceback, after its type."""
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split("BadImageError: ", 1)[-1]


@dataclass
class ImageList:
    files: list[str]  # paths of the usable images, sorted by class then name
    labels: list[int]  # class index of each file
    classes: list[str]  # class folder names; the index is the label
    skipped: list[BadImageError] = field(default_factory=list)  # bad files left out under "skip"


def list_classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {split_dir}")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{split_dir} has no class folders (expected {split_dir}/<class>/<image files>)")
    return classes


def scan_split(split_dir: str | Path, *, classes: list[str] | None = None, bad_files: str = "fail") -> ImageList:
    """List the images of one split. `classes` (train's) fixes the label mapping for val."""
    split_dir = Path(split_dir)
    found = list_classes(split_dir)
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{split_dir}/{unknown[0]} is a class folder that the training split does not have")
    images = ImageList(files=[], labels=[], classes=classes)
    label_of = {name: label for label, name in enumerate(classes)}
    for name in found:
        class_files = _scan_class(split_dir / name, images, bad_files)
        images.files += class_files
        images.labels += [label_of[name]] * len(class_files)
    if not images.files:
        raise ValueError(f"{split_dir} holds no usable image files")
    return images


def _scan_class(class_dir: Path, images: ImageList, bad_files: str) -> list[str]:
    """Image files under one class folder (subfolders included), sorted.

    scandir knows each entry's type without a stat call: ImageNet's 1.28
    million files list in seconds. Only a symbolic link costs a stat, to find
    a broken one here rather than in the middle of an epoch."""
    usable = []
    for path, entry in _walk_files(class_dir):
        extension = os.path.splitext(entry.name)[1]
        if extension.lower() not in IMAGE_EXTENSIONS:
            problem = f"not an image file (extension {extension or 'none'!r})"
        elif entry.is_symlink() and not os.path.exists(path):
            problem = f"a broken symbolic link (to {os.readlink(path)!r})"
        else:
            usable.append(path)
            continue
        handle_bad(BadImageError(path, problem), bad_files, images.skipped)
    if not usable:
        handle_bad(BadImageError(class_dir, "empty class folder: no image files"), bad_files, images.skipped)
    return usable


def _walk_files(folder: Path):
    """(path, DirEntry) of every file under `folder`, in os.walk's order (a folder's files by name,
    then its subfolders by name, linked ones too as torchvision's ImageFolder does); dotfiles left out."""
    with os.scandir(folder) as scan:
        entries = sorted((entry for entry in scan if not entry.name.startswith(".")), key=lambda entry: entry.name)
    subfolders = [entry for entry in entries if entry.is_dir()]
    for entry in entries:
        if not entry.is_dir():
            yield entry.path, entry
    for entry in subfolders:
        yield from _walk_files(Path(entry.path))


def handle_bad(error: BadImageError, bad_files: str, skipped: list[BadImageError]) -> None:
    """Apply the policy: raise (fail) or record (skip)."""
    if bad_files == "fail":
        raise error
    skipped.append(error)


def scan_image_folder(root: str | Path, *, bad_files: str = "fail") -> tuple[ImageList, ImageList]:
    """(train, val) lists of an ImageFolder root with train/ and val/."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    train = scan_split(root / "train", bad_files=bad_files)
    val = scan_split(root / "val", classes=train.classes, bad_files=bad_files)
    return train, val


def open_rgb(path: str | Path) -> Image.Image:
    """Decode any image file to RGB, or raise BadImageError naming it.

    Pillow reads by content, not by name (a PNG named .JPEG decodes), and
    raises on a truncated file as long as ImageFile.LOAD_TRUNCATED_IMAGES
    stays False (its default, which this module never changes).
    """
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB") if image.mode != "RGB" else image.copy()
    except OSError as error:
        if error.errno is not None:  # the file itself: gone since the scan, unreadable, not a file
            raise BadImageError(path, f"cannot read it ({error.strerror})") from error
        raise BadImageError(path, f"cannot decode ({type(error).__name__}: {error})") from error
    except Exception as error:  # noqa: BLE001  Pillow raises many types: all mean "cannot decode"
        raise BadImageError(path, f"cannot decode ({type(error).__name__}: {error})") from error


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes, or BadImageError naming it (gone since the scan, unreadable, not a file)."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise BadImageError(path, f"cannot read it ({error.strerror})") from error


def report_skipped(skipped: int, where: str) -> None:
    if skipped:
        warnings.warn(f"{where}: skipped {skipped} bad file(s) this epoch (bad_files='skip')", stacklevel=3)
