"""CIFAR ResNet-20 / ResNet-56 training speed: the paper's recipe run plainly vs fastresnet's speed stack.

Both providers train with the paper's CIFAR recipe (batch 128, SGD lr 0.1,
momentum 0.9, weight decay 1e-4) through the training program's own model
preparation (`fastresnet.training.model.prepare_model`) and optimizer:

    paper       fp32, NCHW, eager, plain blocks, foreach SGD (torch's default)
    fastresnet  bf16 autocast, channels_last, torch.compile, fused blocks, fused SGD
                (FASTRESNET_BENCH_COMPILE_MODE=reduce-overhead adds CUDA graphs)

Data is resident on the GPU for both: synthetic CIFAR-sized batches, or, with
FASTRESNET_CIFAR10=/path/to/cifar-10-batches-py, the real set (cifar10 back
end), where `test_time_to_accuracy` also trains until the test accuracy
reaches FASTRESNET_BENCH_TARGET (%, default 80) or FASTRESNET_BENCH_MAX_EPOCHS
(default 10) pass. Epoch time = measured step time x 390 steps (50k images at
batch 128, last partial batch dropped). GPU only: skipped on a CPU. About a
minute in total on an H100, most of it torch.compile.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

import harness
from fastresnet.data import DataConfig, build_loaders
from fastresnet.flops import count_macs
from fastresnet.training import TrainConfig, evaluate_model
from fastresnet.training.model import amp_dtype, build_model, build_optimizer, prepare_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: CIFAR training speed")

MODELS = ["resnet20", "resnet56"]
PROVIDERS = ["paper", "fastresnet"]
BATCH = 128  # the paper's CIFAR mini-batch
STEPS_PER_EPOCH = 50_000 // BATCH  # 390
STEPS_PER_CALL = 20  # one timed call trains this many steps (a single CIFAR step is ~ms)


def train_config(model: str, provider: str) -> TrainConfig:
    root = os.environ.get("FASTRESNET_CIFAR10")
    data = (DataConfig(backend="cifar10", root=root, batch_size=BATCH, val_batch_size=1000) if root else
            DataConfig(backend="synthetic", image_size=32, num_classes=10, batch_size=BATCH,
                       synthetic_steps=STEPS_PER_CALL, synthetic_val_steps=1))
    common = dict(model=model, data=data, lr=0.1, momentum=0.9, weight_decay=1e-4, device="cuda")
    if provider == "paper":
        return TrainConfig(**common, amp="off", channels_last=False, compile="off", fused_blocks="off",
                           optimizer_impl="foreach")
    mode = os.environ.get("FASTRESNET_BENCH_COMPILE_MODE", "default")
    return TrainConfig(**common, amp="bf16", channels_last=True, compile=mode, fused_blocks="on",
                       optimizer_impl="fused")


class Program:
    """The pieces of the training program's step, built as `python -m fastresnet.train` builds them."""

    def __init__(self, cfg: TrainConfig):
        self.device = torch.device("cuda")
        torch.manual_seed(0)
        torch.backends.cudnn.benchmark = True
        self.data = build_loaders(cfg.data, device=self.device)
        model = build_model(cfg, self.data.num_classes)
        self.macs = count_macs(model, (3, 32, 32))
        self.prepared = prepare_model(model, cfg, self.device, 32)
        self.optimizer = build_optimizer(self.prepared.module, cfg, self.device, cfg.lr)
        self.amp = amp_dtype(cfg, self.device, 32)
        self.channels_last = cfg.channels_last
        self.epoch = 0

    def step(self, images, labels) -> torch.Tensor:
        if not self.channels_last:
            images = images.contiguous()
        with torch.autocast("cuda", dtype=self.amp, enabled=self.amp is not None):
            loss = torch.nn.functional.cross_entropy(self.prepared.runner(images), labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def steps(self, count: int) -> torch.Tensor:
        """`count` steps from the training loader, starting new epochs as needed."""
        done, loss = 0, None
        while done < count:
            self.data.train.set_epoch(self.epoch)
            for images, labels in self.data.train:
                loss = self.step(images, labels)
                done += 1
                if done == count:
                    return loss
            self.epoch += 1
        return loss


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model", MODELS)
def test_epoch_time(benchmark, model, provider):
    program = Program(train_config(model, provider))
    first = program.steps(1)  # compile (fastresnet) and cuDNN autotuning happen here, untimed
    assert torch.isfinite(first).item(), f"{model} {provider}: non-finite loss on the first step"
    result = harness.run(
        benchmark, lambda: program.steps(STEPS_PER_CALL), dev=program.device, group=f"{model} CIFAR train steps",
        provider=provider, baseline=provider == "paper", images=STEPS_PER_CALL * BATCH,
        flops=6 * program.macs * STEPS_PER_CALL * BATCH, fused_blocks=program.prepared.fused_blocks,
        compile=program.prepared.compile_mode,
        data="cifar10" if os.environ.get("FASTRESNET_CIFAR10") else "synthetic",
    )
    seconds_per_step = benchmark.stats.stats.median / STEPS_PER_CALL
    benchmark.extra_info["epoch_seconds"] = seconds_per_step * STEPS_PER_EPOCH
    assert torch.isfinite(result).item()


@pytest.mark.skipif(not os.environ.get("FASTRESNET_CIFAR10"), reason="set FASTRESNET_CIFAR10 to a CIFAR-10 folder")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model", MODELS)
def test_time_to_accuracy(benchmark, model, provider):
    target = float(os.environ.get("FASTRESNET_BENCH_TARGET", "80"))
    max_epochs = int(os.environ.get("FASTRESNET_BENCH_MAX_EPOCHS", "10"))
    program = Program(train_config(model, provider))
    history = []

    def train_to_target():
        start = time.perf_counter()
        for epoch in range(max_epochs):
            program.data.train.set_epoch(epoch)
            program.prepared.module.train()
            for images, labels in program.data.train:
                program.step(images, labels)
            top1 = evaluate_model(program.prepared.module, program.data.val, program.device, program.amp,
                                  program.channels_last)["top1"]
            history.append((epoch + 1, time.perf_counter() - start, top1))
            if top1 >= target:
                break

    # One long call, so pytest-benchmark directly (harness.run repeats its call); compile time counts.
    benchmark.group = f"{model} CIFAR-10 time to {target:g}% test accuracy"
    benchmark.extra_info.update(provider=provider, baseline=provider == "paper", target=target,
                                device=harness.device_name(program.device))
    benchmark.pedantic(train_to_target, rounds=1, iterations=1)
    benchmark.extra_info.update(reached=history[-1][2] >= target, epochs=history[-1][0], seconds=history[-1][1],
                                history=history)
