"""`fashion-mnist`: Zalando's Fashion-MNIST, the four IDX files, held whole on the device.

60,000 training and 10,000 test images of 28x28 grayscale clothing in 10
classes. `apt-get install dataset-fashion-mnist` puts the files in
/usr/share/datasets/fashion-mnist (the default root); they may be gzipped or
not, and torchvision's own download folder (<root>/FashionMNIST/raw) is found
too. torchvision's IDX reader parses them, after a check of each header that
names a missing, truncated or mislabelled file.

The images are padded once from 28 to 32 pixels with the background (0), so
that the CIFAR nets and the paper's CIFAR recipe take them as they take
CIFAR-10: on the device, per batch, pad 4 more pixels of background, take a
random 32x32 crop, flip half, then normalise with the training split's own
mean and std (one number each: the set is grayscale; taken over the padded
images, which are what the net sees). Padding before
normalising pads with background, like the first 2 pixels, not with grey.

One channel is held (61 MB for the training set as uint8) and repeated to
three per batch, instead of building the nets with a 1-channel stem: every
CIFAR net, checkpoint, `convert`/`fold_bn` and the training program's
multiply-add count and fused-block timing take 3-channel images; a 1-channel
NHWC tensor is contiguous and channels_last at once, so its layout cannot be
told from its strides; and the stem's input is below every fused kernel's
channel alignment with 1 channel as with 3, so nothing would get faster. The
price is the stem's 3x3 conv reading 3 equal channels: 0.3 M more
multiply-adds per image, under 1% of ResNet-20's 41 M. Nothing is lost to the
net: three equal channels through a conv are one channel through the sum of
its three filters.

"55k5k" holds out the last 5,000 training images as the validation set, as
cifar10's "45k5k" does (the test files are left alone).

Files that read but are the wrong ones are refused, naming them: a training
file of 10,000 images beside a test file of 60,000 (the real set's files
swapped, as a misplaced link or rename leaves them: training would take the
small split and testing the large one without a word), and training and test
files that hold the same images. Other counts are taken: a subset of the set,
or the tests' small files.
"""

from __future__ import annotations

import functools
import gzip
import tempfile
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.datasets.mnist import read_image_file, read_label_file

from .augment import nhwc_to_model_layout, pad_crop_flip
from .config import DataConfig
from .loader import DataLoaders, Shard, tensor_loaders

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")  # where `apt-get install dataset-fashion-mnist` puts them
TORCHVISION_SUBFOLDER = Path("FashionMNIST") / "raw"  # where torchvision.datasets.FashionMNIST downloads them
INSTALL_HINT = (
    "get them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; they land in "
    f"{DEFAULT_ROOT}) or from https://github.com/zalandoresearch/fashion-mnist (data/fashion), "
    "and pass their folder as --data.root"
)
FILES = {  # (split, kind) -> file name without ".gz"
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
# IDX magic numbers: 0x08 (unsigned byte) as the type, then the number of dimensions.
MAGIC = {"images": 0x00000803, "labels": 0x00000801}
TRAIN_SIZE, TEST_SIZE = 60_000, 10_000  # images in the real set's training and test files
SOURCE_SIZE = 28  # pixels per side in the files
IMAGE_SIZE = 32  # pixels per side of what the model gets: the CIFAR nets' input
NUM_CLASSES = 10
PAD = 4  # pixels of background padding before the random crop (He et al. 2015, section 4.2)
VAL_FRACTION_55K5K = 12  # "55k5k" holds out the last 1/12 of the training images: 5,000 of 60,000


def find_file(root: Path, name: str) -> Path:
    """`name` or `name.gz` in root or in root/FashionMNIST/raw, the first that exists."""
    folders = (root, root / TORCHVISION_SUBFOLDER)
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    looked = ", ".join(FILES.values())
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}[.gz] not found in {root} (nor in {root / TORCHVISION_SUBFOLDER}); "
        f"the back end reads {looked} (each may be gzipped): {INSTALL_HINT}"
    )


