"""fashion-mnist back end on tiny IDX files written here (gzipped and raw), and on the real files if installed.

Every fake image (data_helpers.write_fake_fashion_mnist) is one flat grey, 10 + 8 * id, over its 28x28
pixels, and its label is id % 10: after padding to 32, a 4-pixel shift and a flip, the centre pixel
still reads the image's id back.
"""

import gzip

import pytest
import torch
from data_helpers import FASHION_TEST as TEST
from data_helpers import FASHION_TRAIN as TRAIN
from data_helpers import idx_bytes, write_fake_fashion_mnist, write_idx

from fastresnet.data import DataConfig, build_loaders, resolve_backend
from fastresnet.data import fashion_mnist
from fastresnet.data.augment import pad_crop_flip
from fastresnet.data.build import is_fashion_mnist_folder
from fastresnet.data.fashion_mnist import FILES, load_fashion_mnist, mean_and_std
from fastresnet.data.loader import DatasetError

CPU = torch.device("cpu")
INSTALL = "apt-get install dataset-fashion-mnist"


@pytest.fixture(scope="module")
def fm_root(tmp_path_factory):
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fm") / "fashion-mnist")


def data_loaders(root, **options):
    return build_loaders(DataConfig(backend="fashion-mnist", root=str(root), **options), device=CPU)


