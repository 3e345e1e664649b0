"""Data back ends: DALI, nvJPEG, torchvision, cifar10, fashion-mnist, digits and synthetic, chosen by name.

    from fastresnet.data import DataConfig, build_loaders
    data = build_loaders(DataConfig(backend="auto", root="/data/imagenet"), device=torch.device("cuda"),
                         rank=rank, world_size=world_size, seed=0)
    for epoch in range(epochs):
        data.train.set_epoch(epoch)
        for images, labels in data.train:  # normalised, NCHW shape, channels_last memory, on the device
            ...

DALI is optional: this package imports, and every other back end works, without it.
"""

from .build import build_loaders, dali_available, resolve_backend
from .config import BACKENDS, RECIPES, DataConfig
from .fake_imagenet import make_fake_imagenet
from .folder import BadImageError
from .loader import DataLoaders, Loader
from .verify import verify_dataset

__all__ = [
    "BACKENDS",
    "BadImageError",
    "RECIPES",
    "DataConfig",
    "DataLoaders",
    "Loader",
    "build_loaders",
    "dali_available",
    "make_fake_imagenet",
    "resolve_backend",
    "verify_dataset",
]
