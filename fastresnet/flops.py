"""Counting a model's work: multiply-adds and parameters.

The paper reports FLOPs as multiply-adds of the conv and fc layers (Table 1:
ResNet-50 at 3.8e9). `count_macs` runs one forward pass of a single image
under torch's FLOP counter, which counts matrix products and convolutions,
and halves its FLOPs (one multiply-add = two FLOPs). Training costs about
three forward passes (forward, input gradient, weight gradient), which is
what `train_flops_per_image` returns, in FLOPs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_shape: tuple[int, int, int] = (3, 224, 224)) -> int:
    """Forward multiply-adds for one image of shape (C, H, W)."""
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, *input_shape, device=device)
    was_training = model.training
    model.eval()  # no running-statistics update from the probe
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def train_flops_per_image(model: nn.Module, input_shape: tuple[int, int, int] = (3, 224, 224)) -> int:
    """FLOPs of one training step per image: forward + two backward products."""
    return 3 * 2 * count_macs(model, input_shape)
