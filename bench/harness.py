"""Timing that is right on a GPU and cheap on a CPU, for the bench_*.py files.

Every benchmark compares providers (fastresnet, torch eager, torch.compile,
cuDNN ...) in one run, so the report can give ratios measured in the same
process on the same device. Sizes are the paper's (batch 256, 224x224) on a
GPU and tiny on the CPU, so that `pytest bench/ --benchmark` finishes here in
minutes. FASTRESNET_BENCH_SHORT=1 cuts the rounds (used by gpu_check.sh).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BenchSizes:
    batch: int  # images per step
    image_size: int  # pixels per side of an ImageNet-style input
    cifar_batch: int  # images per step for the 32x32 CIFAR nets
    rounds: int  # timed repetitions (the median is reported)
    warmup_rounds: int  # untimed repetitions first: compilation, autotuning, caches


class BnAddRelu(nn.Module):
    """What plain PyTorch runs where the fused kernel runs: BatchNorm2d, the residual add and the ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x, residual):
        return torch.relu(self.bn(x) + residual)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def short() -> bool:
    """FASTRESNET_BENCH_SHORT=1 (bench/gpu_check.sh): fewer rounds, fewer compiles."""
    return os.environ.get("FASTRESNET_BENCH_SHORT", "0") == "1"


def sizes() -> BenchSizes:
    short_mode = short()
    if device().type == "cuda":
        return BenchSizes(batch=256, image_size=224, cifar_batch=512, rounds=10 if short_mode else 30, warmup_rounds=3)
    return BenchSizes(batch=2, image_size=64, cifar_batch=16, rounds=3, warmup_rounds=1)


def autocast(dev: torch.device):
    """bf16 autocast on a GPU (the speed setting); off on the CPU (fp32)."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(benchmark, fn, *, dev: torch.device, group: str, provider: str, baseline: bool = False, **extra):
    """Time `fn()` with pytest-benchmark, synchronizing inside the timed call.

    `extra` goes into the JSON (`images`, `bytes`, `flops` per call let the
    report turn the median time into img/s, GB/s or TFLOP/s); `baseline`
    marks the provider the others are divided by in the same group.
    """
    s = sizes()

    def timed():
        out = fn()
        synchronize(dev)
        return out

    benchmark.group = group
    benchmark.extra_info.update(
        provider=provider, baseline=baseline, device=device_name(dev), cudnn_benchmark=torch.backends.cudnn.benchmark,
        **extra,
    )
    return benchmark.pedantic(timed, rounds=s.rounds, warmup_rounds=s.warmup_rounds, iterations=1)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    from fastresnet.ops.onednn import describe_cpu

    return describe_cpu()


def interleaved(benchmark, providers: dict, *, dev: torch.device, group: str, baseline: str, rounds: int,
                warmup_rounds: int = 1, **extra) -> dict[str, float]:
    """Time every provider in turn, round after round (A, B, C, then B, C, A, ...: the start rotates), the
    way a shared CPU must be measured (../shared/MEASURING.md): a change of load falls on every provider
    alike. pytest-benchmark times the rounds; each provider's median seconds go into
    extra_info["interleaved"], which bench/report.py turns into one row per provider. Returns the medians."""
    names = list(providers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    turn = [0]

    def one_round():
        start = turn[0] % len(names)
        turn[0] += 1
        for name in names[start:] + names[:start]:
            began = time.perf_counter()
            providers[name]()
            synchronize(dev)
            samples[name].append(time.perf_counter() - began)

    benchmark.group = group
    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    medians = {name: sorted(times[warmup_rounds:])[len(times[warmup_rounds:]) // 2] for name, times in samples.items()}
    benchmark.extra_info.update(
        provider="interleaved rounds", device=device_name(dev), torch=torch.__version__, rounds=rounds,
        interleaved={name: {"median_s": medians[name], "baseline": name == baseline} for name in names}, **extra)
    return medians
