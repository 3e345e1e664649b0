"""`digits`: scikit-learn's bundled handwritten digits, so training can be shown to learn anywhere.

1797 real 8x8 grayscale digits (values 0..16) ship inside scikit-learn: no
download. They are upscaled (bilinear) to 32x32 and repeated over 3 channels,
so that the CIFAR ResNets take them unchanged, then normalised with the
training split's mean and std. The split is fixed (a permutation with its own
seed, not the run's), 1500 train / 297 test; the whole set lives on the device.
No augmentation: flips and crops would change what a digit is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import DataConfig
from .loader import DataLoaders, Shard, tensor_loaders

IMAGE_SIZE = 32  # pixels per side after upscaling
NUM_CLASSES = 10
TRAIN_SIZE = 1500  # images in the fixed train split; the other 297 are the test split
SPLIT_SEED = 20150  # seeds the fixed split only: every run gets the same train/test images


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as float (N, 3, 32, 32) in [0, 1] and int64 labels, on the CPU."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # scikit-learn is in the dev extra
        raise ImportError("the digits back end needs scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    small = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    large = F.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return large.expand(-1, 3, -1, -1).contiguous(), torch.as_tensor(digits.target, dtype=torch.int64)


def digits_split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    images, labels = load_digits_tensors()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, test = order[:TRAIN_SIZE], order[TRAIN_SIZE:]
    return (images[train], labels[train]), (images[test], labels[test])


def build_digits(cfg: DataConfig, *, device: torch.device, shard: Shard):
    (train_images, train_labels), (test_images, test_labels) = digits_split()
    mean, std = train_images.mean(), train_images.std()
    dtype = cfg.torch_dtype

    def to_device(images: torch.Tensor) -> torch.Tensor:
        normalised = ((images - mean) / std).to(device=device, dtype=dtype)
        return normalised.contiguous(memory_format=torch.channels_last)

    def identity(batch: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return batch  # indexing a channels_last tensor on dim 0 keeps it channels_last

    train, val = tensor_loaders(cfg, shard, (to_device(train_images), train_labels),
                                (to_device(test_images), test_labels), lambda train: identity)
    return DataLoaders(
        train=train,
        val=val,
        num_classes=NUM_CLASSES,
        image_size=IMAGE_SIZE,
        backend="digits",
    )
