"""`python -m fastresnet.data verify DIR`: every problem of a dataset folder, listed before a run meets it.

Checks the structure (missing folder, no class folders, empty class, val
classes unknown to train, files that are not images by name) and decodes
every image fully with Pillow (a truncated JPEG only shows at its end).
Problems the loaders handle by themselves (grayscale, CMYK, palette, or a PNG
named .JPEG: decoded to RGB) are listed as notes; the rest are errors.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .build import is_cifar_folder
from .cifar10 import load_cifar10
from .folder import BadImageError, open_rgb, scan_split

EXTENSION_FORMATS = {".jpeg": "JPEG", ".jpg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    error: bool  # False: a note about something the loaders handle (decoded to RGB)

    def __str__(self) -> str:
        return f"{'error' if self.error else 'note '}  {self.path}: {self.message}"


def verify_dataset(root: str | Path, *, workers: int = 8) -> tuple[list[Problem], int]:
    """(problems, number of images checked) for an ImageFolder root (train/, val/), one split, or CIFAR-10."""
    root = Path(root)
    if not root.is_dir():
        return [Problem(str(root), "dataset folder not found", error=True)], 0
    if is_cifar_folder(root):
        return verify_cifar(root)
    splits = [root / name for name in ("train", "val") if (root / name).is_dir()] or [root]
    problems, lists, classes = [], [], None
    if len(splits) == 1 and splits[0] != root:  # one of train/ and val/: training needs both
        missing = root / ("val" if splits[0].name == "train" else "train")
        problems.append(Problem(str(missing), "missing: training reads train/ and val/ side by side", error=True))
    for split in splits:
        try:
            listed = scan_split(split, classes=classes, bad_files="skip")
        except (FileNotFoundError, ValueError) as error:
            problems.append(Problem(str(split), str(error).removeprefix(f"{split} "), error=True))
            continue
        classes = classes or listed.classes
        problems += [Problem(bad.path, bad.reason or "", error=True) for bad in listed.skipped]
        lists.append(listed)
    files = [path for listed in lists for path in listed.files]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems += [problem for found in pool.map(check_image, files) for problem in found]
    return problems, len(files)


def check_image(path: str) -> list[Problem]:
    try:
        open_rgb(path)
        with Image.open(path) as image:
            found_format, mode = image.format, image.mode
    except BadImageError as error:
        return [Problem(path, error.reason or str(error), error=True)]
    notes = []
    expected = EXTENSION_FORMATS.get(Path(path).suffix.lower())
    if expected and found_format != expected:
        notes.append(
            Problem(path, f"a {found_format} file named {Path(path).suffix} (decoded by content)", error=False)
        )
    if mode != "RGB":
        notes.append(Problem(path, f"{mode} image (converted to RGB)", error=False))
    return notes


def verify_cifar(root: Path) -> tuple[list[Problem], int]:
    try:
        (train, _), (test, _) = load_cifar10(root, "full")
    except (FileNotFoundError, ValueError) as error:
        return [Problem(str(root), str(error), error=True)], 0
    return [], len(train) + len(test)


def summarise(problems: list[Problem], checked: int) -> str:
    errors = sum(problem.error for problem in problems)
    lines = [str(problem) for problem in sorted(problems, key=lambda p: (not p.error, p.path))]
    lines.append(f"checked {checked} images: {errors} error(s), {len(problems) - errors} note(s)")
    return "\n".join(lines)


__all__ = ["Problem", "summarise", "verify_dataset"]
