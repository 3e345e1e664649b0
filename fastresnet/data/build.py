"""`build_loaders`: one entry point that picks a back end by name and builds its loaders."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from fastresnet.errors import UserError

from .config import DataConfig, check_settings_apply
from .loader import DataLoaders, DatasetError, DatasetNotFoundError, Shard


def dali_available() -> bool:
    """Whether NVIDIA DALI imports (without importing it: that takes a while)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # no `nvidia` namespace, or nvidia.dali blocked in sys.modules
        return False


def is_cifar_folder(root: str | Path) -> bool:
    return (Path(root) / "data_batch_1").is_file() or (Path(root) / "test_batch").is_file()


def is_fashion_mnist_folder(root: str | Path) -> bool:
    from .fashion_mnist import FILES, find_file  # late: torchvision's import takes a second

    try:
        find_file(Path(root), FILES["train", "images"])
    except FileNotFoundError:
        return False
    return True


def resolve_backend(cfg: DataConfig, device: torch.device) -> str:
    """`auto`: digits without a root; cifar10 for a cifar-10-batches-py folder, fashion-mnist for
    a folder of Fashion-MNIST's IDX files; for an
    ImageFolder, DALI if it imports and the device is a GPU, else nvJPEG on a GPU,
    else torchvision's CPU workers."""
    if cfg.backend != "auto":
        return cfg.backend
    if cfg.root is None:
        return "digits"
    if is_cifar_folder(cfg.root):
        return "cifar10"
    if is_fashion_mnist_folder(cfg.root):
        return "fashion-mnist"
    if device.type == "cuda":
        return "dali" if dali_available() else "nvjpeg"
    return "torchvision"


def build_loaders(
    cfg: DataConfig, *, device: torch.device, rank: int = 0, world_size: int = 1, seed: int = 0
) -> DataLoaders:
    """Train and val loaders for this rank; `set_epoch(e)` on them before each epoch.

    A dataset the back end cannot read as asked (a missing folder or file, a damaged file, counts that
    disagree) or a setting it cannot apply is a DatasetError (a UserError) that names it."""
    try:
        data = _build(cfg, torch.device(device), Shard(rank=rank, world_size=world_size, seed=seed))
    except UserError:
        raise
    except FileNotFoundError as err:
        raise DatasetNotFoundError(str(err)) from err
    except (ValueError, OSError) as err:  # the back ends' word for a file or a setting they cannot use
        raise DatasetError(str(err)) from err
    if cfg.num_classes is not None and cfg.num_classes != data.num_classes:
        raise DatasetError(f"--data.num_classes {cfg.num_classes}: the {data.backend} back end has "
                           f"{data.num_classes} classes (its data's); the flag sets the synthetic back end's count, "
                           "drop it")
    return data


def _build(cfg: DataConfig, device: torch.device, shard: Shard) -> DataLoaders:
    backend = resolve_backend(cfg, device)
    if backend not in ("digits", "synthetic", "fashion-mnist") and cfg.root is None:
        raise ValueError(f"the {backend} back end reads a dataset folder: set DataConfig.root")
    check_settings_apply(cfg, backend)  # a setting the back end would ignore, such as a folder for digits
    if backend == "digits":
        from .digits import build_digits as build
    elif backend == "synthetic":
        from .synthetic import build_synthetic as build
    elif backend == "cifar10":
        from .cifar10 import build_cifar10 as build
    elif backend == "fashion-mnist":
        from .fashion_mnist import build_fashion_mnist as build
    elif backend == "torchvision":
        from .torchvision_backend import build_torchvision as build
    elif backend == "nvjpeg":
        from .nvjpeg import build_nvjpeg as build
    elif backend == "dali":
        from .dali import build_dali as build
    return build(cfg, device=device, shard=shard)
