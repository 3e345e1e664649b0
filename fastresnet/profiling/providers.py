"""What is profiled: one step of a model built by a named provider, from the training config.

  fastresnet           the training program's own model: fastresnet.training.model.prepare_model
                       (channels_last, fused blocks, torch.compile, as the flags say); inference
                       mode: fastresnet.convert(mode="inference") unless the fused blocks are off
  torchvision          torchvision's model of that name, eager (the zoo's module where torchvision
                       has none, e.g. the CIFAR nets: same layout and parameter names)
  torchvision+compile  the same, under torch.compile (the --compile mode, "default" if off/auto)

Every provider runs the training program's step (fastresnet.training.loop.make_train_step: autocast,
the loss, backward, the optimizer of build_optimizer, zero_grad) on the same batches, so that the
rows differ only where the model differs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fastresnet.data.loader import DatasetError, require_batches
from fastresnet.training.config import TrainConfig
from fastresnet.training.fields import ConfigError
from fastresnet.training.loop import make_train_step
from fastresnet.training.model import (
    amp_autocast, amp_dtype, build_model, build_optimizer, compile_mode, fused_blocks_plan, prepare_model,
)

PROVIDERS = ("fastresnet", "torchvision", "torchvision+compile")
MODES = ("train", "inference")


@dataclass
class Subject:
    provider: str
    description: str  # how the model was built, for the report
    step: Callable[[torch.Tensor, torch.Tensor], object]
    optimizer_bytes: float  # SGD's least traffic per step: read w, g (and momentum), write w (and momentum)


def parse_providers(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PROVIDERS]
    if not names or unknown:
        raise ConfigError(f"--providers {text!r}: {', '.join(unknown) or 'none given'} unknown; "
                          f"choose a comma-separated list of {', '.join(PROVIDERS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--providers {text!r}: a provider is named twice")
    return names


def build_subject(provider: str, mode: str, cfg: TrainConfig, device: torch.device, num_classes: int,
                  image_size: int) -> Subject:
    if provider == "fastresnet":
        runner, module, description = _fastresnet_model(cfg, device, num_classes, image_size, mode)
    else:
        module, description = _torchvision_model(cfg, num_classes)
        module = _place(module, cfg, device)
        runner = module
        if provider == "torchvision+compile":
            chosen = compile_mode(cfg, device)
            chosen = "default" if chosen == "off" else chosen
            runner = torch.compile(module, mode=chosen)
            description += f", torch.compile mode {chosen}"
        else:
            description += ", eager"
    amp = amp_dtype(cfg, device, image_size)
    description += f" | amp {_amp_name(amp)}, channels_last {cfg.channels_last}"
    if mode == "inference":
        module.eval()
        return Subject(provider, description, _inference_step(runner, amp, device), optimizer_bytes=0.0)
    module.train()
    optimizer = build_optimizer(module, cfg, device, lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    step = make_train_step(runner, criterion, optimizer, amp, scaler)
    return Subject(provider, description, step, optimizer_bytes=_sgd_bytes(optimizer))


def _fastresnet_model(cfg, device, num_classes, image_size, mode):
    model = build_model(cfg, num_classes)
    if mode == "train":
        prepared = prepare_model(model, cfg, device, image_size)
        return prepared.runner, prepared.module, (
            f"fastresnet {cfg.model}: compile {prepared.compile_mode}, fused blocks {prepared.fused_blocks}")
    from fastresnet import convert

    model = _place(model, cfg, device).eval()
    chosen = compile_mode(cfg, device)
    fused = fused_blocks_plan(cfg, device, chosen) != "off"
    if fused:
        model = convert(model, mode="inference")
    runner = torch.compile(model, mode=chosen) if chosen != "off" else model
    return runner, model, (f"fastresnet {cfg.model}: compile {chosen}, "
                           f"{'convert(mode=inference)' if fused else 'plain (fused blocks off)'}")


def _torchvision_model(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, str]:
    import torchvision

    factory = getattr(torchvision.models, cfg.model, None)
    if factory is None or cfg.shortcut:
        why = "torchvision has no such model" if factory is None else f"shortcut {cfg.shortcut} is not torchvision's"
        return build_model(cfg, num_classes), f"fastresnet's zoo {cfg.model} as a torchvision stand-in ({why})"
    model = factory(weights=None, num_classes=num_classes, zero_init_residual=cfg.zero_init_residual)
    return model, f"torchvision {cfg.model}"


def _place(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def _inference_step(runner: nn.Module, amp: torch.dtype | None, device: torch.device):
    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), amp_autocast(device.type, amp):
            return runner(images)

    return step


def _sgd_bytes(optimizer: torch.optim.Optimizer) -> float:
    total = 0.0
    for group in optimizer.param_groups:
        tensors = 5 if group.get("momentum") else 3  # w, g, m read; w, m written (or w, g read; w written)
        total += sum(p.numel() * p.element_size() * tensors for p in group["params"])
    return total


def _amp_name(amp: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[amp]


def endless_batches(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches, epoch after epoch (a profile may need more steps than an epoch has)."""
    require_batches(loader)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:  # bad_files="skip" left out every file of the epoch
            raise DatasetError(f"the training loader gave no batch in epoch {epoch}: every file was skipped as bad")
        epoch += 1
