"""`torchvision`: CPU decoding in DataLoader worker processes, for machines without DALI or a GPU.

Each worker decodes with Pillow (any format, any colour mode, to RGB) and
crops-and-resizes the recipe's box in one antialiased `Image.resize(box=)`
call, so it never resizes pixels it then throws away; flips happen there too.
Batches of uint8 NHWC go through pinned memory to the device, where the
lighting noise and the normalisation run on the whole batch.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .augment import nhwc_to_model_layout, uint8_to_unit
from .config import DataConfig
from .crops import Box, centre_box, five_boxes, rrc_box, sample_rng, scale_box
from .folder import BadImageError, ImageList, open_rgb, scan_image_folder
from .folder_loader import EpochDataset, FolderLoader, split_skipped
from .loader import DataLoaders, Shard


def crop_resize(image: Image.Image, box: Box, size: int, flip: bool) -> np.ndarray:
    left, top, width, height = box
    out = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + width, top + height))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


class PillowDataset(EpochDataset):
    """One file -> uint8 (views, size, size, 3), or None if it is bad and skipped."""

    def __init__(self, images: ImageList, cfg: DataConfig, *, train: bool) -> None:
        super().__init__(images)
        self.cfg, self.train = cfg, train

    def __getitem__(self, index: int):
        path, label = self.images.files[index], self.images.labels[index]
        try:
            image = open_rgb(path)
        except BadImageError as error:
            if self.cfg.bad_files == "fail":
                raise
            return error
        return torch.from_numpy(np.stack(self.views(image, index))), label

    def views(self, image: Image.Image, index: int) -> list[np.ndarray]:
        cfg, size = self.cfg, self.cfg.image_size
        if self.train:
            rng = sample_rng(self.seed, index)
            if cfg.recipe == "rrc":
                box = rrc_box(image.width, image.height, scale=cfg.rrc_scale, rng=rng)
            else:
                box = scale_box(image.width, image.height, size=size, shorter=cfg.scale_range, rng=rng)
            return [crop_resize(image, box, size, flip=rng.random() < 0.5)]
        if cfg.ten_crop:
            boxes = five_boxes(image.width, image.height, size=size, resize=cfg.resize_before_crop)
            return [crop_resize(image, box, size, flip) for flip in (False, True) for box in boxes]
        box = centre_box(image.width, image.height, size=size, resize=cfg.resize_before_crop)
        return [crop_resize(image, box, size, flip=False)]


def collate_views(samples):
    """Stack the good samples' views into (B * views, size, size, 3); pass the bad files on."""
    good, skipped = split_skipped(samples)
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), skipped
    images = torch.cat([views for views, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.int64)
    return images, labels, skipped


class TorchvisionLoader(FolderLoader):
    def collate(self, samples):
        return collate_views(samples)

    def to_model_input(self, payload: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        images = uint8_to_unit(payload.to(self.device, non_blocking=True))
        return self.finish_on_device(nhwc_to_model_layout(images), generator), labels, []


def build_torchvision(cfg: DataConfig, *, device: torch.device, shard: Shard):
    train_list, val_list = scan_image_folder(cfg.root, bad_files=cfg.bad_files)
    return DataLoaders(
        train=TorchvisionLoader(
            PillowDataset(train_list, cfg, train=True), cfg, device=device, shard=shard, train=True
        ),
        val=TorchvisionLoader(PillowDataset(val_list, cfg, train=False), cfg, device=device, shard=shard, train=False),
        num_classes=len(train_list.classes),
        image_size=cfg.image_size,
        backend="torchvision",
    )
