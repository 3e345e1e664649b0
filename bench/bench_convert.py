"""Whole-model inference images/s: ResNet-50 converted by fastresnet vs torchvision eager vs torch.compile.

GPU: batch 256 at 224x224, bf16 weights and inputs, channels_last,
torch.inference_mode. Providers:

  torchvision     torchvision's resnet50 in eager mode (the baseline);
  fastresnet      the same model after fastresnet.convert(mode="inference"):
                  fused conv-BN(-add)-ReLU per conv, per-shape dispatch;
  torch_compile   torch.compile(torchvision model, mode="max-autotune"), or
                  mode="default" when FASTRESNET_BENCH_SHORT=1 (max-autotune
                  compiles for many minutes); FASTRESNET_BENCH_COMPILE_MODE
                  overrides. The mode used is in extra_info["compile_mode"];
  fastresnet_compile  torch.compile (same mode) of the converted model: one
                  graph in which each fused conv is the opaque custom op
                  fastresnet::conv_bn_act (the fold and the choice traced before it);
                  under max-autotune CUDA graphs also remove the per-op host
                  time of the eager converted model.

CPU: batch 2 at 64x64 in fp32, the fused blocks on their eager reference path
(a ResNet-50 through Triton's interpreter takes minutes); torch.compile is
skipped, with and without conversion (its compile time alone exceeds this
file's CPU budget).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torchvision

import fastresnet
import harness
from fastresnet.ops import tuning

PROVIDERS = ["torchvision", "fastresnet", "torch_compile", "fastresnet_compile"]


def compile_mode() -> str:
    default = "default" if os.environ.get("FASTRESNET_BENCH_SHORT", "0") == "1" else "max-autotune"
    return os.environ.get("FASTRESNET_BENCH_COMPILE_MODE", default)


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def resnet50():
    dev = harness.device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = _randomize_bn(torchvision.models.resnet50()).eval()
    model = model.to(dev, dtype).to(memory_format=torch.channels_last)
    s = harness.sizes()
    x = torch.randn(s.batch, 3, s.image_size, s.image_size, device=dev, dtype=dtype)
    return model, x.contiguous(memory_format=torch.channels_last)


def _build(provider, model, dev):
    if provider == "torchvision":
        return model
    if provider == "fastresnet":
        return fastresnet.convert(copy.deepcopy(model))
    if dev.type != "cuda":
        pytest.skip("torch.compile of ResNet-50 takes minutes on this CPU (GPU only)")
    if provider == "fastresnet_compile":
        return torch.compile(fastresnet.convert(copy.deepcopy(model)), mode=compile_mode())
    return torch.compile(model, mode=compile_mode())


@pytest.mark.parametrize("provider", PROVIDERS)
def test_resnet50_inference(benchmark, resnet50, provider, monkeypatch):
    dev = harness.device()
    if dev.type == "cpu":
        monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1")
    model, x = resnet50
    net = _build(provider, model, dev)

    def forward():
        with torch.inference_mode():
            return net(x)

    with torch.inference_mode():  # correctness first (this also compiles / measures the dispatch)
        expected, got = model(x).float(), forward().float()
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert error < (5e-2 if dev.type == "cuda" else 1e-4), f"{provider}: relative error {error:.3e}"

    extra = dict(images=x.shape[0], dtype=str(x.dtype), relative_error=error)
    if provider in ("torch_compile", "fastresnet_compile"):
        extra["compile_mode"] = compile_mode()
    if provider == "fastresnet":
        report = net.fastresnet_report
        extra.update(replaced=len(report.replaced), left=len(report.left))
        extra["dispatch"] = {d["key"]: d["choice"] for d in tuning.decisions()}
    harness.run(
        benchmark, forward, dev=dev, group="resnet50 inference", provider=provider,
        baseline=provider == "torchvision", **extra,
    )
