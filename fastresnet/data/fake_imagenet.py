"""A realistic fake ImageNet: real photographs, ImageNet's sizes and JPEG qualities.

A JPEG decoder's speed depends on image size, chroma subsampling, quality and
on how much detail there is to code: random noise is far slower to decode
than a photograph and says nothing. So every image here is a random crop
(30-100% of the side), flip and rescale of one of the photographs that
scikit-learn ships (china.jpg, flower.jpg, 640x427), saved at one of
ImageNet's common sizes (500x375, 375x500, 500x333 ...) with a JPEG quality
between 75 and 95 and 4:2:0 subsampling, as most ImageNet files are.

`tint=True` blends each class's images towards a class colour (red, green,
blue, then further hues), so that tests can read an image's class back from
its mean colour after any crop.
"""

from __future__ import annotations

import colorsys
import random
from pathlib import Path

import numpy as np
from PIL import Image

IMAGENET_SIZES = ((500, 375), (500, 375), (500, 333), (375, 500), (500, 400), (333, 500), (400, 300))  # (w, h)
JPEG_QUALITY = (75, 95)  # range of qualities; ImageNet's files mostly fall here
TINT_WEIGHT = 0.7  # share of the class colour in a tinted image


def sample_photographs() -> list[Image.Image]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as error:
        raise ImportError(
            "make-fake-imagenet needs scikit-learn (its sample photographs): pip install scikit-learn"
        ) from error
    return [Image.fromarray(image) for image in load_sample_images().images]


def class_name(index: int) -> str:
    return f"n{index:08d}"  # ImageNet's folders are WordNet ids: n01440764 ...


def class_colour(index: int) -> tuple[int, int, int]:
    """Red, green, blue for classes 0, 1, 2; further classes get hues in between."""
    hue = (index / 3.0) % 1.0 if index < 3 else (index * 0.618034) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 1.0, 1.0)
    return round(255 * red), round(255 * green), round(255 * blue)


def fake_photo(photos: list[Image.Image], rng: random.Random, size: tuple[int, int] | None = None) -> Image.Image:
    """A random crop, flip and rescale of a real photograph, at an ImageNet size."""
    photo = rng.choice(photos)
    width, height = size or rng.choice(IMAGENET_SIZES)
    scale = rng.uniform(0.3, 1.0)
    crop_w = max(8, min(photo.width, round(photo.width * scale)))
    crop_h = max(8, min(photo.height, round(crop_w * height / width)))
    left, top = rng.randint(0, photo.width - crop_w), rng.randint(0, photo.height - crop_h)
    image = photo.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def tinted(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    mixed = (1 - TINT_WEIGHT) * pixels + TINT_WEIGHT * np.asarray(colour, dtype=np.float32)
    return Image.fromarray(mixed.round().astype(np.uint8))


def make_fake_imagenet(
    root: str | Path,
    *,
    classes: int,
    images_per_class: int,
    val_images_per_class: int | None = None,
    seed: int = 0,
    tint: bool = False,
    size: tuple[int, int] | None = None,
) -> Path:
    """Write root/train/<class>/*.JPEG and root/val/<class>/*.JPEG; returns root.

    `size` (w, h) fixes every image's size instead of drawing ImageNet's.
    """
    if classes < 1 or images_per_class < 1:
        raise ValueError(f"need at least 1 class and 1 image per class, got {classes} and {images_per_class}")
    root = Path(root)
    val_images_per_class = max(1, images_per_class // 10) if val_images_per_class is None else val_images_per_class
    photos = sample_photographs()
    rng = random.Random(seed)
    for split, count in (("train", images_per_class), ("val", val_images_per_class)):
        for label in range(classes):
            folder = root / split / class_name(label)
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(count):
                image = fake_photo(photos, rng, size)
                if tint:
                    image = tinted(image, class_colour(label))
                quality = rng.randint(*JPEG_QUALITY)
                path = folder / f"{class_name(label)}_{split}_{number:05d}.JPEG"
                image.save(path, format="JPEG", quality=quality, subsampling="4:2:0")
    return root
