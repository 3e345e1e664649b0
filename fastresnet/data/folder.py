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

# torchvision ImageFolder's extensions; every one decodes in Pillow, torchvision and DALI
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


class BadImageError(ValueError):
    """A dataset file that cannot be used; the message starts with its path.

    Also constructible from the message alone, as DataLoader does when it
    re-raises a worker's exception in the main process."""

    def __init__(self, path: str | Path, reason: str | None = None) -> None:
        super().__init__(str(path) if reason is None else f"{path}: {reason}")
        self.path, self.reason = str(path), reason


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

    os.walk's scandir knows each entry's type without a stat call: ImageNet's
    1.28 million files list in seconds."""
    usable = []
    for folder, subfolders, names in os.walk(class_dir):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                usable.append(path)
            else:
                extension = os.path.splitext(name)[1] or "none"
                handle_bad(
                    BadImageError(path, f"not an image file (extension {extension!r})"), bad_files, images.skipped
                )
    if not usable:
        handle_bad(BadImageError(class_dir, "empty class folder: no image files"), bad_files, images.skipped)
    return usable


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
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001  Pillow raises many types: all mean "cannot decode"
        raise BadImageError(path, f"cannot decode ({type(error).__name__}: {error})") from error


def report_skipped(skipped: int, where: str) -> None:
    if skipped:
        warnings.warn(f"{where}: skipped {skipped} bad file(s) this epoch (bad_files='skip')", stacklevel=3)
