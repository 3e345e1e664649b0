"""The one typed config of the data back ends, with units in comments."""

from __future__ import annotations

from dataclasses import dataclass

import torch

BACKENDS = ("auto", "dali", "nvjpeg", "torchvision", "cifar10", "fashion-mnist", "digits", "synthetic")
RECIPES = ("rrc", "paper-scale")
BAD_FILE_POLICIES = ("fail", "skip")
CIFAR_SPLITS = ("full", "45k5k")
FASHION_MNIST_SPLITS = ("full", "55k5k")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

FOLDER_BACKENDS = ("dali", "nvjpeg", "torchvision")  # an ImageFolder of JPEGs, decoded and augmented per epoch
# The back ends that read each field; the fields not named here every back end reads (backend,
# batch_size, val_batch_size, dtype, and num_classes: the synthetic back end's count, every other's
# check of its data's). A setting away from its default that the back end does not read is refused
# (check_settings_apply), so a run never silently ignores one.
READERS = {
    "root": ("cifar10", "fashion-mnist", *FOLDER_BACKENDS),
    "workers": FOLDER_BACKENDS,
    "recipe": FOLDER_BACKENDS,
    "image_size": ("synthetic", *FOLDER_BACKENDS),
    "val_resize": FOLDER_BACKENDS,
    "ten_crop": FOLDER_BACKENDS,
    "drop_last": ("cifar10", "fashion-mnist", "digits", *FOLDER_BACKENDS),
    "bad_files": FOLDER_BACKENDS,
    "cifar_split": ("cifar10",),
    "fashion_mnist_split": ("fashion-mnist",),
    "hw_decoder_load": ("dali",),
    "rrc_scale": FOLDER_BACKENDS,
    "scale_range": FOLDER_BACKENDS,
    "lighting_std": FOLDER_BACKENDS,
    "synthetic_steps": ("synthetic",),
    "synthetic_val_steps": ("synthetic",),
    "pin_memory": ("nvjpeg", "torchvision"),
}
RECIPE_OF = {"rrc_scale": "rrc", "scale_range": "paper-scale", "lighting_std": "paper-scale"}  # read by one recipe only


