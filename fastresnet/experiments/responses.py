"""A trained net's layer responses: the spread of each 3x3 layer's output (the paper's Figure 7).

A layer's response is the output of a 3x3 conv after its BN, before the
ReLU and before the residual addition: in the zoo's torchvision names, the
output of `bnK` beside `convK`. Its standard deviation is taken over every
element (images, channels, positions) of the test set, in evaluation mode,
as the population std from float64 running sums:

    std = sqrt(sum(x^2)/N - (sum(x)/N)^2)

Forward hooks on the BN modules read the statistics inside the hook, because
the ReLU that follows runs in place and overwrites the tensor afterwards.
Every experiment run measures its responses when it finishes and keeps them in
its record (runs.py), so `layer-responses` needs no checkpoint of a net that
another machine trained.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from fastresnet.data import build_loaders
from fastresnet.models import get_model
from fastresnet.training import smoke
from fastresnet.training.checkpoint import load_checkpoint
from fastresnet.training.config import TrainConfig, saved_values
from fastresnet.training.fields import apply_flat


def conv3x3_responses(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, BN) for every 3x3 conv, in network order: the BN named like the conv (conv2 -> bn2)."""
    modules = dict(model.named_modules())
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
            prefix, _, leaf = name.rpartition(".")
            bn_name = (prefix + "." if prefix else "") + leaf.replace("conv", "bn", 1)
            bn = modules.get(bn_name)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                raise ValueError(f"3x3 conv {name} has no BN named {bn_name} after it")
            pairs.append((name, bn))
    return pairs


class _RunningMoments:
    """Sum and sum of squares of a layer's outputs, kept on its device (read once, at the end)."""

    def __init__(self):
        self.sums = None
        self.count = 0

    def hook(self, module, inputs, output):
        x = output.detach().double()
        sums = torch.stack([x.sum(), x.square().sum()])
        self.sums = sums if self.sums is None else self.sums + sums
        self.count += x.numel()

    def std(self) -> float:
        if self.count == 0:
            raise RuntimeError("no images went through the net: the loader is empty")
        total, squares = self.sums.tolist()
        mean = total / self.count
        return math.sqrt(max(squares / self.count - mean * mean, 0.0))


@torch.no_grad()
def response_stds(model: nn.Module, images_batches, device: torch.device | str = "cpu") -> list[tuple[str, float]]:
    """[(conv name, std of its response)] over the batches, in network order; the model in eval mode."""
    pairs = conv3x3_responses(model)
    moments = [_RunningMoments() for _ in pairs]
    handles = [bn.register_forward_hook(m.hook) for (_, bn), m in zip(pairs, moments)]
    was_training = model.training
    model.eval()
    try:
        for batch in images_batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(images.to(device).float())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [(name, m.std()) for (name, _), m in zip(pairs, moments)]


def load_trained(path: str | Path, device: torch.device) -> tuple[nn.Module, TrainConfig]:
    """A net and its TrainConfig from a run directory or a checkpoint file of `python -m fastresnet.train`."""
    state = load_checkpoint(path)
    cfg = apply_flat(TrainConfig(), saved_values(state["config"]), f"the config in {path}")
    fc = state["model"]["fc.weight"]
    options = {"num_classes": fc.shape[0], **({"shortcut": cfg.shortcut} if cfg.shortcut else {})}
    model = get_model(cfg.model, **options)
    model.load_state_dict(state["model"])
    return model.to(device), cfg


def measure(path: str | Path, device: torch.device | None = None) -> dict:
    """The responses of the net saved at `path`, on `device` (None: CUDA where there is one, else the CPU)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_trained(path, device)
    data = build_loaders(cfg.data, device=device, seed=cfg.seed)
    stds = response_stds(model, smoke.batches(data.val), device)  # the whole test set, except in a smoke run
    return {"model": cfg.model, "seed": cfg.seed, "checkpoint": str(path), "layers": [n for n, _ in stds],
            "stds": [s for _, s in stds]}
