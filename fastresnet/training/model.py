"""The model and its optimizer, made fast for the device.

`prepare_model` is the one place where speed features touch the model:
device and channels_last memory, fastresnet's fused blocks (under torch.compile, by
default only where a measured training step says they win: fused_choice.py),
DistributedDataParallel under torchrun, torch.compile. Evaluation uses the module
(`Prepared.module`), which shares its weights with the compiled/wrapped one.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from fastresnet.training import distributed
from fastresnet.training.config import TrainConfig
from fastresnet.training.fused_choice import FusedChoice, choose_fused_or_plain, decision_key, shared_copy
from fastresnet.training.network import build_model  # noqa: F401 (the training program's parts import it here)
from fastresnet.training.precision import choose_amp


def compile_mode(cfg: TrainConfig, device: torch.device) -> str:
    """The torch.compile mode, or "off"; auto compiles on CUDA only (it costs minutes on a CPU)."""
    if cfg.compile == "auto":
        return "default" if device.type == "cuda" else "off"
    return cfg.compile


def amp_dtype(cfg: TrainConfig, device: torch.device, image_size: int) -> torch.dtype | None:
    """The autocast dtype, or None for fp32; auto is bf16 on CUDA, and on a CPU bf16 where a timed training
    step of this model at this image size says it is faster (fastresnet.training.precision), else fp32."""
    return choose_amp(cfg, device, image_size).dtype


def amp_autocast(device_type: str, amp: torch.dtype | None):
    """The context a forward pass runs under: autocast to `amp`, or none for fp32 (amp None)."""
    return torch.autocast(device_type, dtype=amp) if amp is not None else nullcontext()


def fused_blocks_plan(cfg: TrainConfig, device: torch.device, mode: str) -> str:
    """"on", "off", or "measure": auto on CUDA under torch.compile times fused against plain
    (fastresnet.training.fused_choice); auto on CUDA without compile is "on" (each block's eager
    path is measured, never slower than the plain block); auto on a CPU is "off"."""
    if cfg.fused_blocks in ("on", "off"):
        return cfg.fused_blocks
    if device.type != "cuda":
        return "off"
    return "measure" if mode != "off" else "on"


@dataclass
class Prepared:
    module: nn.Module  # the model with its parameters: state_dict, evaluation (fused blocks or plain)
    runner: nn.Module  # what the training step calls: maybe fused, DDP-wrapped and compiled
    fused_blocks: str  # what happened to the fused-block request, for the log
    compile_mode: str
    fused_choice: FusedChoice | None = None  # the measured auto decision under compile, if one was made


def prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device, image_size: int) -> Prepared:
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    mode = compile_mode(cfg, device)
    plan = fused_blocks_plan(cfg, device, mode)

    choice, compiled = None, None
    if plan == "on":
        model = use_fused_blocks(model, cfg, device, image_size)
    elif plan == "measure":
        model, compiled, choice = measure_fused_or_plain(model, cfg, device, image_size, mode)
    fused = f"auto -> {choice.summary()}" if choice is not None else plan

    runner: nn.Module = model
    if distributed.is_active():
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no copy
        )
        compiled = None  # the timing compiled the bare module; DDP's wrapper compiles anew
    if mode != "off":
        runner = compiled if compiled is not None else compile_module(runner, mode)
    return Prepared(module=model, runner=runner, fused_blocks=fused, compile_mode=mode, fused_choice=choice)


def compile_module(module: nn.Module, mode: str) -> nn.Module:
    return torch.compile(module, mode=mode)


def measure_fused_or_plain(model: nn.Module, cfg: TrainConfig, device: torch.device, image_size: int,
                           mode: str) -> tuple[nn.Module, nn.Module | None, FusedChoice]:
    """fused_blocks="auto" under compile: time both training steps once (cached on disk), keep the faster.
    Under torchrun every rank measures and rank 0's choice is taken, so all ranks run the same model."""
    dtype = amp_dtype(cfg, device, image_size)
    images = example_batch(cfg, device, image_size)
    key = decision_key(cfg.model, model, cfg.data.batch_size, image_size, dtype, cfg.channels_last, mode)
    winner, compiled, choice = choose_fused_or_plain(
        model, key, images, dtype,
        fuse=lambda m: use_fused_blocks(m, cfg, device, image_size),
        compile_module=lambda m: compile_module(m, mode),
    )
    agreed = distributed.rank0_choice(choice.choice)
    if agreed != choice.choice:  # this rank measured otherwise; follow rank 0
        choice = FusedChoice(choice=agreed, source=f"rank 0 (this rank measured {choice.summary()})", key=choice.key,
                             times_ms=choice.times_ms)
        winner = model if agreed == "plain" else use_fused_blocks(shared_copy(model), cfg, device, image_size)
        compiled = None
    return winner, compiled, choice


def example_batch(cfg: TrainConfig, device: torch.device, image_size: int) -> torch.Tensor:
    """Random images of the run's batch shape and memory format, from a private generator
    (the run's random stream is the same whether or not a measurement happens)."""
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(cfg.data.batch_size, 3, image_size, image_size, device=device, generator=generator)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return images.contiguous(memory_format=memory_format)


def use_fused_blocks(model: nn.Module, cfg: TrainConfig, device: torch.device, image_size: int) -> nn.Module:
    """Swap in the fused training blocks (same parameters and state_dict keys) and let each
    block time its paths on a batch of the run's shape now: torch.compile and CUDA graphs
    cannot measure, and an untuned block falls back to its eager path under them."""
    from fastresnet import convert
    from fastresnet.nn import tune_dispatch

    model = convert(model, mode="train")
    if device.type == "cuda":
        dtype = amp_dtype(cfg, device, image_size)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            tune_dispatch(model, example_batch(cfg, device, image_size))
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