@dataclass
class DataConfig:
    backend: str = "auto"  # auto | dali | nvjpeg | torchvision | cifar10 | fashion-mnist | digits | synthetic
    root: str | None = None  # dataset folder: ImageFolder root with train/ and val/, cifar-10-batches-py, or Fashion-MNIST's IDX files (fashion-mnist: None = /usr/share/datasets/fashion-mnist)
    batch_size: int = 128  # images per step per process
    val_batch_size: int | None = None  # images per val step per process (None: batch_size)
    workers: int = 8  # CPU decoding processes (torchvision) or threads (dali)
    recipe: str = "rrc"  # train augmentation: "rrc" (random-resized-crop) | "paper-scale" (He et al. 2015)
    image_size: int = 224  # pixels per side of the train and val crops (ImageNet back ends, synthetic)
    val_resize: int | None = None  # pixels of the shorter side before the val centre crop (None: image_size / 0.875)
    ten_crop: bool = False  # val: 10 crops per image (4 corners + centre, and their flips)
    dtype: str = "float32"  # float32 | float16 | bfloat16: the dtype of the images handed to the model
    drop_last: bool = True  # train: drop the last partial batch (val never drops, never pads)
    bad_files: str = "fail"  # "fail": stop at the first bad file, naming it | "skip": skip it and count it
    cifar_split: str = "full"  # cifar10: "full" (50k train / 10k test) | "45k5k" (the paper's 45k train / 5k val)
    fashion_mnist_split: str = "full"  # fashion-mnist: "full" (60k train / 10k test) | "55k5k" (55k train / the last 5k as val)
    hw_decoder_load: float = 0.65  # dali: share of JPEGs sent to the hardware decoder (A100/H100), 0..1
    rrc_scale: tuple[float, float] = (0.08, 1.0)  # rrc: range of the crop's area, as a fraction of the image's
    scale_range: tuple[int, int] = (256, 480)  # paper-scale: range of the shorter side in pixels before the crop
    lighting_std: float = 0.1  # paper-scale: std of the PCA colour lighting noise (AlexNet's value)
    num_classes: int | None = None  # synthetic: number of classes of the random labels (None: 1000); the other back ends count the data's, which a number given must equal
    synthetic_steps: int = 100  # synthetic: batches per epoch
    synthetic_val_steps: int = 10  # synthetic: val batches per epoch
    pin_memory: bool = True  # torchvision: page-locked host batches for asynchronous copies to the GPU

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("recipe", self.recipe, RECIPES)
        _check_choice("bad_files", self.bad_files, BAD_FILE_POLICIES)
        _check_choice("cifar_split", self.cifar_split, CIFAR_SPLITS)
        _check_choice("fashion_mnist_split", self.fashion_mnist_split, FASHION_MNIST_SPLITS)
        _check_choice("dtype", self.dtype, tuple(DTYPES))
        for name in ("batch_size", "image_size", "synthetic_steps", "synthetic_val_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"DataConfig.workers must be >= 0, got {self.workers}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"DataConfig.hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        for name in ("val_batch_size", "val_resize", "num_classes"):  # None means the default; 0 is not that
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1 (or unset), got {getattr(self, name)}")
        if self.val_resize is not None and self.val_resize < self.image_size:  # the crop would be the whole image
            raise ValueError(f"DataConfig.val_resize ({self.val_resize} pixels) must be >= image_size "
                             f"({self.image_size}): the val crops of image_size pixels are cut from the image "
                             "resized to val_resize; raise it, or unset it")
        _check_range("rrc_scale", self.rrc_scale, low=0.0, high=1.0, what="a fraction of the image's area")
        _check_range("scale_range", self.scale_range, low=0, high=None, what="pixels of the shorter side")
        if self.lighting_std < 0:
            raise ValueError(f"DataConfig.lighting_std must be >= 0, got {self.lighting_std}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def eval_batch_size(self) -> int:
        return self.val_batch_size or self.batch_size

    @property
    def synthetic_classes(self) -> int:
        return self.num_classes or 1000

    @property
    def resize_before_crop(self) -> int:
        """Shorter side before the val centre crop: 256 for a 224 crop, as in the paper."""
        return self.val_resize or round(self.image_size / 0.875)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"DataConfig.{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_range(name: str, bounds: tuple, *, low: float, high: float | None, what: str) -> None:
    """(min, max) with low < min <= max (<= high): a reversed or empty range is an error, not a swap."""
    first, last = bounds
    if not (low < first <= last and (high is None or last <= high)):
        upper = f" <= {high:g}" if high is not None else ""
        raise ValueError(f"DataConfig.{name} must be (min, max) with {low:g} < min <= max{upper} ({what}), "
                         f"got {tuple(bounds)}")


def reads(backend: str, name: str, recipe: str = "rrc") -> bool:
    """Whether the `backend` back end (with train augmentation `recipe`) reads DataConfig field `name`."""
    return backend in READERS.get(name, BACKENDS) and RECIPE_OF.get(name, recipe) == recipe


def check_settings_apply(cfg: DataConfig, backend: str, flag_prefix: str = "DataConfig.") -> None:
    """A ValueError naming the first field set away from its default that `backend` does not read."""
    defaults = DataConfig()
    for name in READERS:
        value = getattr(cfg, name)
        if value == getattr(defaults, name) or reads(backend, name, cfg.recipe):
            continue
        if name == "root":
            raise ValueError(f"{flag_prefix}root {value}: the {backend} back end reads no dataset folder; unset it, "
                             "or choose the back end that reads it (auto picks one from the folder)")
        if name in RECIPE_OF and backend in READERS[name]:
            where = f"the {cfg.recipe} recipe does not use it, it is read only by the {RECIPE_OF[name]} recipe"
        else:
            chosen = "" if cfg.backend != "auto" else f" (auto's choice {'without' if cfg.root is None else 'for'} " \
                f"{flag_prefix}root{'' if cfg.root is None else ' ' + cfg.root})"
            where = f"the {backend} back end{chosen} does not read it, it is read only by {', '.join(READERS[name])}"
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else str(value).lower() if isinstance(
            value, bool) else value
        raise ValueError(f"{flag_prefix}{name} {shown}: {where}; leave it out, or choose one that reads it")
