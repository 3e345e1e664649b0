"""Images per second of every data back end on a realistic fake ImageNet, and fed to a training step.

Groups:
- data-train / data-val: one back end's loader alone (decode + augment + copy to the device);
  the baseline is torchvision's CPU workers.
- data-feeds-training: a full training step of ResNet-50 (GPU; a one-conv stand-in on the
  CPU, to stay tiny) fed by each back end ("total img/s") next to the same step on synthetic batches
  already on the device ("compute img/s"). On an H100 the goal is a GPU decoder that keeps
  total img/s at compute img/s (>= 8,000 img/s for the train pipeline alone).
DALI providers skip where DALI is not installed (the GPU machine may have none).
The dataset: unique JPEGs at ImageNet's sizes and qualities, hard-linked into more classes
for a long enough epoch (decoding a link costs what decoding the file costs).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
import torchvision
from harness import autocast, device, run, sizes

from fastresnet.data import DataConfig, build_loaders, dali_available
from fastresnet.data.fake_imagenet import make_fake_imagenet
from fastresnet.data.folder_loader import PREFETCH_FACTOR

STEPS_PER_ROUND = 2 if device().type == "cuda" else 1  # batches pulled per timed call
UNIQUE_CLASSES, UNIQUE_PER_CLASS = 4, 32  # distinct photographs: 128 (GPU) ...
PROVIDERS = ["torchvision", "nvjpeg", "dali"]


def loader_workers() -> int:
    return max(1, (os.cpu_count() or 2) - 2)


def prefetched_batches(provider: str) -> int:
    """Batches the torchvision back end's workers decode before the first timed round: drained
    untimed, so the timed rounds see the sustained decode rate, not a queue filled in advance."""
    return loader_workers() * PREFETCH_FACTOR if provider == "torchvision" else 0


def batches_needed() -> int:
    s = sizes()
    return (s.rounds + s.warmup_rounds + 1) * STEPS_PER_ROUND + prefetched_batches("torchvision")


def drain_prefetch(stream, provider: str) -> None:
    for _ in range(prefetched_batches(provider)):
        next(stream)


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory) -> Path:
    """Enough train and val files for every round to stay inside one epoch."""
    root = tmp_path_factory.mktemp("fake-imagenet")
    per_class = UNIQUE_PER_CLASS if device().type == "cuda" else 4
    make_fake_imagenet(root, classes=UNIQUE_CLASSES, images_per_class=per_class, val_images_per_class=per_class)
    files_needed = batches_needed() * sizes().batch
    for split in ("train", "val"):
        widen(root / split, copies=-(-files_needed // (UNIQUE_CLASSES * per_class)))
    return root


def widen(split_dir: Path, *, copies: int) -> None:
    originals = sorted(p for p in split_dir.iterdir() if p.is_dir())
    for copy in range(1, copies):
        for folder in originals:
            target = split_dir / f"{folder.name}_copy{copy:03d}"
            target.mkdir()
            for path in folder.iterdir():
                os.link(path, target / path.name)


def loader_config(provider: str, root: Path) -> DataConfig:
    if provider == "dali" and not dali_available():
        pytest.skip("DALI is not installed here (pip install nvidia-dali-cuda130)")
    s = sizes()
    workers = loader_workers()
    dtype = "bfloat16" if device().type == "cuda" else "float32"
    return DataConfig(
        backend=provider, root=str(root), batch_size=s.batch, image_size=s.image_size, workers=workers, dtype=dtype
    )


def batch_stream(loader):
    """Batches across epochs (set_epoch each time), for rounds that outlast an epoch."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_loader_throughput(benchmark, fake_imagenet, provider, split):
    dev = device()
    data = build_loaders(loader_config(provider, fake_imagenet), device=dev)
    loader = getattr(data, split)
    stream = batch_stream(loader)
    images, labels = next(stream)
    assert images.device.type == dev.type and images.is_contiguous(memory_format=torch.channels_last)
    assert images.shape[1:] == (3, sizes().image_size, sizes().image_size) and labels.max() < data.num_classes
    drain_prefetch(stream, provider)

    def pull():
        for _ in range(STEPS_PER_ROUND):
            images, _ = next(stream)
        return images

    run(
        benchmark,
        pull,
        dev=dev,
        group=f"data-{split}",
        provider=provider,
        baseline=provider == "torchvision",
        images=STEPS_PER_ROUND * loader.batch_size,
    )


def training_model(dev: torch.device, num_classes: int) -> torch.nn.Module:
    """ResNet-50 on a GPU; on the CPU a one-conv stand-in, so the benchmark stays tiny and
    still runs the whole path (a CPU training step says nothing about a GPU's appetite)."""
    if dev.type == "cuda":
        return torchvision.models.resnet50(num_classes=num_classes)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, num_classes),
    )


def training_step(dev: torch.device, num_classes: int):
    model = training_model(dev, num_classes).to(dev, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(images, labels):
        with autocast(dev):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


@pytest.mark.parametrize("provider", ["synthetic"] + PROVIDERS)
def test_training_fed_by_loader(benchmark, fake_imagenet, provider):
    dev = device()
    if provider == "synthetic":
        s = sizes()
        cfg = DataConfig(
            backend="synthetic",
            batch_size=s.batch,
            image_size=s.image_size,
            num_classes=1000,
            synthetic_steps=batches_needed(),
        )
    else:
        cfg = loader_config(provider, fake_imagenet)
    data = build_loaders(cfg, device=dev)
    stream = batch_stream(data.train)
    step = training_step(dev, data.num_classes)

    def train():
        for _ in range(STEPS_PER_ROUND):
            loss = step(*next(stream))
        return loss

    assert torch.isfinite(train())
    drain_prefetch(stream, provider)
    kind = "compute" if provider == "synthetic" else "total"
    run(
        benchmark,
        train,
        dev=dev,
        group="data-feeds-training",
        provider=provider,
        baseline=provider == "synthetic",
        images=STEPS_PER_ROUND * cfg.batch_size,
        throughput=kind,
    )
