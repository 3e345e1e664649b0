"""Fused blocks or plain ones under torch.compile: one measured choice for the whole training step.

A fused block picks its path per shape by timing it eagerly (tune_dispatch). That
says nothing about compiled speed: torch.compile fuses a plain block's BatchNorm and
ReLU into its own kernels, while a fused block's custom ops are opaque to it. On the
H200, torch.compile of torchvision's bottleneck beat the fused block by 1.1x-1.5x
(bench/RESULTS.md), so converting and then compiling can be slower than compiling
alone, and the library must never be slower than plain PyTorch.

So with fused_blocks="auto" and compile on, the training step is timed both ways on
the run's batch shape: converted + compiled ("fused") and plain + compiled ("plain"),
forward and backward, after the compile (op "train_step" of fastresnet.ops.tuning: warm-up
calls, then the median of ten). The faster one is kept. The choice is stored in the tuning
disk cache (per GPU and torch/triton versions) under a key of the model, batch shape,
dtype, memory format and compile mode, so a later run of the same setting compiles
only the winner. Switches: FASTRESNET_DISPATCH=default takes the default without timing
(DEFAULT_CHOICE), FASTRESNET_DISPATCH=train_step=fused (or =plain) pins one; the config's
fused_blocks="on" or "off" skips all of this.

The two models share their parameter and buffer tensors (a structural copy), so the
optimizer, checkpoints and evaluation see the same weights whichever wins; the timing
steps take no optimizer step, and the BatchNorm running statistics are restored after.
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from fastresnet.ops import tuning

log = logging.getLogger("fastresnet.training")

TRAIN_STEP = tuning.Op("train_step", {"fused": None, "plain": None})  # run 1
# Without a measurement: plain + compile is plain PyTorch, so it cannot be slower than plain PyTorch.
DEFAULT_CHOICE = "plain"


@dataclass
class FusedChoice:
    choice: str  # "fused" or "plain"
    source: str  # "measured", "disk cache", "default" or "pinned by FASTRESNET_DISPATCH"
    key: str  # the tuning cache's key
    times_ms: dict[str, float] = field(default_factory=dict)  # per training step (forward + backward)

    def summary(self) -> str:
        times = ", ".join(f"{name} {ms:.2f} ms/step" for name, ms in sorted(self.times_ms.items()))
        return f"{self.choice} ({self.source}{': ' + times if times else ''})"

    def as_dict(self) -> dict:
        return asdict(self)


def decision_key(model_name: str, model: nn.Module, batch: int, image_size: int, dtype: torch.dtype | None,
                 channels_last: bool, compile_mode: str) -> str:
    params = sum(p.numel() for p in model.parameters())
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    memory = "channels_last" if channels_last else "contiguous"
    return (f"fused_or_plain:{model_name}:{params}params:{batch}x3x{image_size}x{image_size}:"
            f"{dtype_name}:{memory}:compile-{compile_mode}")


def shared_copy(model: nn.Module) -> nn.Module:
    """A new module tree over the same parameter and buffer tensors (convert() then swaps its blocks only)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def training_step(runner: nn.Module, images: torch.Tensor, dtype: torch.dtype | None) -> None:
    """Forward under autocast and backward of a cross-entropy-like scalar; the gradients are dropped."""
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = runner(images)
    out.float().logsumexp(dim=1).mean().backward()
    for p in runner.parameters():
        p.grad = None


def choose_fused_or_plain(
    model: nn.Module,
    key: str,
    images: torch.Tensor,
    dtype: torch.dtype | None,
    fuse: Callable[[nn.Module], nn.Module],
    compile_module: Callable[[nn.Module], nn.Module],
) -> tuple[nn.Module, nn.Module | None, FusedChoice]:
    """(the winning module, its compiled runner if the timing built one, the choice).

    `fuse(m)` converts m's blocks (and tunes their paths); `compile_module(m)` is torch.compile
    with the run's mode. A candidate that fails (a compile error) is left out of the timing.
    """
    built: dict[str, nn.Module] = {}
    runners: dict[str, nn.Module] = {}

    def module_for(name: str) -> nn.Module:
        if name not in built:
            built[name] = model if name == "plain" else fuse(shared_copy(model))
        return built[name]

    def timed_step(name: str) -> None:
        if name not in runners:  # compiled on the first (warm-up) call, outside the timed repetitions
            runners[name] = compile_module(module_for(name))
        training_step(runners[name], images, dtype)

    current = tuning.settings()
    times: dict[str, float] = {}
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        choice = TRAIN_STEP.choose((key,), images.device, DEFAULT_CHOICE,
                                   timed=lambda name: lambda: timed_step(name))
        entry = tuning.decision(TRAIN_STEP.key((key,)))
        if current.pin_for(TRAIN_STEP.name) in TRAIN_STEP.candidates:
            source = "pinned by FASTRESNET_DISPATCH"
        elif entry is None:
            source = "default"
        else:
            source, times = entry["source"], dict(entry["times_ms"])
    finally:  # timing steps are not training steps, even when a candidate failed halfway
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved):
                buffer.copy_(value)
        for p in model.parameters():
            p.grad = None
    result = FusedChoice(choice=choice, source=source, key=TRAIN_STEP.key((key,)), times_ms=times)
    log.info("fused blocks auto -> %s [%s]", result.summary(), result.key)
    winner = module_for(choice)
    compiled = runners.get(choice)
    runners.clear()  # the loser's compiled graphs can go
    return winner, compiled, result
