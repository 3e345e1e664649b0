"""Whole ResNet-50 training step, images/s: convert(mode="train") vs torchvision, same run.

GPU: batch 256 at 224 px, bf16 autocast, channels_last, SGD with momentum.
Providers:
  torchvision_compile  torch.compile of torchvision's resnet50 (the baseline)
  fastresnet_compile   the converted model, each block's path chosen by one eager step
                       (tune_dispatch), then torch.compile(fullgraph=False: the stem and the
                       head are ordinary layers)
  torchvision_eager, fastresnet_eager  the same without compile
Compiling ResNet-50's training step takes about a minute per provider; this file is
its own stage of bench/gpu_check.sh for that reason. On the CPU only the eager
providers run, tiny (compile skipped: too slow here).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import harness
from fastresnet import convert
from fastresnet.nn import tune_dispatch
from fastresnet.nn.blocks import chosen_paths
from fastresnet.testing import assert_close

# The eager pair first: cheap (no compile), so a stage cut short by its time limit still has them.
PROVIDERS = ["torchvision_eager", "fastresnet_eager", "torchvision_compile", "fastresnet_compile"]


def _inputs(dev):
    s = harness.sizes()
    side = s.image_size if dev.type == "cuda" else 32
    x = torch.randn(s.batch, 3, side, side, device=dev).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 1000, (s.batch,), device=dev)


def _loss(model, x, target):
    with harness.autocast(x.device):
        return torch.nn.functional.cross_entropy(model(x), target)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_resnet50_train_step(benchmark, provider, monkeypatch):
    dev = harness.device()
    compiled = provider.endswith("_compile")
    if dev.type == "cpu":
        if compiled:
            pytest.skip("torch.compile of a ResNet-50 training step takes minutes on this CPU")
        monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1")  # what a CPU runs
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().to(dev, memory_format=torch.channels_last).train()
    x, target = _inputs(dev)
    model = reference
    if provider.startswith("fastresnet"):
        model = convert(copy.deepcopy(reference), mode="train")
        with harness.autocast(dev):
            tune_dispatch(model, x)  # measure every block's paths before compile (which cannot)
        # correctness: the first step's loss equals torchvision's within bf16 tolerance
        tol = 5e-2 if dev.type == "cuda" else 1e-4
        expected = _loss(copy.deepcopy(reference), x, target)
        assert_close(_loss(copy.deepcopy(model), x, target).float(), expected.float(), atol=tol, rtol=tol,
                     name="first-step loss")
    if compiled:
        model = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(model, x, target)
        loss.backward()
        optimizer.step()
        return loss

    step()  # compile outside the timed rounds
    peak = None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
    paths = chosen_paths() if provider.startswith("fastresnet") else []
    harness.run(
        benchmark, step, dev=dev, group="resnet50 train step", provider=provider,
        baseline=provider == "torchvision_compile", images=x.shape[0], peak_memory_bytes=peak,
        paths=",".join(paths) or "-",
    )
