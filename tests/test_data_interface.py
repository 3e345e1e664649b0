"""The Loader contract, checked on the back ends that need no files: digits and synthetic."""

import pytest
import torch

from fastresnet.data import DataConfig, build_loaders, resolve_backend
from fastresnet.data.digits import TRAIN_SIZE, digits_split
from fastresnet.data.loader import Shard

CPU = torch.device("cpu")


def epoch_batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


def check_batch(images, labels, *, batch, size, dtype=torch.float32, crops=1):
    assert images.shape == (batch * crops, 3, size, size)
    assert images.dtype == dtype
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.shape == (batch,) and labels.dtype == torch.int64
    assert torch.isfinite(images.float()).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_digits_batches_have_the_contract_shape_dtype_and_layout(dtype):
    data = build_loaders(DataConfig(batch_size=64, dtype=dtype), device=CPU)
    assert (data.backend, data.num_classes, data.image_size) == ("digits", 10, 32)
    batches = epoch_batches(data.train)
    assert len(batches) == len(data.train) == TRAIN_SIZE // 64
    assert data.train.num_samples == len(batches) * 64
    for images, labels in batches:
        check_batch(images, labels, batch=64, size=32, dtype=getattr(torch, dtype))
    val = epoch_batches(data.val)
    assert sum(len(labels) for _, labels in val) == data.val.num_samples == 1797 - TRAIN_SIZE
    assert len(val) == len(data.val) == -(-297 // 64)


def test_digits_images_carry_their_own_labels():
    data = build_loaders(DataConfig(batch_size=100), device=CPU)
    (train_images, train_labels), _ = digits_split()
    reference = ((train_images - train_images.mean()) / train_images.std()).flatten(1)
    for images, labels in epoch_batches(data.train)[:3]:
        nearest = torch.cdist(images.flatten(1), reference).argmin(1)
        assert torch.equal(train_labels[nearest], labels)


def test_digits_shuffle_is_deterministic_per_epoch_and_changes_between_epochs():
    first = build_loaders(DataConfig(batch_size=50), device=CPU, seed=3).train
    second = build_loaders(DataConfig(batch_size=50), device=CPU, seed=3).train
    labels = lambda loader, epoch: torch.cat([y for _, y in epoch_batches(loader, epoch)])  # noqa: E731
    assert torch.equal(labels(first, 1), labels(second, 1))
    assert not torch.equal(labels(first, 1), labels(first, 2))


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_are_disjoint_and_cover_the_data(world_size):
    for train in (True, False):
        shards = [
            Shard(rank, world_size, seed=5).indices(101, epoch=4, shuffle=train, even=train)
            for rank in range(world_size)
        ]
        joined = torch.cat(shards)
        assert len(joined.unique()) == len(joined)
        assert len(joined) == (101 - 101 % world_size if train else 101)
        if train:
            assert {len(s) for s in shards} == {101 // world_size}


def test_digits_ranks_see_disjoint_images():
    ranks = [build_loaders(DataConfig(batch_size=30), device=CPU, rank=r, world_size=2, seed=1) for r in range(2)]
    seen = [torch.cat([x.flatten(1) for x, _ in epoch_batches(d.train)]) for d in ranks]
    assert len(ranks[0].train) == len(ranks[1].train) == (TRAIN_SIZE // 2) // 30
    assert torch.cdist(seen[0], seen[1]).min() > 0  # no image on both ranks (no two digits are identical here)


def test_synthetic_gives_fixed_random_batches_on_the_device():
    cfg = DataConfig(
        backend="synthetic", batch_size=4, image_size=40, num_classes=7, synthetic_steps=5, dtype="bfloat16"
    )
    data = build_loaders(cfg, device=CPU)
    batches = epoch_batches(data.train)
    assert len(batches) == len(data.train) == 5 and data.train.num_samples == 20
    for images, labels in batches:
        check_batch(images, labels, batch=4, size=40, dtype=torch.bfloat16)
        assert labels.max() < 7 and images.float().std() > 0.5
    assert len(epoch_batches(data.val)) == cfg.synthetic_val_steps


def test_auto_picks_digits_without_a_root_and_torchvision_for_a_folder_on_the_cpu(tmp_path):
    assert resolve_backend(DataConfig(), CPU) == "digits"
    assert resolve_backend(DataConfig(root=str(tmp_path)), CPU) == "torchvision"
    (tmp_path / "data_batch_1").write_bytes(b"")
    assert resolve_backend(DataConfig(root=str(tmp_path)), CPU) == "cifar10"


@pytest.mark.parametrize(
    "field, value",
    [("backend", "nope"), ("recipe", "x"), ("bad_files", "ignore"), ("dtype", "int8"), ("batch_size", 0)],
)
def test_config_rejects_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        DataConfig(**{field: value})


def test_file_back_ends_need_a_root():
    with pytest.raises(ValueError, match="root"):
        build_loaders(DataConfig(backend="torchvision"), device=CPU)


def test_the_package_and_every_other_back_end_work_without_dali(tmp_path):
    """DALI is optional: hide it and import fastresnet.data afresh in a clean interpreter."""
    import subprocess
    import sys

    script = f"""
import sys
sys.modules["nvidia.dali"] = None  # makes `import nvidia.dali` fail as if it were not installed
import torch
from fastresnet.data import DataConfig, build_loaders, dali_available, resolve_backend
assert not dali_available()
assert resolve_backend(DataConfig(root={str(tmp_path)!r}), torch.device("cuda")) == "nvjpeg"
assert build_loaders(DataConfig(batch_size=8), device=torch.device("cpu")).backend == "digits"
try:
    build_loaders(DataConfig(backend="dali", root={str(tmp_path)!r}), device=torch.device("cpu"))
except ImportError as error:
    assert "nvidia-dali" in str(error), error
else:
    raise AssertionError("the dali back end built without DALI")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
