"""The model and its optimizer, made fast for the device.

`prepare_model` is the one place where speed features touch the model:
device and channels_last memory, fastresnet's fused blocks, DistributedDataParallel
under torchrun, torch.compile. Evaluation uses the plain module (`Prepared.module`),
which shares its weights with the compiled/wrapped one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastresnet.models import get_model
from fastresnet.training import distributed
from fastresnet.training.config import TrainConfig


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    options = {"num_classes": num_classes}
    if cfg.shortcut:
        options["shortcut"] = cfg.shortcut
    if cfg.zero_init_residual:
        options["zero_init_residual"] = True
    return get_model(cfg.model, **options)


def compile_mode(cfg: TrainConfig, device: torch.device) -> str:
    """The torch.compile mode, or "off"; auto compiles on CUDA only (it costs minutes on a CPU)."""
    if cfg.compile == "auto":
        return "default" if device.type == "cuda" else "off"
    return cfg.compile


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32; auto is bf16 on CUDA and fp32 on a CPU."""
    amp = cfg.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def wants_fused_blocks(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.fused_blocks == "on" or (cfg.fused_blocks == "auto" and device.type == "cuda")


@dataclass
class Prepared:
    module: nn.Module  # the plain model: state_dict, evaluation
    runner: nn.Module  # what the training step calls: maybe fused, DDP-wrapped and compiled
    fused_blocks: str  # what happened to the fused-block request, for the log
    compile_mode: str


def prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> Prepared:
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    fused = "off"
    if wants_fused_blocks(cfg, device):
        # Fused conv-BN-ReLU / BN-add-ReLU blocks (issues 3-5) are wired in here at merge time:
        #     from fastresnet import convert
        #     model = convert(model, mode="train")   # keeps state_dict keys
        #     fused = "on"
        # Until then the plain blocks train, and the run log says so.
        fused = "requested, not in this build"

    runner: nn.Module = model
    if distributed.is_active():
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no copy
        )
    mode = compile_mode(cfg, device)
    if mode != "off":
        runner = torch.compile(runner, mode=mode)
    return Prepared(module=model, runner=runner, fused_blocks=fused, compile_mode=mode)


def param_groups(model: nn.Module, weight_decay: float, no_bn_bias_decay: bool) -> list[dict]:
    """Weight decay on conv/fc weights; none on BN parameters and biases if asked (ndim <= 1)."""
    if not no_bn_bias_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device, lr: float) -> torch.optim.SGD:
    impl = cfg.optimizer_impl
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]
    return torch.optim.SGD(
        param_groups(model, cfg.weight_decay, cfg.no_bn_bias_decay),
        lr=lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        **flags,
    )