def file_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as file:
            return file.read()
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError; a cut-off stream an EOFError
        raise ValueError(f"{path} is not a whole gzip file ({error}): download or install it again; "
                         f"{INSTALL_HINT}") from error


def check_header(path: Path, data: bytes, kind: str) -> tuple[int, ...]:
    """The shape an IDX file's header promises, once the magic number and the length agree with it."""
    ndim = 3 if kind == "images" else 1
    header_size = 4 * (1 + ndim)
    if len(data) < header_size:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, shorter than an IDX {kind} header "
                         f"({header_size} bytes); {INSTALL_HINT}")
    magic = int.from_bytes(data[:4], "big")
    if magic != MAGIC[kind]:
        raise ValueError(f"{path} is not an IDX file of {kind}: magic number {magic:#010x}, expected "
                         f"{MAGIC[kind]:#010x} (unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''}); "
                         f"{INSTALL_HINT}")
    shape = tuple(int.from_bytes(data[4 * i : 4 * i + 4], "big") for i in range(1, ndim + 1))
    if shape[0] == 0:
        raise ValueError(f"{path} holds no {kind}: its IDX header counts 0; {INSTALL_HINT}")
    expected = header_size + torch.Size(shape).numel()
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise ValueError(f"{path} is {state}: {len(data)} bytes, its header promises {expected} "
                         f"({' x '.join(map(str, shape))} bytes of {kind}); {INSTALL_HINT}")
    if kind == "images" and shape[1:] != (SOURCE_SIZE, SOURCE_SIZE):
        raise ValueError(f"{path}: images of {shape[1]}x{shape[2]} pixels, Fashion-MNIST's are "
                         f"{SOURCE_SIZE}x{SOURCE_SIZE}")
    return shape


def read_idx(path: Path, kind: str) -> torch.Tensor:
    """uint8 (N, 28, 28) images or int64 (N,) labels, parsed by torchvision's IDX reader."""
    data = file_bytes(path)
    check_header(path, data, kind)
    reader = read_image_file if kind == "images" else read_label_file
    if path.suffix != ".gz":
        return reader(str(path))
    with tempfile.TemporaryDirectory(prefix="fastresnet-fashion-mnist-") as folder:
        unpacked = Path(folder) / path.stem  # torchvision's reader opens a path, not bytes
        unpacked.write_bytes(data)
        return reader(str(unpacked))


def read_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 32, 32, 1) images, padded with background, and int64 labels of one split."""
    images_path, labels_path = find_file(root, FILES[split, "images"]), find_file(root, FILES[split, "labels"])
    images, labels = read_idx(images_path, "images"), read_idx(labels_path, "labels")
    check_split(images_path, images, labels_path, labels)
    border = (IMAGE_SIZE - SOURCE_SIZE) // 2
    padded = F.pad(images, (border, border, border, border))  # 0 is Fashion-MNIST's background
    return padded.unsqueeze(-1), labels


def check_split(images_path: Path, images: torch.Tensor, labels_path: Path, labels: torch.Tensor) -> None:
    """One label per image, each a class of the set."""
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"{labels_path}: labels must be in [0, {NUM_CLASSES}), "
                         f"got [{labels.min()}, {labels.max()}]")


def check_not_swapped(root: Path) -> None:
    """The real set's files read the wrong way round (see the module's docstring), told from their headers
    before 30 MB are unpacked. Without test files (enough for 55k5k) there is nothing to compare."""
    train = find_file(root, FILES["train", "images"])
    try:
        test = find_file(root, FILES["test", "images"])
    except FileNotFoundError:
        return
    if (header_count(train), header_count(test)) == (TEST_SIZE, TRAIN_SIZE):
        raise ValueError(f"{_shown(train)} holds {TEST_SIZE:,} images and {_shown(test)} {TRAIN_SIZE:,}: "
                         f"Fashion-MNIST's training file holds {TRAIN_SIZE:,} and its test file {TEST_SIZE:,}, so "
                         f"the training and test files in {root} are swapped: give each its own name (or link), "
                         "or install them again (`apt-get install dataset-fashion-mnist`)")


def check_distinct(train_path: Path, train_images: torch.Tensor, test_path: Path, test_images: torch.Tensor) -> None:
    """Training and test files that hold the same images: one was copied over the other."""
    if train_images.shape == test_images.shape and torch.equal(train_images, test_images):
        raise ValueError(f"{train_path} and {test_path} hold the same images: one is a copy of the other, and a "
                         f"test on the training images says nothing; {INSTALL_HINT}")


def header_count(path: Path) -> int | None:
    """The number of items an IDX file's header gives, from its first 8 bytes (None where those do not
    read: the whole file's check names the problem)."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as file:
            head = file.read(8)
    except (OSError, EOFError, zlib.error):
        return None
    return int.from_bytes(head[4:8], "big") if len(head) == 8 else None


