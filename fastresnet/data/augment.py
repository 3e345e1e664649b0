"""Augmentations on batches of tensors that are already on the device.

Everything here takes a whole batch and a torch.Generator on the batch's
device, so that a training step costs a handful of kernel launches and no
host work. Images arrive as uint8 NHWC (the order JPEG decoders and the
CIFAR pickles give) and leave as float NCHW in shape, channels_last in
memory: `permute(0, 3, 1, 2)` of an NHWC tensor is exactly that, for free.
"""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # per channel, images scaled to [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)

# PCA colour lighting (Krizhevsky et al. 2012, used by He et al. 2015): the
# eigenvalues and eigenvectors (columns) of the RGB covariance of ImageNet's
# pixels in [0, 1]. Each image gets eigvec @ (alpha * eigval), alpha ~ N(0, std).
LIGHTING_EIGVAL = (0.2175, 0.0188, 0.0045)
LIGHTING_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


def nhwc_to_model_layout(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W) shape with channels_last memory, without a copy."""
    return images.permute(0, 3, 1, 2)


def pad_crop_flip(images: torch.Tensor, *, pad: int, generator: torch.Generator) -> torch.Tensor:
    """The paper's CIFAR augmentation on a float NHWC batch: zero-pad `pad` pixels
    on each side, take a random crop of the original size, flip half of them.

    One gather does all three: row index oy + i, column index ox + j, or
    ox + (W - 1 - j) for a flipped image; padding is virtual (indices that fall
    outside the image read a zero).
    """
    batch, height, width, _ = images.shape
    device = images.device
    offset_y = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator, device=device) - pad
    offset_x = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator, device=device) - pad
    flip = torch.rand((batch, 1), generator=generator, device=device) < 0.5
    cols = torch.arange(width, device=device)
    rows = offset_y + torch.arange(height, device=device)  # (B, H)
    cols = offset_x + torch.where(flip, width - 1 - cols, cols)  # (B, W)
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    gathered = images[
        torch.arange(batch, device=device)[:, None, None],
        rows.clamp(0, height - 1)[:, :, None],
        cols.clamp(0, width - 1)[:, None, :],
    ]
    return gathered * inside[..., None]


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip half of an NCHW batch left-right."""
    flip = torch.rand((images.shape[0], 1, 1, 1), generator=generator, device=images.device) < 0.5
    return torch.where(flip, images.flip(3), images)


def pca_lighting(images: torch.Tensor, *, std: float, generator: torch.Generator) -> torch.Tensor:
    """AlexNet's colour augmentation on an NCHW batch in [0, 1]."""
    device = images.device
    eigval = torch.tensor(LIGHTING_EIGVAL, device=device)
    eigvec = torch.tensor(LIGHTING_EIGVEC, device=device)
    alpha = torch.randn((images.shape[0], 3), generator=generator, device=device) * std
    offset = (alpha * eigval) @ eigvec.T  # (B, 3): sum_k eigvec[c, k] * alpha_k * eigval_k
    return images + offset[:, :, None, None].to(images.dtype)


def normalise(images: torch.Tensor, *, dtype: torch.dtype, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(x - mean) / std per channel of an NCHW batch in [0, 1], cast to the model's dtype."""
    device = images.device
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    out = ((images.float() - mean_t) / std_t).to(dtype)
    return out.contiguous(memory_format=torch.channels_last)


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float().mul_(1.0 / 255.0)
