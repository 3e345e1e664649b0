"""`python -m fastresnet.data verify DIR`: every problem of a dataset folder, listed before a run meets it.

Knows every format the back ends read, by the files in DIR:
- cifar-10-batches-py (data_batch_1 or test_batch there): each batch file is
  read whole, its shape and labels checked;
- Fashion-MNIST (any of its four IDX files there or in FashionMNIST/raw,
  gzipped or not): each file is read whole and its header checked, then each
  split's counts and labels, and the two splits against each other (swapped or
  copied files, as the back end refuses them);
- an ImageFolder (train/ and val/, or one split): the structure (no class
  folders, empty class, val classes unknown to train, files that are not
  images by name), and every image decoded fully with Pillow (a truncated JPEG
  only shows at its end). Problems the loaders handle by themselves
  (grayscale, CMYK, palette, or a PNG named .JPEG: decoded to RGB) are listed
  as notes; the rest are errors.
A DIR that does not exist, or holds none of these, is the user's mistake
(DatasetError), not a list of problems.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from . import cifar10, fashion_mnist
from .build import is_cifar_folder
from .folder import BadImageError, open_rgb, scan_split
from .loader import DatasetError

EXTENSION_FORMATS = {".jpeg": "JPEG", ".jpg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}
FORMATS = ("an ImageFolder (DIR/train/<class>/<images> and DIR/val/..., or one split), cifar-10-batches-py "
           "(data_batch_1 ... test_batch) or Fashion-MNIST's IDX files (train-images-idx3-ubyte[.gz] ...)")


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    error: bool  # False: a note about something the loaders handle (decoded to RGB)

    def __str__(self) -> str:
        kind = "error" if self.error else "note "
        if self.message.startswith(self.path):  # a reader's own message, which names the file first
            return f"{kind}  {self.message}"
        return f"{kind}  {self.path}: {self.message}"


def verify_dataset(root: str | Path, *, workers: int = 8) -> tuple[list[Problem], int]:
    """(problems, number of images checked) of a dataset folder in any format the back ends read."""
    root = Path(root)
    if not root.is_dir():
        found = "that is a file, not a folder" if root.exists() else "no such folder"
        raise DatasetError(f"verify {root}: {found}; give a dataset folder: {FORMATS}")
    if is_cifar_folder(root):
        return verify_cifar(root)
    if has_fashion_mnist_file(root):
        return verify_fashion_mnist(root)
    if not any(path.is_dir() for path in root.iterdir()):
        raise DatasetError(f"verify {root}: not a dataset folder that verify knows, which is {FORMATS}")
    return verify_image_folder(root, workers)


def verify_image_folder(root: Path, workers: int) -> tuple[list[Problem], int]:
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
    """Each batch file read whole: found, a pickle of the right shape, labels of the 10 classes."""
    problems, checked = [], 0
    for name in (*cifar10.TRAIN_FILES, cifar10.TEST_FILE):
        path = root / name
        try:
            images, labels = cifar10.read_batch(path)
            cifar10.check_labels(path, labels)
        except (FileNotFoundError, ValueError) as error:
            problems.append(Problem(str(path), str(error), error=True))
            continue
        checked += len(images)
    return problems, checked


def has_fashion_mnist_file(root: Path) -> bool:
    return any(_find_idx(root, name) is not None for name in fashion_mnist.FILES.values())


def verify_fashion_mnist(root: Path) -> tuple[list[Problem], int]:
    """Each of the four files read whole, then each split's counts and labels, then the splits together."""
    problems, read = [], {}
    for (split, kind), name in fashion_mnist.FILES.items():
        path = _find_idx(root, name)
        if path is None:
            problems.append(Problem(str(root / name), f"missing (nor {name}.gz, nor in "
                                    f"{root / fashion_mnist.TORCHVISION_SUBFOLDER}): {fashion_mnist.INSTALL_HINT}",
                                    error=True))
            continue
        try:
            read[split, kind] = path, fashion_mnist.read_idx(path, kind)
        except ValueError as error:
            problems.append(Problem(str(path), str(error), error=True))
    for split in ("train", "test"):
        if (split, "images") in read and (split, "labels") in read:
            problems += _problems_of(fashion_mnist.check_split, *read[split, "images"], *read[split, "labels"])
    if ("train", "images") in read and ("test", "images") in read:
        problems += _problems_of(fashion_mnist.check_not_swapped, root)
        problems += _problems_of(fashion_mnist.check_distinct, *read["train", "images"], *read["test", "images"])
    return problems, sum(len(images) for (_, kind), (_, images) in read.items() if kind == "images")


def _find_idx(root: Path, name: str) -> Path | None:
    try:
        return fashion_mnist.find_file(root, name)
    except FileNotFoundError:
        return None


def _problems_of(check, where: Path, *arguments) -> list[Problem]:
    """[] when check(where, *arguments) passes, else its error as a problem of `where`."""
    try:
        check(where, *arguments)
    except ValueError as error:
        return [Problem(str(where), str(error), error=True)]
    return []


def summarise(problems: list[Problem], checked: int) -> str:
    errors = sum(problem.error for problem in problems)
    lines = [str(problem) for problem in sorted(problems, key=lambda p: (not p.error, p.path))]
    lines.append(f"checked {checked} images: {errors} error(s), {len(problems) - errors} note(s)")
    return "\n".join(lines)


__all__ = ["Problem", "summarise", "verify_dataset"]
