"""The bad input policy, for every ImageFolder back end that runs here, and `verify`."""

import pytest
import torch
from data_helpers import BAD_FILES, add_bad_file, fake_imagenet_root, small_folder

from fastresnet.data import DataConfig, build_loaders, dali_available
from fastresnet.data.__main__ import main as data_cli
from fastresnet.data.folder import BadImageError

CPU = torch.device("cpu")
BACKENDS = ["torchvision", "nvjpeg"] + (["dali"] if dali_available() else [])
ERRORS = [kind for kind, (_, outcome) in BAD_FILES.items() if outcome == "error"]
HANDLED = [kind for kind, (_, outcome) in BAD_FILES.items() if outcome == "handled"]


def loaders(root, backend, **overrides):
    fields = dict(backend=backend, root=str(root), batch_size=7, image_size=32, workers=0) | overrides
    return build_loaders(DataConfig(**fields), device=CPU)


def one_epoch(loader):
    return [(x, y) for x, y in loader]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ERRORS)
def test_bad_file_fails_fast_naming_it(tmp_path, backend, kind):
    bad = add_bad_file(small_folder(tmp_path), kind)
    with pytest.raises((BadImageError, RuntimeError), match=bad.name):
        one_epoch(loaders(tmp_path, backend).train)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ERRORS)
