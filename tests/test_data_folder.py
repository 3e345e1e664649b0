"""ImageFolder back ends end to end on a small tinted fake ImageNet, on the CPU."""

import pytest
import torch
from data_helpers import CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, dominant_class, fake_imagenet_root

from fastresnet.data import DataConfig, build_loaders, dali_available

CPU = torch.device("cpu")
# On the CPU: torchvision's workers; the nvJPEG code path with torchvision's CPU decoder;
# DALI's pipeline CPU-only (device_id=None), where DALI is installed.
BACKENDS = ["torchvision", "nvjpeg"] + (["dali"] if dali_available() else [])


def config(backend, **overrides):
    fields = dict(backend=backend, root=str(fake_imagenet_root()), batch_size=4, image_size=64, workers=0)
    return DataConfig(**(fields | overrides))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recipe", ["rrc", "paper-scale"])
def test_train_batches_shape_dtype_layout_and_labels(backend, recipe):
    data = build_loaders(config(backend, recipe=recipe, dtype="bfloat16"), device=CPU, seed=1)
    assert (data.backend, data.num_classes, data.image_size) == (backend, CLASSES, 64)
    batches = list(data.train)
    assert len(batches) == len(data.train) == (CLASSES * TRAIN_PER_CLASS) // 4
    assert data.train.num_samples == 16
    for images, labels in batches:
        assert images.shape == (4, 3, 64, 64) and images.dtype == torch.bfloat16
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64
        assert torch.equal(dominant_class(images), labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ten_crop", [False, True])
def test_val_centre_and_ten_crop(backend, ten_crop):
    data = build_loaders(config(backend, ten_crop=ten_crop, val_batch_size=4), device=CPU)
    crops = 10 if ten_crop else 1
    assert data.val.crops == crops
    batches = list(data.val)
    assert [len(y) for _, y in batches] == [4, 2]  # val keeps the partial last batch
    for images, labels in batches:
        assert images.shape == (len(labels) * crops, 3, 64, 64) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(dominant_class(images), labels.repeat_interleave(crops))
    if ten_crop:
        first = batches[0][0][:10]
        assert torch.equal(first[5:], first[:5].flip(3))  # the last five are the first five flipped


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_batches_other_epoch_other_batches(backend):
    def epoch(seed, number):
        loader = build_loaders(config(backend), device=CPU, seed=seed).train
        loader.set_epoch(number)
        return torch.cat([x for x, _ in loader])

    assert torch.equal(epoch(3, 1), epoch(3, 1))
    assert not torch.equal(epoch(3, 1), epoch(3, 2))


def test_the_two_back_ends_crop_the_same_boxes():
    """Same seed: the same boxes and flips, decoded and resized by different code (Pillow vs torch)."""
    a = next(iter(build_loaders(config("torchvision"), device=CPU, seed=2).train))[0]
    b = next(iter(build_loaders(config("nvjpeg"), device=CPU, seed=2).train))[0]
    assert (a - b).abs().mean() < 0.15  # normalised units: the same crops, up to resampling differences


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_get_disjoint_shards(backend):
    def val_images(rank, world_size):
        data = build_loaders(config(backend), device=CPU, rank=rank, world_size=world_size)
        assert len(data.train) == (CLASSES * TRAIN_PER_CLASS // world_size) // 4
        return [image for images, _ in data.val for image in images]

    everything = val_images(0, 1)
    shards = [val_images(rank, 2) for rank in range(2)]
    assert len(shards[0]) + len(shards[1]) == len(everything) == CLASSES * VAL_PER_CLASS
    for image in shards[0]:
        assert not any(torch.equal(image, other) for other in shards[1])
    for image in shards[0] + shards[1]:
        assert sum(torch.equal(image, other) for other in everything) == 1


def test_workers_give_the_same_batches_as_the_main_process():
    serial = torch.cat([x for x, _ in build_loaders(config("torchvision"), device=CPU, seed=4).train])
    parallel = torch.cat([x for x, _ in build_loaders(config("torchvision", workers=2), device=CPU, seed=4).train])
    assert torch.equal(serial, parallel)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_lighting_shifts_each_image_by_one_colour(backend):
    """PCA lighting adds one RGB offset per image (the crops and flips stay the same)."""

    def first_batch(std):
        cfg = config(backend, recipe="paper-scale", lighting_std=std)
        return next(iter(build_loaders(cfg, device=CPU, seed=5).train))[0]

    shift = first_batch(0.1) - first_batch(0.0)
    per_channel = shift.mean(dim=(2, 3), keepdim=True)
    assert (shift - per_channel).abs().max() < 1e-4
    assert per_channel.abs().max() > 1e-3 and per_channel.abs().max() < 0.5


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (the dali extra)")
@pytest.mark.parametrize("ten_crop", [False, True])
def test_dali_evaluation_views_are_torchvisions(tmp_path, ten_crop):
    """The same boxes, cut in the image's own pixels and resized: accuracy measured through DALI is
    the accuracy torchvision reports (resizing first and cropping after was 0.15 off at 64 pixels)."""
    from fastresnet.data.fake_imagenet import make_fake_imagenet

    root = make_fake_imagenet(tmp_path / "photos", classes=2, images_per_class=1, val_images_per_class=3)
    views = {backend: torch.cat([x for x, _ in build_loaders(
        DataConfig(backend=backend, root=str(root), image_size=64, batch_size=2, val_batch_size=4, workers=0,
                   ten_crop=ten_crop), device=CPU, seed=0).val]) for backend in ("torchvision", "dali")}
    difference = (views["dali"] - views["torchvision"]).abs().mean(dim=(1, 2, 3))
    assert len(difference) == 6 * (10 if ten_crop else 1)
    assert difference.mean() < 0.01 and difference.max() < 0.05, difference
