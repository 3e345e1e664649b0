"""What every back end hands the training loop: `Loader`s of (images, labels).

A Loader yields normalised float images, NCHW in shape and channels_last in
memory, and int64 labels, both on the training device. The shuffle of epoch
e is a function of (seed, e) only, the same on every rank, and each rank takes
a disjoint slice of it, so that a multi-GPU run sees every image at most once
per epoch and a rerun with the same seed sees the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fastresnet.errors import UserError

if TYPE_CHECKING:
    from .config import DataConfig

Batch = tuple[torch.Tensor, torch.Tensor]
Transform = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


class DatasetError(UserError, ValueError):
    """A dataset or data setting that cannot give what was asked: a missing or damaged file, counts that
    disagree, a setting the back end cannot apply. The message names the file or the flag."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset folder or file that is not there (still a FileNotFoundError to code that catches that)."""


class Loader:
    """Base of all back ends' loaders: iteration, length, epoch and counters."""

    shard_samples: int  # images of this rank's shard per epoch
    num_samples: int  # images this rank sees per epoch: shard_samples less a dropped last partial batch
    batch_size: int  # images per step
    crops: int = 1  # views per image in a batch: 10 for a ten-crop val loader
    skipped: int = 0  # bad files skipped so far under bad_files="skip" (a file bad in two epochs counts twice)

    def __init__(self) -> None:
        self.epoch = 0
        self.skipped_files: dict[str, str] = {}  # path -> why, each bad file skipped so far

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle: epoch e always gives the same order for a given seed."""
        self.epoch = epoch

    def _count_samples(self, shard_samples: int, drop_last: bool) -> None:
        self.shard_samples = shard_samples
        self.num_samples = shard_samples - (shard_samples % self.batch_size if drop_last else 0)

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError


@dataclass
class DataLoaders:
    """What every back end builds: the training and validation loaders and what the model needs to know."""

    train: Loader
    val: Loader
    num_classes: int
    image_size: int  # pixels per side of the images the model gets
    backend: str  # the back end actually used ("auto" resolved)


@dataclass(frozen=True)
class Shard:
    """Which slice of a dataset one rank reads, and how it is shuffled."""

    rank: int = 0
    world_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of size {self.world_size}")

    def indices(self, n: int, *, epoch: int, shuffle: bool, even: bool) -> torch.Tensor:
        """This rank's sample indices (CPU int64) out of n for this epoch.

        The permutation depends only on (seed, epoch), so all ranks agree on it;
        rank r takes every world_size-th element starting at r: disjoint shards.
        `even` cuts the tail so that every rank has exactly n // world_size
        samples (training, where ranks must take the same number of steps);
        otherwise the first n % world_size ranks get one more (evaluation, where
        every sample must be seen exactly once).
        """
        if shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        if even:
            order = order[: n - n % self.world_size]
        return order[self.rank :: self.world_size]

    def count(self, n: int, *, even: bool) -> int:
        if even:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))


def epoch_seed(seed: int, epoch: int) -> int:
    """One 63-bit seed per (seed, epoch), far apart for neighbouring epochs."""
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63)


def batches_per_epoch(num_samples: int, batch_size: int, drop_last: bool) -> int:
    if drop_last:
        return num_samples // batch_size
    return -(-num_samples // batch_size)


class TensorLoader(Loader):
    """Batches out of a dataset that already lives on the device.

    `images` is indexed on its first dimension (uint8 NHWC or float, whatever
    `transform` expects); `transform(images, generator)` turns one batch of it
    into the model's input and runs on the device, so an epoch costs no host
    work beyond one permutation.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        shard: Shard,
        train: bool,
        drop_last: bool,
        transform: Transform,
    ) -> None:
        super().__init__()
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.to(device=images.device, dtype=torch.int64)
        self.batch_size, self.shard, self.train = batch_size, shard, train
        self.drop_last = drop_last and train
        self.transform = transform
        self._count_samples(shard.count(len(images), even=train), self.drop_last)

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        indices = self.shard.indices(len(self.images), epoch=self.epoch, shuffle=self.train, even=self.train)
        indices = indices[: self.num_samples].to(self.images.device)
        generator = self._augment_generator()
        for start in range(0, len(indices), self.batch_size):
            chosen = indices[start : start + self.batch_size]
            if self.drop_last and len(chosen) < self.batch_size:
                break
            yield self.transform(self.images[chosen], generator), self.labels[chosen]

    def _augment_generator(self) -> torch.Generator | None:
        """Random crops and flips: seeded per (seed, epoch, rank), on the data's device."""
        if not self.train:
            return None
        generator = torch.Generator(device=self.images.device)
        generator.manual_seed(epoch_seed(self.shard.seed, self.epoch) + 7 * self.shard.rank + 1)
        return generator


def require_batches(loader: Loader) -> None:
    """A DatasetError, saying what to change, when a training loader gives no batch in an epoch."""
    if len(loader) > 0:
        return
    held = loader.shard_samples
    if held == 0:
        raise DatasetError("the training set gives this process no images: it is empty, or holds fewer images "
                           "than there are processes")
    raise DatasetError(f"the training set gives no whole batch: {held} images per epoch for this process, against "
                       f"--data.batch_size {loader.batch_size} (a last partial batch is dropped); lower "
                       f"--data.batch_size to {held} or less, or give --data.drop_last false")


def tensor_loaders(
    cfg: DataConfig,
    shard: Shard,
    train: Batch,
    val: Batch,
    make_transform: Callable[..., Transform],
) -> tuple[TensorLoader, TensorLoader]:
    """The train and val TensorLoaders of a set held on the device; `make_transform(train=...)`
    gives each split its transform (augmentation for training only)."""

    def loader(images: torch.Tensor, labels: torch.Tensor, *, train: bool) -> TensorLoader:
        return TensorLoader(
            images,
            labels,
            batch_size=cfg.batch_size if train else cfg.eval_batch_size,
            shard=shard,
            train=train,
            drop_last=cfg.drop_last,
            transform=make_transform(train=train),
        )

    return loader(*train, train=True), loader(*val, train=False)