def test_bad_file_is_skipped_and_counted(tmp_path, backend, kind):
    add_bad_file(small_folder(tmp_path), kind)
    train = loaders(tmp_path, backend, bad_files="skip", drop_last=False).train
    with pytest.warns(UserWarning, match="skipped 1 bad file"):
        batches = one_epoch(train)
    labels = torch.cat([y for _, y in batches])
    assert train.skipped == 1
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]  # the 6 good images, labels intact
    train.set_epoch(1)
    with pytest.warns(UserWarning, match="skipped 1 bad file"):
        labels = torch.cat([y for _, y in train])
    assert train.skipped == 2 and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]  # skipped again, counted again


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", HANDLED)
def test_odd_but_valid_images_are_decoded_to_rgb(tmp_path, backend, kind):
    add_bad_file(small_folder(tmp_path), kind)
    train = loaders(tmp_path, backend, drop_last=False).train
    batches = one_epoch(train)
    images = torch.cat([x for x, _ in batches])
    assert images.shape == (7, 3, 32, 32) and torch.isfinite(images).all() and train.skipped == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_folder_and_missing_split_name_the_path(tmp_path, backend):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        loaders(tmp_path / "nowhere", backend)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.JPEG").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="val"):
        loaders(tmp_path, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_without_class_folders_is_an_error(tmp_path, backend):
    small_folder(tmp_path)
    for path in sorted((tmp_path / "val").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    with pytest.raises(ValueError, match="no class folders"):
        loaders(tmp_path, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_class_fails_or_is_skipped_keeping_the_label_mapping(tmp_path, backend):
    small_folder(tmp_path, classes=("a", "b", "c"))
    for path in (tmp_path / "train" / "b").iterdir():
        path.unlink()
    with pytest.raises(BadImageError, match="empty class"):
        loaders(tmp_path, backend)
    data = loaders(tmp_path, backend, bad_files="skip", drop_last=False)
    assert data.num_classes == 3 and data.train.skipped == 1
    assert sorted(torch.cat([y for _, y in one_epoch(data.train)]).tolist()) == [0, 0, 0, 2, 2, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_image_file_fails_or_is_skipped(tmp_path, backend):
    small_folder(tmp_path)
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(BadImageError, match="notes.txt"):
        loaders(tmp_path, backend)
    assert loaders(tmp_path, backend, bad_files="skip").train.skipped == 1


def test_the_nvjpeg_header_check_lets_the_broken_jpeg_through_to_the_batched_decoder():
    from data_helpers import broken_after_header

    from fastresnet.data.nvjpeg import gpu_decodable

    assert gpu_decodable(broken_after_header())
    assert not gpu_decodable(BAD_FILES["truncated_jpeg"][0]())
    assert not gpu_decodable(BAD_FILES["cmyk_jpeg"][0]())
    assert not gpu_decodable(BAD_FILES["png_named_jpeg"][0]())


@pytest.mark.skipif(not dali_available(), reason="needs NVIDIA DALI")
def test_dali_alone_decodes_the_jpeg_that_libjpeg_refuses(tmp_path):
    # The premise of the dali back end's structure checks: DALI's own decoder (its CPU pipeline)
    # hands out an image for this file, where Pillow stops.
    from data_helpers import refused_by_libjpeg
    from nvidia.dali import fn, pipeline_def
    from PIL import Image

    path = tmp_path / "refused.JPEG"
    path.write_bytes(refused_by_libjpeg())
    with pytest.raises(OSError, match="broken data stream"):
        Image.open(path).load()

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode_only():
        jpegs, _ = fn.readers.file(files=[str(path)], labels=[0])
        return fn.decoders.image(jpegs, device="cpu")

    pipeline = decode_only()
    pipeline.build()
    (images,) = pipeline.run()
    assert images.as_array().shape == (1, 64, 96, 3)


def test_jpeg_structure_check_passes_valid_jpegs_and_leaves_truncation_to_the_decoders():
    import io

    from PIL import Image

    from fastresnet.data.jpeg import structure_problem

    files = [p.read_bytes() for p in sorted(fake_imagenet_root().rglob("*.JPEG"))]
    photo = Image.open(io.BytesIO(files[0]))
    for options in ({"progressive": True}, {"subsampling": 0}, {"quality": 30}, {"restart_marker_blocks": 1}):
        buffer = io.BytesIO()
        photo.save(buffer, format="JPEG", **options)
        files.append(buffer.getvalue())
    files += [BAD_FILES[kind][0]() for kind in ("grayscale_jpeg", "cmyk_jpeg", "truncated_jpeg", "corrupt_jpeg")]
    assert [structure_problem(data) for data in files] == [None] * len(files)
    assert "unknown marker 0x0c" in structure_problem(BAD_FILES["refused_by_libjpeg"][0]())


def test_val_class_unknown_to_train_is_an_error(tmp_path):
    small_folder(tmp_path)
    (tmp_path / "val" / "zebra").mkdir()
    with pytest.raises(ValueError, match="zebra"):
        loaders(tmp_path, "torchvision")


def test_a_worker_process_failure_names_the_file(tmp_path):
    bad = add_bad_file(small_folder(tmp_path), "truncated_jpeg")
    with pytest.raises(Exception, match=bad.name):
        one_epoch(loaders(tmp_path, "torchvision", workers=1).train)


def test_verify_lists_every_problem_and_exits_1(tmp_path, capsys):
    root = small_folder(tmp_path)
    bad = {kind: add_bad_file(root, kind) for kind in BAD_FILES}
    (root / "train" / "a" / "notes.txt").write_text("x")
    (root / "train" / "empty").mkdir()
    assert data_cli(["verify", str(root), "--workers", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    for kind, path in bad.items():
        [line] = [line for line in lines if path.name in line]
        assert line.startswith("error" if BAD_FILES[kind][1] == "error" else "note")
    assert any("notes.txt" in line and line.startswith("error") for line in lines)
    assert any("empty class" in line for line in lines)
    assert lines[-1].startswith("checked 20 images: 7 error(s), 3 note(s)")


def test_verify_passes_a_clean_dataset_and_fails_a_missing_one(tmp_path, capsys):
    assert data_cli(["verify", str(small_folder(tmp_path / "ok"))]) == 0
    assert "0 error(s)" in capsys.readouterr().out
    assert data_cli(["verify", str(tmp_path / "missing")]) == 2  # no dataset to list problems of: the user's mistake
    assert capsys.readouterr().err.startswith(f"error: verify {tmp_path / 'missing'}: no such folder")


def test_make_fake_imagenet_writes_real_jpegs_at_imagenet_sizes(tmp_path, capsys):
    from PIL import Image

    from fastresnet.data.fake_imagenet import IMAGENET_SIZES

    assert data_cli(["make-fake-imagenet", str(tmp_path), "--classes", "2", "--images-per-class", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    files = sorted(tmp_path.rglob("*.JPEG"))
    assert len(files) == 2 * 3 + 2 * 1
    for path in files:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size in IMAGENET_SIZES
    assert data_cli(["verify", str(tmp_path)]) == 0
