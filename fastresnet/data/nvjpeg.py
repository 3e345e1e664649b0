"""`nvjpeg`: JPEGs decoded on the GPU by torchvision (nvJPEG), augmented there in batches.

Where DALI is not installed but CUDA is. Worker processes only read bytes
(and look at each JPEG's header); the main process decodes a whole batch with
one `torchvision.io.decode_jpeg(list, device="cuda")` call, then crops the
recipe's box of each image and resizes it (bilinear, antialiased) on the GPU,
flips, adds the lighting noise and normalises the batch there.

What nvJPEG might not take goes the CPU way in the worker (Pillow, to RGB):
a file whose content is not a JPEG (a PNG named .JPEG), a CMYK JPEG (4
components), and a JPEG without its end marker (truncated: Pillow then
raises and the bad-file policy applies, where nvJPEG might return a
half-grey image). If the batched GPU decode still fails, each image of that
batch is decoded alone, and one that fails everywhere is a bad file.

On a CPU device the same code runs with torchvision's CPU decoder: that is
how the tests exercise this back end without a GPU.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from .augment import uint8_to_unit
from .config import DataConfig
from .crops import Box, centre_box, five_boxes, rrc_box, sample_rng, scale_box
from .folder import BadImageError, ImageList, open_rgb, read_bytes, scan_image_folder
from .folder_loader import EpochDataset, FolderLoader, split_skipped
from .jpeg import components, is_jpeg, structure_problem
from .loader import DataLoaders, Shard


def decode_to_rgb(data, device: torch.device):
    """torchvision's decode_jpeg (nvJPEG on a GPU), one tensor or a list.

    torchvision 0.29 deprecates its decoders in favour of TorchCodec; they are
    still the nvJPEG path that needs nothing beyond torchvision on the GPU
    machines (torch 2.11 ... 2.14), so the warning is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


JPEG_END = b"\xff\xd9"


def gpu_decodable(data: bytes) -> bool:
    return is_jpeg(data) and data.rstrip(b"\x00").endswith(JPEG_END) and components(data) in (1, 3)


class BytesDataset(EpochDataset):
    """One file -> ("jpeg", its bytes) for the GPU decoder, or ("rgb", CHW uint8) decoded here."""

    def __init__(self, images: ImageList, cfg: DataConfig) -> None:
        super().__init__(images)
        self.cfg = cfg

    def __getitem__(self, index: int):
        path, label = self.images.files[index], self.images.labels[index]
        try:
            data = read_bytes(path)
            if gpu_decodable(data):
                problem = structure_problem(data)  # nvJPEG, like DALI's decoder, reads through these
                if problem:
                    raise BadImageError(path, problem)
                return ("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)), label, index
            image = np.array(open_rgb(path))
        except BadImageError as error:
            if self.cfg.bad_files == "fail":
                raise
            return error
        return ("rgb", torch.from_numpy(image).permute(2, 0, 1).contiguous()), label, index


def collate_encoded(samples):
    good, skipped = split_skipped(samples)
    payload = [(kind, data, index) for (kind, data), _, index in good]
    labels = torch.tensor([label for _, label, _ in good], dtype=torch.int64)
    return payload, labels, skipped


def crop_resize(image: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (1, 3, size, size) float in [0, 1]."""
    left, top, width, height = box
    crop = uint8_to_unit(image[None, :, top : top + height, left : left + width])
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class NvjpegLoader(FolderLoader):
    def collate(self, samples):
        return collate_encoded(samples)

    def to_model_input(self, payload, labels: torch.Tensor, generator: torch.Generator):
        decoded = self.decode(payload)
        kept = [position for position, image in enumerate(decoded) if not isinstance(image, BadImageError)]
        views = [self.views(decoded[position], payload[position][2]) for position in kept]
        images = self.finish_on_device(torch.cat(views), generator) if views else None
        return images, labels[kept], [image for image in decoded if isinstance(image, BadImageError)]

    def decode(self, payload) -> list[torch.Tensor | BadImageError]:
        """All images of the batch as (3, H, W) uint8 on the device (or the error of a bad file,
        skipped); the JPEGs in one decoder call."""
        jpeg_positions = [i for i, (kind, _, _) in enumerate(payload) if kind == "jpeg"]
        decoded: list[torch.Tensor | None] = [
            data.to(self.device, non_blocking=True) if kind == "rgb" else None for kind, data, _ in payload
        ]
        jpegs = [payload[i][1] for i in jpeg_positions]
        try:
            results = decode_to_rgb(jpegs, self.device) if jpegs else []
        except RuntimeError:
            results = [self.decode_alone(payload[i]) for i in jpeg_positions]
        for position, image in zip(jpeg_positions, results, strict=True):
            decoded[position] = image
        return decoded

    def decode_alone(self, entry) -> torch.Tensor | BadImageError:
        """One JPEG the batched call choked on: the decoder alone, else Pillow, else a bad file."""
        _, data, index = entry
        try:
            return decode_to_rgb(data, self.device)
        except RuntimeError:
            pass
        try:
            image = open_rgb(self.dataset.images.files[index])
        except BadImageError as error:
            if self.cfg.bad_files == "fail":
                raise
            return error
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).to(self.device)

    def views(self, image: torch.Tensor, index: int) -> torch.Tensor:
        cfg, size = self.cfg, self.cfg.image_size
        height, width = image.shape[-2:]
        if self.train:
            rng = sample_rng(self.dataset.seed, index)
            if cfg.recipe == "rrc":
                box = rrc_box(width, height, scale=cfg.rrc_scale, rng=rng)
            else:
                box = scale_box(width, height, size=size, shorter=cfg.scale_range, rng=rng)
            view = crop_resize(image, box, size)
            return view.flip(3) if rng.random() < 0.5 else view
        if cfg.ten_crop:
            five = torch.cat(
                [
                    crop_resize(image, box, size)
                    for box in five_boxes(width, height, size=size, resize=cfg.resize_before_crop)
                ]
            )
            return torch.cat([five, five.flip(3)])
        return crop_resize(image, centre_box(width, height, size=size, resize=cfg.resize_before_crop), size)


def build_nvjpeg(cfg: DataConfig, *, device: torch.device, shard: Shard):
    train_list, val_list = scan_image_folder(cfg.root, bad_files=cfg.bad_files)
    return DataLoaders(
        train=NvjpegLoader(BytesDataset(train_list, cfg), cfg, device=device, shard=shard, train=True),
        val=NvjpegLoader(BytesDataset(val_list, cfg), cfg, device=device, shard=shard, train=False),
        num_classes=len(train_list.classes),
        image_size=cfg.image_size,
        backend="nvjpeg",
    )
