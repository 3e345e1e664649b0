"""`cifar10`: the standard cifar-10-batches-py folder, held whole on the device.

60,000 32x32 images are 180 MB as uint8: they fit on any GPU, so the loader
never touches the host after the first copy. The paper's recipe runs on the
device, one batch at a time: scale to [0, 1], subtract the per-pixel mean of
the training split, pad 4 pixels with zeros, take a random 32x32 crop, flip
half. "45k5k" is the paper's split: the first 45,000 training images train,
the last 5,000 are the validation set (the test batch is left alone).
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np
import torch

from .augment import nhwc_to_model_layout, pad_crop_flip
from .config import DataConfig
from .loader import DataLoaders, Shard, tensor_loaders

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
IMAGE_SIZE = 32  # pixels per side
NUM_CLASSES = 10
PAD = 4  # pixels of zero padding before the random crop (He et al. 2015, section 4.2)
VAL_FRACTION_45K5K = 10  # "45k5k" holds out 1/10 of the training batches: 5,000 of 50,000


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch: uint8 (N, 32, 32, 3) images and int64 labels."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch file not found: {path}")
    try:
        with path.open("rb") as file:
            entry = pickle.load(file, encoding="bytes")
        data, labels = entry[b"data"], entry[b"labels"]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a cifar-10-batches-py pickle (with b'data' and b'labels'): {error}") from error
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE or len(data) != len(labels):
        raise ValueError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} and {len(labels)}")
    # Each row is the red plane, then green, then blue, each 32x32 row-major.
    images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)


def read_split(root: Path, files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_batch(root / name) for name in files]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    check_labels(root, labels)
    return torch.from_numpy(images), torch.from_numpy(labels)


def check_labels(where: Path, labels: np.ndarray) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{where}: labels must be in [0, {NUM_CLASSES}), got [{labels.min()}, {labels.max()}]")


def load_cifar10(
    root: str | Path, split: str
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train images, labels), (val images, labels) as uint8 NHWC on the CPU."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder not found: {root}")
    train_images, train_labels = read_split(root, TRAIN_FILES)
    if split == "45k5k":
        cut = len(train_images) - len(train_images) // VAL_FRACTION_45K5K
        return (train_images[:cut], train_labels[:cut]), (train_images[cut:], train_labels[cut:])
    return (train_images, train_labels), read_split(root, (TEST_FILE,))


def make_transform(mean: torch.Tensor, dtype: torch.dtype, *, train: bool):
    """uint8 NHWC batch -> normalised (and, for training, augmented) model input."""

    def transform(batch: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        centred = batch.float().mul_(1.0 / 255.0).sub_(mean)  # padding after this pads with the mean
        if train:
            centred = pad_crop_flip(centred, pad=PAD, generator=generator)
        return nhwc_to_model_layout(centred.to(dtype))

    return transform


def build_cifar10(cfg: DataConfig, *, device: torch.device, shard: Shard):
    (train_images, train_labels), (val_images, val_labels) = load_cifar10(cfg.root, cfg.cifar_split)
    train_images, val_images = train_images.to(device), val_images.to(device)
    # (32, 32, 3): the per-pixel mean, summed without a float copy of the whole set
    mean = train_images.sum(0, dtype=torch.float32).div_(255.0 * len(train_images))

    train, val = tensor_loaders(cfg, shard, (train_images, train_labels), (val_images, val_labels),
                                functools.partial(make_transform, mean, cfg.torch_dtype))
    return DataLoaders(
        train=train,
        val=val,
        num_classes=NUM_CLASSES,
        image_size=IMAGE_SIZE,
        backend="cifar10",
    )
