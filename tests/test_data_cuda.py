"""The data back ends on a GPU: nvJPEG decoding, DALI's mixed pipeline (where DALI is installed),
and the device-resident sets. Run by bench/gpu_check.sh; skipped without CUDA."""

import pytest
import torch
from data_helpers import (
    BAD_FILES,
    CLASSES,
    TRAIN_PER_CLASS,
    add_bad_file,
    dominant_class,
    fake_imagenet_root,
    small_folder,
    write_fake_cifar,
)

from fastresnet.data import DataConfig, build_loaders, dali_available, resolve_backend
from fastresnet.data.folder import BadImageError

pytestmark = pytest.mark.cuda
GPU_BACKENDS = [
    "nvjpeg",
    pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="DALI not installed")),
]


def cuda():
    return torch.device("cuda", torch.cuda.current_device())


def check_on_gpu(images, labels, *, batch, size, dtype, crops=1):
    assert images.device.type == "cuda" and labels.device.type == "cuda"
    assert images.shape == (batch * crops, 3, size, size) and images.dtype == dtype
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and labels.shape == (batch,)
    assert torch.equal(dominant_class(images), labels.repeat_interleave(crops))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("recipe, dtype", [("rrc", "float16"), ("paper-scale", "bfloat16"), ("rrc", "float32")])
def test_gpu_train_pipeline(backend, recipe, dtype):
    cfg = DataConfig(
        backend=backend, root=str(fake_imagenet_root()), batch_size=4, recipe=recipe, dtype=dtype, workers=2
    )
    data = build_loaders(cfg, device=cuda(), seed=0)
    batches = list(data.train)
    assert len(batches) == len(data.train) == CLASSES * TRAIN_PER_CLASS // 4
    for images, labels in batches:
        check_on_gpu(images, labels, batch=4, size=224, dtype=getattr(torch, dtype))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("ten_crop", [False, True])
def test_gpu_val_pipeline(backend, ten_crop):
    cfg = DataConfig(backend=backend, root=str(fake_imagenet_root()), val_batch_size=4, ten_crop=ten_crop, workers=2)
    data = build_loaders(cfg, device=cuda())
    crops = 10 if ten_crop else 1
    batches = list(data.val)
    assert [len(y) for _, y in batches] == [4, 2]
    for images, labels in batches:
        check_on_gpu(images, labels, batch=len(labels), size=224, dtype=torch.float32, crops=crops)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_gpu_bad_input_policy(tmp_path, backend, kind):
    bad = add_bad_file(small_folder(tmp_path), kind)
    cfg = dict(backend=backend, root=str(tmp_path), batch_size=7, image_size=32, workers=1, drop_last=False)
    if BAD_FILES[kind][1] == "handled":
        images = torch.cat([x for x, _ in build_loaders(DataConfig(**cfg), device=cuda()).train])
        assert images.shape == (7, 3, 32, 32) and torch.isfinite(images).all()
        return
    with pytest.raises((BadImageError, RuntimeError), match=bad.name):
        list(build_loaders(DataConfig(**cfg), device=cuda()).train)
    train = build_loaders(DataConfig(**cfg, bad_files="skip"), device=cuda()).train
    with pytest.warns(UserWarning, match="skipped 1"):
        labels = torch.cat([y for _, y in train])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1] and train.skipped == 1


def test_device_resident_back_ends_live_on_the_gpu(tmp_path):
    root = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    for cfg in (
        DataConfig(backend="cifar10", root=str(root), batch_size=16, dtype="bfloat16"),
        DataConfig(backend="digits", batch_size=64),
        DataConfig(backend="synthetic", batch_size=8, image_size=64, synthetic_steps=3),
    ):
        data = build_loaders(cfg, device=cuda())
        images, labels = next(iter(data.train))
        assert images.device.type == labels.device.type == "cuda", cfg.backend
        assert images.is_contiguous(memory_format=torch.channels_last) and images.dtype == cfg.torch_dtype


def test_auto_picks_a_gpu_decoder():
    expected = "dali" if dali_available() else "nvjpeg"
    assert resolve_backend(DataConfig(root=str(fake_imagenet_root())), cuda()) == expected