def ids_of(images, mean, std):
    """Each image's id, read from its centre pixel (never padding: a crop moves by at most 4 of 16)."""
    raw = (images[:, 0, 16, 16].float() * std + mean) * 255
    return ((raw.round().long() - 10) // 8).tolist()


def train_mean_std(root, split="full"):
    (train, _), _ = load_fashion_mnist(root, split)
    return mean_and_std(train)


def test_gzipped_and_raw_files_read_the_same(fm_root, tmp_path):
    raw_root = write_fake_fashion_mnist(tmp_path / "raw", gz=False)
    assert not list(raw_root.glob("*.gz"))
    gzipped, raw = load_fashion_mnist(fm_root, "full"), load_fashion_mnist(raw_root, "full")
    for (a_images, a_labels), (b_images, b_labels) in zip(gzipped, raw):
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    (train, labels), (test, test_labels) = gzipped
    assert train.shape == (TRAIN, 32, 32, 1) and train.dtype == torch.uint8 and test.shape == (TEST, 32, 32, 1)
    assert torch.equal(labels, torch.arange(TRAIN) % 10) and labels.dtype == torch.int64
    assert (train[:, :2] == 0).all() and (train[:, 30:] == 0).all() and (train[:, :, :2] == 0).all()
    assert torch.equal(train[:, 2:30, 2:30, 0], (10 + 8 * torch.arange(TRAIN)).view(-1, 1, 1).expand(-1, 28, 28).byte())


def test_torchvision_download_folder_and_auto_backend(tmp_path):
    root = tmp_path / "data"
    write_fake_fashion_mnist(root / "FashionMNIST" / "raw")
    assert is_fashion_mnist_folder(root) and not is_fashion_mnist_folder(tmp_path)
    assert resolve_backend(DataConfig(root=str(root)), CPU) == "fashion-mnist"
    assert build_loaders(DataConfig(root=str(root), batch_size=8), device=CPU).backend == "fashion-mnist"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batches_shape_dtype_layout_and_labels(fm_root, dtype):
    data = data_loaders(fm_root, batch_size=8, dtype=dtype)
    assert (data.backend, data.num_classes, data.image_size) == ("fashion-mnist", 10, 32)
    mean, std = train_mean_std(fm_root)
    batches = list(data.train)
    assert len(batches) == 3 and data.train.num_samples == TRAIN
    for images, labels in batches:
        assert images.shape == (8, 3, 32, 32) and images.dtype == getattr(torch, dtype)
        assert images.is_contiguous(memory_format=torch.channels_last) and labels.dtype == torch.int64
        assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
        assert [i % 10 for i in ids_of(images, mean, std)] == labels.tolist()
    assert sorted(i for x, _ in batches for i in ids_of(x, mean, std)) == list(range(TRAIN))
    val = torch.cat([x for x, _ in data.val])
    assert ids_of(val, mean, std) == list(range(TRAIN, TRAIN + TEST))


def test_normalised_with_the_training_splits_own_mean_and_std(fm_root):
    (train, _), (test, _) = load_fashion_mnist(fm_root, "full")
    mean, std = mean_and_std(train)
    pixels = train.double() / 255
    assert mean == pytest.approx(pixels.mean().item(), rel=1e-12)
    assert std == pytest.approx(pixels.std(unbiased=False).item(), rel=1e-12)
    val = torch.cat([x for x, _ in data_loaders(fm_root, batch_size=8).val])  # val: normalised, never augmented
    expected = ((test.float() / 255 - mean) / std).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
    torch.testing.assert_close(val, expected)


def test_train_augmentation_is_a_background_padded_crop_or_its_flip(fm_root):
    """Each training image, un-normalised, is a pad-4 crop (or its flip) of its padded image, padded with 0."""
    data = data_loaders(fm_root, batch_size=TRAIN)
    mean, std = train_mean_std(fm_root)
    (train, _), _ = load_fashion_mnist(fm_root, "full")
    images, _ = next(iter(data.train))
    unit = images[:, 0] * std + mean
    padded = torch.nn.functional.pad(train[..., 0].float() / 255, (4, 4, 4, 4))
    moved = 0
    for image, i in zip(unit, ids_of(images, mean, std)):
        crops = [padded[i, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        matches = [k for k, c in enumerate(crops) if torch.allclose(image, c, atol=1e-5)
                   or torch.allclose(image, c.flip(1), atol=1e-5)]
        assert matches, f"training image {i} is not a background-padded crop (or flip) of its input"
        moved += 40 not in matches  # 40: dy = dx = 4, the uncropped image
    assert moved > TRAIN // 2  # the crops do move


def test_device_augmentation_draws_from_its_generator():
    images = torch.rand(16, 32, 32, 1)
    first = pad_crop_flip(images, pad=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, pad_crop_flip(images, pad=4, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(first, pad_crop_flip(images, pad=4, generator=torch.Generator().manual_seed(4)))


def test_seed_and_epoch_fix_the_batches_and_shards_are_disjoint(fm_root):
    def epoch(seed, e, rank=0, world_size=1):
        loader = build_loaders(DataConfig(backend="fashion-mnist", root=str(fm_root), batch_size=4), device=CPU,
                               seed=seed, rank=rank, world_size=world_size).train
        loader.set_epoch(e)
        return torch.cat([x for x, _ in loader])

    assert torch.equal(epoch(1, 2), epoch(1, 2))
    assert not torch.equal(epoch(1, 2), epoch(1, 3))
    mean, std = train_mean_std(fm_root)
    shards = [set(ids_of(epoch(0, 0, rank, 3), mean, std)) for rank in range(3)]
    assert [len(s) for s in shards] == [8, 8, 8] and len(set.union(*shards)) == TRAIN


def test_55k5k_split_holds_out_the_last_twelfth_of_the_training_images(fm_root):
    (train, _), (val, val_labels) = load_fashion_mnist(fm_root, "55k5k")
    assert len(train) == 22 and len(val) == 2  # 24 - 24 // 12: on the real files 55,000 and 5,000
    assert val[:, 16, 16, 0].tolist() == [10 + 8 * 22, 10 + 8 * 23] and val_labels.tolist() == [2, 3]
    data = data_loaders(fm_root, fashion_mnist_split="55k5k", batch_size=4)
    assert data.val.num_samples == 2 and data.train.num_samples == 20
    mean, std = mean_and_std(train)
    assert ids_of(torch.cat([x for x, _ in data.val]), mean, std) == [22, 23]
    with pytest.raises(ValueError, match="fashion_mnist_split must be one of full, 55k5k"):
        DataConfig(backend="fashion-mnist", fashion_mnist_split="45k5k")


def damage(root, problem):
    """Break one file of a fake folder; returns the path the error must name."""
    images = root / (FILES["train", "images"] + ".gz")
    if problem == "missing_folder":
        return root / "nowhere"
    if problem == "missing_file":
        images.unlink()
        return root  # the folder looked in, and the file's name
    if problem == "truncated_gzip":
        images.write_bytes(images.read_bytes()[:-30])
    elif problem == "not_gzip":
        images.write_bytes(b"this is not a gzip stream")
    elif problem == "truncated_raw":
        data = gzip.decompress(images.read_bytes())
        images.unlink()
        return write_idx(images.with_suffix(""), data[:-100], gz=False)
    elif problem == "short_header":
        images.write_bytes(gzip.compress(b"\x00\x00\x08"))
    elif problem == "wrong_magic":  # a label file where the images should be
        images.write_bytes((root / (FILES["train", "labels"] + ".gz")).read_bytes())
    elif problem == "count_mismatch":
        labels = root / (FILES["train", "labels"] + ".gz")
        labels.write_bytes(gzip.compress(idx_bytes(torch.zeros(TRAIN - 1), 0x801)))
        return labels
    elif problem == "no_images":  # a whole IDX file, header and all, of 0 images
        images.write_bytes(gzip.compress(idx_bytes(torch.zeros(0, 28, 28), 0x803)))
    elif problem == "label_out_of_range":
        labels = root / (FILES["train", "labels"] + ".gz")
        labels.write_bytes(gzip.compress(idx_bytes(torch.full((TRAIN,), 10), 0x801)))
        return labels
    return images


@pytest.mark.parametrize("problem, message", [
    ("missing_folder", "Fashion-MNIST folder not found"),
    ("missing_file", "train-images-idx3-ubyte\\[.gz\\] not found"),
    ("truncated_gzip", "not a whole gzip file"),
    ("not_gzip", "not a whole gzip file"),
    ("truncated_raw", "is truncated: 18732 bytes, its header promises 18832"),
    ("short_header", "is truncated: 3 bytes, shorter than an IDX images header"),
    ("wrong_magic", "magic number 0x00000801, expected 0x00000803"),
    ("count_mismatch", "holds 24 images but .* 23 labels"),
    ("no_images", "holds no images: its IDX header counts 0"),
    ("label_out_of_range", "labels must be in \\[0, 10\\)"),
])
def test_bad_files_name_the_file_and_how_to_get_good_ones(tmp_path, problem, message):
    root = write_fake_fashion_mnist(tmp_path / "fm")
    named = damage(root, problem)
    with pytest.raises((FileNotFoundError, ValueError), match=message) as error:
        build_loaders(DataConfig(backend="fashion-mnist", root=str(named if problem == "missing_folder" else root)),
                      device=CPU)
    text = str(error.value)
    assert str(named) in text
    if problem not in ("count_mismatch", "label_out_of_range"):
        assert INSTALL in text
    if problem == "missing_file":  # the error lists every file the back end reads
        assert all(name in text for name in FILES.values())


def test_no_root_and_no_install_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEFAULT_ROOT", tmp_path / "not-installed")
    with pytest.raises(FileNotFoundError, match=f"no --data.root given and no {tmp_path / 'not-installed'}.*{INSTALL}"):
        build_loaders(DataConfig(backend="fashion-mnist"), device=CPU)
    write_fake_fashion_mnist(tmp_path / "not-installed")
    assert build_loaders(DataConfig(backend="fashion-mnist", batch_size=4), device=CPU).train.num_samples == TRAIN


@pytest.fixture(scope="module")
def full_size_root(tmp_path_factory):
    """Fake files of the real set's sizes, 60,000 training and 10,000 test images (0.5 MB gzipped)."""
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fm-full") / "fashion-mnist",
                                    sizes=(fashion_mnist.TRAIN_SIZE, fashion_mnist.TEST_SIZE))


def swapped_links(root, folder):
    """A folder of links to `root`'s files, each training file under the test file's name and back."""
    folder.mkdir()
    for (split, kind), name in FILES.items():
        other = FILES["test" if split == "train" else "train", kind]
        (folder / f"{other}.gz").symlink_to(root / f"{name}.gz")
    return folder


@pytest.mark.parametrize("split", ["full", "55k5k"])
def test_swapped_training_and_test_files_are_refused_naming_both(full_size_root, tmp_path, split):
    """The real set's sizes the wrong way round would train on 10,000 images and test on 60,000."""
    links = swapped_links(full_size_root, tmp_path / "swapped")
    with pytest.raises(DatasetError, match="10,000 images and .* 60,000: .* are swapped") as error:
        data_loaders(links, fashion_mnist_split=split)
    train, test = FILES["train", "images"], FILES["test", "images"]
    for name, target in ((train, test), (test, train)):
        assert f"{links / name}.gz (a link to {full_size_root / target}.gz)" in str(error.value)
    assert len(data_loaders(full_size_root, batch_size=1000).train) == 60  # the right way round: taken


def test_a_test_file_copied_over_the_training_file_is_refused(tmp_path):
    root = write_fake_fashion_mnist(tmp_path / "fm", sizes=(TEST, TEST))
    for kind in ("images", "labels"):
        (root / f"{FILES['train', kind]}.gz").write_bytes((root / f"{FILES['test', kind]}.gz").read_bytes())
    with pytest.raises(DatasetError, match="hold the same images: one is a copy of the other"):
        data_loaders(root)


def test_a_subset_of_other_sizes_is_taken(tmp_path):
    """A training split smaller than the test split, neither of the real sizes: a subset, not a swap."""
    root = write_fake_fashion_mnist(tmp_path / "fm", sizes=(6, 24))
    data = data_loaders(root, batch_size=2)
    assert (data.train.num_samples, data.val.num_samples) == (6, 24)


def test_verify_checks_every_file_and_the_splits_together(fm_root, full_size_root, tmp_path, capsys):
    from fastresnet.data.__main__ import main as data_cli

    assert data_cli(["verify", str(fm_root)]) == 0
    assert capsys.readouterr().out.strip() == f"checked {TRAIN + TEST} images: 0 error(s), 0 note(s)"
    assert data_cli(["verify", str(swapped_links(full_size_root, tmp_path / "swapped"))]) == 1
    assert "are swapped" in capsys.readouterr().out
    broken = write_fake_fashion_mnist(tmp_path / "broken", gz=False)
    damage_raw = broken / FILES["train", "images"]
    damage_raw.write_bytes(damage_raw.read_bytes()[:-100])
    (broken / FILES["test", "labels"]).unlink()
    assert data_cli(["verify", str(broken)]) == 1
    lines = capsys.readouterr().out.splitlines()  # sorted by path: t10k-... before train-...
    assert lines[0].startswith(f"error  {broken / FILES['test', 'labels']}: missing (nor ")
    assert lines[1] == f"error  {damage_raw} is truncated: 18732 bytes, its header promises 18832 " + \
        f"(24 x 28 x 28 bytes of images); {fashion_mnist.INSTALL_HINT}"
    assert lines[2] == f"checked {TEST} images: 2 error(s), 0 note(s)"


REAL = fashion_mnist.DEFAULT_ROOT
REAL_MISSING = f"Fashion-MNIST is not installed in {REAL} ({INSTALL})"


@pytest.mark.slow
@pytest.mark.skipif(not is_fashion_mnist_folder(REAL), reason=REAL_MISSING)
def test_real_files_train_a_short_epoch(tmp_path):
    """The installed files: their sizes and class balance, then 40 steps of ResNet-20 (batch 64, lr 0.1 on
    a cosine) beat chance clearly on the 5k held out: about 45% error here, chance is 90%."""
    from fastresnet.training import TrainConfig, train
    from fastresnet.training.metrics import read_jsonl

    (train_images, train_labels), (val_images, _) = load_fashion_mnist(REAL, "55k5k")
    assert (len(train_images), len(val_images)) == (55000, 5000)
    (full, full_labels), (test, _) = load_fashion_mnist(REAL, "full")
    assert (len(full), len(test)) == (60000, 10000) and torch.bincount(full_labels).tolist() == [6000] * 10
    cfg = TrainConfig(data=DataConfig(backend="fashion-mnist", fashion_mnist_split="55k5k", batch_size=64,
                                      val_batch_size=500),
                      unit="step", length=40, eval_every=0, log_every=10,
                      progress="off", plot=False, out_dir=str(tmp_path), run_name="real")
    assert train(cfg)["status"] == "completed"
    evals = [r for r in read_jsonl(tmp_path / "real" / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["top1_error"] < 70.0
