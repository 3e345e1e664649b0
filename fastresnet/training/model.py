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


def prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device, image_size: int) -> Prepared:
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    fused = "off"
    if wants_fused_blocks(cfg, device):
        model = use_fused_blocks(model, cfg, device, image_size)
        fused = "on"

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


def use_fused_blocks(model: nn.Module, cfg: TrainConfig, device: torch.device, image_size: int) -> nn.Module:
    """Swap in the fused training blocks (same parameters and state_dict keys) and let each
    block time its paths on a batch of the run's shape now: torch.compile and CUDA graphs
    cannot measure, and an untuned block falls back to its eager path under them."""
    from fastresnet import convert
    from fastresnet.nn import tune_dispatch

    model = convert(model, mode="train")
    if device.type == "cuda":
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        example = torch.randn(cfg.data.batch_size, 3, image_size, image_size, device=device)
        example = example.contiguous(memory_format=memory_format)
        dtype = amp_dtype(cfg, device)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            tune_dispatch(model, example)
    return model


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
