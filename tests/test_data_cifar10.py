"""cifar10 back end on a tiny fake cifar-10-batches-py folder in the real pickle format."""

import pickle

import numpy as np
import pytest
import torch
from data_helpers import CIFAR_PER_BATCH as PER_BATCH
from data_helpers import write_fake_cifar

from fastresnet.data import DataConfig, build_loaders
from fastresnet.data.cifar10 import load_cifar10

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_fake_cifar(tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py")


def centre_pixel(images, mean):
    """The raw uint8 RGB of each image's centre pixel (never padding: crops move by at most 4)."""
    return ((images[:, :, 16, 16].float() + mean[16, 16].to(images.device)) * 255).round().long()


def read_back_labels(images, mean):
    return (centre_pixel(images, mean)[:, 1] - 15) // 20


def image_ids(images, mean):
    """(batch file, position) of each image, from the red and blue planes."""
    rgb = centre_pixel(images, mean)
    return {(b // 40, r // 12) for r, b in zip(rgb[:, 0].tolist(), rgb[:, 2].tolist(), strict=True)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cifar_batches_shape_dtype_layout_and_labels(cifar_root, dtype):
    data = build_loaders(DataConfig(root=str(cifar_root), batch_size=16, dtype=dtype), device=CPU)
    assert (data.backend, data.num_classes, data.image_size) == ("cifar10", 10, 32)
    (train_images, _), _ = load_cifar10(cifar_root, "full")
    mean = train_images.float().mean(0) / 255
    batches = list(data.train)
    assert len(batches) == len(data.train) == 100 // 16 and data.train.num_samples == 96
    for images, labels in batches:
        assert images.shape == (16, 3, 32, 32) and images.dtype == getattr(torch, dtype)
        assert images.is_contiguous(memory_format=torch.channels_last) and labels.dtype == torch.int64
        assert torch.equal(read_back_labels(images, mean), labels)
    val = list(data.val)
    assert sum(len(y) for _, y in val) == data.val.num_samples == PER_BATCH


def test_cifar_train_crops_pad_with_zero_after_mean_subtraction_and_flip(cifar_root):
    data = build_loaders(DataConfig(root=str(cifar_root), batch_size=100), device=CPU, seed=0)
    images, _ = next(iter(data.train))
    border_zero = (images[:, :, 0, :] == 0).all(dim=(1, 2)) | (images[:, :, -1, :] == 0).all(dim=(1, 2))
    assert 0 < border_zero.sum() < 100  # some crops moved vertically, some did not
    val_images, _ = next(iter(data.val))
    assert not ((val_images[:, :, 0, :] == 0).all(dim=(1, 2))).any()  # val is never padded


def test_cifar_augmentation_matches_a_per_image_reference(cifar_root):
    """Pad 4 / random crop / flip, checked against a slow per-image version with the same offsets."""
    from fastresnet.data.augment import pad_crop_flip

    torch.manual_seed(0)
    images = torch.randn(6, 32, 32, 3)
    out = pad_crop_flip(images, pad=4, generator=torch.Generator().manual_seed(7))
    padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2), (4, 4, 4, 4)).permute(0, 2, 3, 1)
    for i in range(6):
        found = False
        for dy in range(9):
            for dx in range(9):
                crop = padded[i, dy : dy + 32, dx : dx + 32]
                found |= torch.equal(out[i], crop) or torch.equal(out[i], crop.flip(1))
        assert found, f"image {i} is not a pad-4 crop (or its flip) of its input"


def test_cifar_is_deterministic_with_a_seed_and_epoch(cifar_root):
    def epoch(seed, e):
        loader = build_loaders(DataConfig(root=str(cifar_root), batch_size=10), device=CPU, seed=seed).train
        loader.set_epoch(e)
        return torch.cat([x for x, _ in loader])

    assert torch.equal(epoch(1, 2), epoch(1, 2))
    assert not torch.equal(epoch(1, 2), epoch(1, 3))


def test_cifar_45k5k_split_holds_out_the_last_tenth_of_the_training_batches(cifar_root):
    (train, _), (val, val_labels) = load_cifar10(cifar_root, "45k5k")
    assert len(train) == 90 and len(val) == 10
    assert (val[:, 0, 0, 2] == 4 * 40).all()  # the last 10 images of data_batch_5 (index 4)
    data = build_loaders(DataConfig(root=str(cifar_root), cifar_split="45k5k", batch_size=8), device=CPU)
    assert data.val.num_samples == 10 and data.train.num_samples == 88


def test_cifar_shards_are_disjoint(cifar_root):
    (train_images, _), _ = load_cifar10(cifar_root, "full")
    mean = train_images.float().mean(0) / 255
    seen_train, seen_val = [], []
    for rank in range(3):
        data = build_loaders(DataConfig(root=str(cifar_root), batch_size=5), device=CPU, rank=rank, world_size=3)
        assert data.train.num_samples == 30 and len(data.train) == 6
        seen_train.append(set().union(*(image_ids(x, mean) for x, _ in data.train)))
        seen_val.append(set().union(*(image_ids(x, mean) for x, _ in data.val)))
    assert [len(s) for s in seen_train] == [30, 30, 30] and len(set.union(*seen_train)) == 90
    assert sum(len(s) for s in seen_val) == PER_BATCH and len(set.union(*seen_val)) == PER_BATCH


@pytest.mark.parametrize("problem", ["missing_dir", "missing_batch", "not_a_pickle", "wrong_shape"])
def test_cifar_bad_folders_name_the_problem(tmp_path, problem):
    root = write_fake_cifar(tmp_path / "c", per_batch=4)
    if problem == "missing_dir":
        root = tmp_path / "nowhere"
    elif problem == "missing_batch":
        (root / "data_batch_3").unlink()
    elif problem == "not_a_pickle":
        (root / "data_batch_2").write_bytes(b"not a pickle at all")
    else:
        with (root / "test_batch").open("wb") as file:
            pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, file)
    with pytest.raises((FileNotFoundError, ValueError), match=str(root.name)):
        build_loaders(DataConfig(backend="cifar10", root=str(root)), device=CPU)


def test_verify_checks_a_cifar_folder(cifar_root, tmp_path, capsys):
    from fastresnet.data.__main__ import main as data_cli

    assert data_cli(["verify", str(cifar_root)]) == 0
    assert "checked 120 images: 0 error(s)" in capsys.readouterr().out
    broken = write_fake_cifar(tmp_path / "broken", per_batch=4)
    (broken / "data_batch_4").write_bytes(b"junk")
    assert data_cli(["verify", str(broken)]) == 1
    assert "data_batch_4" in capsys.readouterr().out