def _shown(path: Path) -> str:
    """The path, and where a link leads."""
    return f"{path} (a link to {path.resolve()})" if path.is_symlink() else str(path)


def resolve_root(root: str | Path | None) -> Path:
    if root is None:
        if not DEFAULT_ROOT.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST not found: no --data.root given and no {DEFAULT_ROOT}; "
                                    f"{INSTALL_HINT}")
        return DEFAULT_ROOT
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder not found: {root}; {INSTALL_HINT}")
    return root


def load_fashion_mnist(
    root: str | Path | None, split: str
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train images, labels), (val images, labels) as uint8 (N, 32, 32, 1) on the CPU."""
    root = resolve_root(root)
    check_not_swapped(root)
    train_images, train_labels = read_split(root, "train")
    if split == "55k5k":
        cut = len(train_images) - len(train_images) // VAL_FRACTION_55K5K
        return (train_images[:cut], train_labels[:cut]), (train_images[cut:], train_labels[cut:])
    test_images, test_labels = read_split(root, "test")
    check_distinct(find_file(root, FILES["train", "images"]), train_images,
                   find_file(root, FILES["test", "images"]), test_images)
    return (train_images, train_labels), (test_images, test_labels)


def mean_and_std(images: torch.Tensor) -> tuple[float, float]:
    """Mean and std of uint8 pixels scaled to [0, 1], from their histogram (no float copy of the set)."""
    counts = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64, device=counts.device) / 255.0
    total = counts.sum()
    mean = (counts * values).sum() / total
    var = (counts * (values - mean).square()).sum() / total
    return float(mean), float(var.sqrt())


def make_transform(mean: float, std: float, dtype: torch.dtype, *, train: bool):
    """uint8 (B, 32, 32, 1) batch -> normalised 3-channel model input (augmented for training)."""

    def transform(batch: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        unit = batch.float().mul_(1.0 / 255.0)
        if train:
            unit = pad_crop_flip(unit, pad=PAD, generator=generator)  # pads with 0: background
        grey = unit.sub_(mean).div_(std).to(dtype)
        return nhwc_to_model_layout(grey.expand(-1, -1, -1, 3).contiguous())

    return transform


def build_fashion_mnist(cfg: DataConfig, *, device: torch.device, shard: Shard):
    (train_images, train_labels), (val_images, val_labels) = load_fashion_mnist(cfg.root, cfg.fashion_mnist_split)
    train_images, val_images = train_images.to(device), val_images.to(device)
    mean, std = mean_and_std(train_images)

    train, val = tensor_loaders(cfg, shard, (train_images, train_labels), (val_images, val_labels),
                                functools.partial(make_transform, mean, std, cfg.torch_dtype))
    return DataLoaders(
        train=train,
        val=val,
        num_classes=NUM_CLASSES,
        image_size=IMAGE_SIZE,
        backend="fashion-mnist",
    )
