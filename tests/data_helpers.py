"""Small generated datasets for the data tests, made once per test session.

The fake ImageNet is tinted (class 0 red, 1 green, 2 blue), so a test reads
an image's class back from its dominant colour after any crop, flip or
lighting; every bad input of the policy gets its own tiny folder.
"""

from __future__ import annotations

import atexit
import functools
import gzip
import io
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastresnet.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fastresnet.data.fake_imagenet import make_fake_imagenet

CLASSES = 3
TRAIN_PER_CLASS = 6
VAL_PER_CLASS = 2
CIFAR_PER_BATCH = 20  # images per fake CIFAR pickle batch: 100 train, 20 test
FASHION_TRAIN, FASHION_TEST = 24, 6  # fake Fashion-MNIST images: ids 0..23 train, 24..29 test


@functools.cache
def fake_imagenet_root() -> Path:
    """3 classes x (6 train + 2 val) tinted photographs at ImageNet sizes: one copy per session."""
    root = Path(tempfile.mkdtemp(prefix="fastresnet-fake-imagenet-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return make_fake_imagenet(
        root, classes=CLASSES, images_per_class=TRAIN_PER_CLASS, val_images_per_class=VAL_PER_CLASS, tint=True
    )


def dominant_class(images: torch.Tensor) -> torch.Tensor:
    """Class of each normalised NCHW image: its strongest mean colour channel (red 0, green 1, blue 2)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).mean(dim=(2, 3)).argmax(1)


def jpeg_bytes(mode: str = "RGB", size=(64, 48), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, colour)
    image = image if mode == "RGB" else image.convert(mode)
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def broken_after_header() -> bytes:
    good = jpeg_bytes(size=(256, 192))
    return good[: len(good) // 3] + b"\xff\x01" * 200 + b"\xff\xd9"


def refused_by_libjpeg() -> bytes:
    """A photograph's JPEG with an unknown marker (0xFF 0x0C) in the middle of its entropy-coded data:
    libjpeg (Pillow, torchvision) stops with an error, DALI's decoder reads through it."""
    import random

    from fastresnet.data.fake_imagenet import fake_photo, sample_photographs

    buffer = io.BytesIO()
    fake_photo(sample_photographs(), random.Random(0), size=(96, 64)).save(buffer, format="JPEG", quality=90)
    good = buffer.getvalue()
    scan = good.index(b"\xff\xda")
    middle = scan + (len(good) - scan) // 2
    return good[:middle] + b"\xff\x0c" + good[middle:]


def png_bytes(size=(64, 48), colour=(30, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def small_folder(root: Path, classes=("a", "b"), per_class=3) -> Path:
    """A minimal valid ImageFolder: plain red/green JPEGs."""
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            colour = (220, 20, 20) if label == 0 else (20, 220, 20)
            for number in range(per_class):
                (folder / f"{name}_{number}.JPEG").write_bytes(jpeg_bytes(colour=colour))
    return root


# Each bad input: (what it writes into train/a of a small folder, whether it is an error or handled)
BAD_FILES = {
    "truncated_jpeg": (lambda: jpeg_bytes(size=(256, 192))[:600], "error"),
    "corrupt_jpeg": (lambda: jpeg_bytes()[:20] + b"\x00garbage" * 50 + b"\xff\xd9", "error"),
    "text_named_jpeg": (lambda: b"this is not an image\n" * 10, "error"),
    # a JPEG whose frame header still reads as a 3-component JPEG with an end marker, so the
    # nvjpeg back end sends it to the batched decoder, which fails: the one-by-one fallback runs
    "broken_after_header": (lambda: broken_after_header(), "error"),
    "refused_by_libjpeg": (refused_by_libjpeg, "error"),
    "grayscale_jpeg": (lambda: jpeg_bytes(mode="L"), "handled"),
    "cmyk_jpeg": (lambda: jpeg_bytes(mode="CMYK"), "handled"),
    "png_named_jpeg": (lambda: png_bytes(), "handled"),
}


def add_bad_file(root: Path, kind: str) -> Path:
    path = root / "train" / "a" / f"bad_{kind}.JPEG"
    path.write_bytes(BAD_FILES[kind][0]())
    return path


def class_value(label):
    return 20 * label + 15  # every pixel of a class-k image has this value: the label can be read back


def write_fake_cifar(root, per_batch=CIFAR_PER_BATCH):
    """A cifar-10-batches-py folder in the real pickle format; red plane = position, blue = batch."""
    root.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        labels = [(index + i) % 10 for i in range(per_batch)]
        data = np.stack([np.full(3072, class_value(k), dtype=np.uint8) for k in labels])
        data[:, :1024] = 12 * np.arange(per_batch)[:, None]  # red plane: the position in the batch ...
        data[:, 2048:] = 40 * index  # ... blue plane: which batch; green plane: the class
        with (root / name).open("wb") as file:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, file)
    return root


def idx_bytes(values: torch.Tensor, magic: int) -> bytes:
    """An IDX file of unsigned bytes: magic number, one big-endian size per dimension, the values."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in values.shape)
    return header + values.to(torch.uint8).numpy().tobytes()


def write_idx(path: Path, data: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_fake_fashion_mnist(root: Path, gz: bool = True, sizes=(FASHION_TRAIN, FASHION_TEST)) -> Path:
    """Fashion-MNIST's four IDX files of (train, test) `sizes` images; image `id` is one flat grey
    10 + 8 * id (mod 256), its label id % 10."""
    from fastresnet.data.fashion_mnist import FILES

    root.mkdir(parents=True, exist_ok=True)
    train, test = sizes
    ids = {"train": torch.arange(train), "test": torch.arange(train, train + test)}
    for split, split_ids in ids.items():
        images = ((10 + 8 * split_ids) % 256).view(-1, 1, 1).expand(-1, 28, 28)
        write_idx(root / FILES[split, "images"], idx_bytes(images, 0x803), gz)
        write_idx(root / FILES[split, "labels"], idx_bytes(split_ids % 10, 0x801), gz)
    return root
