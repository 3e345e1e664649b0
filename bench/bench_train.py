"""Training images/s: fastresnet's full training stack against torchvision + torch.compile.

GPU: ResNet-50, batch 256 at 224x224, bf16 autocast, channels_last, synthetic data already on the
device (compute only). Providers, in one run on one device:
  fastresnet     fastresnet.training's prepare_model (channels_last, fused blocks, torch.compile)
                 + fused SGD + the Trainer's step function. fused_blocks="auto" times fused +
                 compiled against plain + compiled (two compiles, cached on disk) and keeps the
                 faster. In FASTRESNET_BENCH_SHORT mode (bench/gpu_check.sh) the fused blocks are
                 forced on instead, so every provider costs one ResNet-50 compile: auto's other
                 candidate, plain + compile, is what the torch.compile row measures, so auto's
                 figure is max(this row, ~1.0x) and the row answers whether the fused blocks win.
  torch.compile  torchvision's resnet50, channels_last, torch.compile (default mode), foreach SGD
                 (the baseline the ratio is taken against)
  eager          torchvision's resnet50, channels_last, no compile
CPU: a tiny ResNet-20 at 32x32 (torchvision has no CIFAR nets: fastresnet's plain module stands in
for the eager baseline); torch.compile providers are skipped there (minutes of compilation).
The first warm-up round holds the compilation; compilation is outside the timed median.
"""

import pytest
import torch
import torchvision

import harness
from fastresnet.data import DataConfig
from fastresnet.flops import count_macs
from fastresnet.models import get_model
from fastresnet.training import TrainConfig
from fastresnet.training.loop import make_train_step
from fastresnet.training.model import amp_dtype, build_optimizer, prepare_model

# eager first: cheap, so a stage cut short by its time limit still has a same-process reference.
PROVIDERS = ["eager", "fastresnet", "torch.compile"]


def _setting(dev):
    s = harness.sizes()
    if dev.type == "cuda":
        return "resnet50", s.batch, s.image_size, 1000
    return "resnet20", s.cifar_batch, 32, 10


def _baseline_model(name, dev):
    if dev.type == "cuda":
        model = getattr(torchvision.models, name)(weights=None)
    else:
        model = get_model(name)
    return model.to(dev, memory_format=torch.channels_last)


def _check_same_network(name, dev):
    """Correctness first: with torchvision's weights loaded, fastresnet's net computes the same logits."""
    ours = get_model(name).to(dev).eval()
    reference = _baseline_model(name, dev).eval()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, *(2 * (224 if dev.type == "cuda" else 32,)), device=dev)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 to compare
        torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_images_per_second(benchmark, provider):
    dev = harness.device()
    name, batch, side, classes = _setting(dev)
    if provider == "torch.compile" and dev.type != "cuda":
        pytest.skip("torch.compile of a training step takes minutes on this CPU")
    if provider == "fastresnet":
        _check_same_network(name, dev)

    fused = "on" if harness.short() and dev.type == "cuda" else "auto"  # short: one compile per provider
    cfg = TrainConfig(model=name, data=DataConfig(backend="synthetic", batch_size=batch),
                      compile="auto", amp="auto", channels_last=True, fused_blocks=fused)
    criterion = torch.nn.CrossEntropyLoss()
    amp = amp_dtype(cfg, dev, side)
    if provider == "fastresnet":
        prepared = prepare_model(get_model(name, num_classes=classes), cfg, dev, side)
        optimizer = build_optimizer(prepared.module, cfg, dev, lr=0.1)
        runner = prepared.runner
        extra = {"fused_blocks": prepared.fused_blocks, "paths": _block_paths(prepared.module)}
    else:
        extra = {}
        model = _baseline_model(name, dev).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        runner = torch.compile(model) if provider == "torch.compile" else model
    step = make_train_step(runner, criterion, optimizer, amp, None)

    generator = torch.Generator(device=dev).manual_seed(0)
    images = torch.randn(batch, 3, side, side, device=dev, generator=generator).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch,), device=dev, generator=generator)
    flops = 3 * 2 * count_macs(get_model(name, num_classes=classes), (3, side, side)) * batch

    harness.run(benchmark, lambda: step(images, labels)[0], dev=dev, group=f"{name} training step",
                provider=provider, baseline=provider == ("torch.compile" if dev.type == "cuda" else "eager"),
                images=batch, flops=flops, **extra)


def _block_paths(model: torch.nn.Module) -> str:
    """The fused blocks' chosen paths (fastresnet.nn.blocks), for the report; "-" for a plain model."""
    from fastresnet.nn.blocks import FusedBasicBlock, FusedBottleneck, chosen_paths

    fused = any(isinstance(m, (FusedBasicBlock, FusedBottleneck)) for m in model.modules())
    return ",".join(chosen_paths()) if fused else "-"
