"""What the torchvision and nvJPEG back ends share: a rank's files per epoch, in
DataLoader workers, and the device half of the augmentation."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .augment import normalise, pca_lighting
from .config import DataConfig
from .folder import BadImageError, ImageList, report_skipped
from .loader import Batch, Loader, Shard, batches_per_epoch, epoch_seed

PREFETCH_FACTOR = 4  # batches each worker decodes ahead of the training step


class EpochDataset(Dataset):
    """Index -> one sample; `seed` (set per epoch before the workers start) drives its randomness."""

    def __init__(self, images: ImageList) -> None:
        self.images = images
        self.seed = 0

    def __len__(self) -> int:
        return len(self.images.files)


class FolderLoader(Loader):
    """A rank's shard of an ImageList through DataLoader workers.

    Subclasses give the dataset (what a worker does per file), the collate
    function and `to_model_input` (what the main process does per batch on the
    device). A batch from the workers is (payload, labels, the BadImageErrors of
    its skipped files); a batch with skipped files is that much shorter.
    """

    def __init__(
        self, dataset: EpochDataset, cfg: DataConfig, *, device: torch.device, shard: Shard, train: bool
    ) -> None:
        super().__init__()
        self.dataset, self.cfg, self.device, self.shard, self.train = dataset, cfg, device, shard, train
        self.batch_size = cfg.batch_size if train else cfg.eval_batch_size
        self.drop_last = cfg.drop_last and train
        self.crops = 10 if cfg.ten_crop and not train else 1
        self.skipped = len(dataset.images.skipped)  # files the scan already left out
        self.skipped_files.update((error.path, error.reason or "") for error in dataset.images.skipped)
        self._count_samples(shard.count(len(dataset), even=train), self.drop_last)

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        indices = self.shard.indices(len(self.dataset), epoch=self.epoch, shuffle=self.train, even=self.train)
        self.dataset.seed = epoch_seed(self.shard.seed, self.epoch)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=indices[: self.num_samples].tolist(),
            num_workers=self.cfg.workers,
            collate_fn=self.collate,
            pin_memory=self.cfg.pin_memory and self.device.type == "cuda",
            drop_last=self.drop_last,
            prefetch_factor=PREFETCH_FACTOR if self.cfg.workers else None,
        )
        skipped_before = self.skipped
        generator = torch.Generator(device=self.device).manual_seed(self.dataset.seed + 7 * self.shard.rank + 1)
        for payload, labels, skipped in loader:
            if len(labels):
                images, labels, dropped = self.to_model_input(payload, labels, generator)
                skipped = skipped + dropped
            self.count_skipped(skipped)  # now: a consumer may stop after len(self) batches
            if len(labels):  # else every file of this batch was bad and skipped
                yield images, labels.to(self.device, non_blocking=True)
        report_skipped(self.skipped - skipped_before, f"{type(self).__name__} epoch {self.epoch}")

    def count_skipped(self, bad: list[BadImageError]) -> None:
        self.skipped += len(bad)
        self.skipped_files.update((error.path, error.reason or "") for error in bad)

    def collate(self, samples):
        raise NotImplementedError

    def to_model_input(self, payload, labels: torch.Tensor, generator: torch.Generator):
        """(images on the device, their labels, the BadImageErrors of files found bad here and dropped)."""
        raise NotImplementedError

    def finish_on_device(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """float NCHW in [0, 1] -> lighting (paper recipe, train) -> normalised model input."""
        if self.train and self.cfg.recipe == "paper-scale" and self.cfg.lighting_std > 0:
            images = pca_lighting(images, std=self.cfg.lighting_std, generator=generator)
        return normalise(images, dtype=self.cfg.torch_dtype)


def split_skipped(samples: list) -> tuple[list, list[BadImageError]]:
    """(the good samples, the errors of the bad files a dataset skipped in their place)."""
    return ([sample for sample in samples if not isinstance(sample, BadImageError)],
            [sample for sample in samples if isinstance(sample, BadImageError)])
