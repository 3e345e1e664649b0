"""`synthetic`: random batches already on the device, for measuring compute alone.

One batch of standard-normal images (never zeros: they hide unwritten outputs
and run faster) and uniform labels is made once per loader, seeded by
(seed, rank), and handed out `synthetic_steps` times per epoch: no host work,
no copies, no decoding.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .config import DataConfig
from .loader import Batch, DataLoaders, Loader, Shard, epoch_seed


class SyntheticLoader(Loader):
    def __init__(
        self,
        *,
        steps: int,
        batch_size: int,
        num_classes: int,
        image_size: int,
        dtype: torch.dtype,
        device: torch.device,
        seed: int,
    ) -> None:
        super().__init__()
        self.steps, self.batch_size = steps, batch_size
        self._count_samples(steps * batch_size, drop_last=False)
        generator = torch.Generator(device=device).manual_seed(seed)
        shape = (batch_size, 3, image_size, image_size)
        images = torch.randn(shape, generator=generator, device=device).to(dtype)
        self.images = images.contiguous(memory_format=torch.channels_last)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=generator, device=device)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        for _ in range(self.steps):
            yield self.images, self.labels


def build_synthetic(cfg: DataConfig, *, device: torch.device, shard: Shard):
    def loader(steps: int, batch_size: int, stream: int) -> SyntheticLoader:
        return SyntheticLoader(
            steps=steps,
            batch_size=batch_size,
            num_classes=cfg.synthetic_classes,
            image_size=cfg.image_size,
            dtype=cfg.torch_dtype,
            device=device,
            seed=epoch_seed(shard.seed, 0) + 2 * shard.rank + stream,
        )

    return DataLoaders(
        train=loader(cfg.synthetic_steps, cfg.batch_size, 0),
        val=loader(cfg.synthetic_val_steps, cfg.eval_batch_size, 1),
        num_classes=cfg.synthetic_classes,
        image_size=cfg.image_size,
        backend="synthetic",
    )
