"""Where to crop: boxes in the original image's pixels, for every ImageNet recipe.

Every train and val view is "take this box of the decoded image, resize it to
size x size": random-resized-crop draws the box directly; the paper's scale
augmentation (resize the shorter side to s in [256, 480], take a random
224 crop) is the box of side 224 * short / s at a random place; the val
centre crop (resize to 256, crop 224) is the centred box of side
224 * short / 256. Working in boxes lets the CPU back end crop-and-resize
in one PIL call and the nvJPEG back end in one interpolation per image, and
never resizes a whole image only to throw most of it away.

A box is (left, top, width, height) in pixels of the decoded image.
"""

from __future__ import annotations

import math
import random

Box = tuple[int, int, int, int]
RRC_RATIO = (3 / 4, 4 / 3)  # range of the crop's aspect ratio (width / height)


def rrc_box(width: int, height: int, *, scale: tuple[float, float], rng: random.Random) -> Box:
    """torchvision's RandomResizedCrop: area in `scale` of the image's, log-uniform aspect ratio;
    after 10 misses the largest centred box within the ratio range."""
    area = width * height
    log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        box_w = round(math.sqrt(target_area * ratio))
        box_h = round(math.sqrt(target_area / ratio))
        if 0 < box_w <= width and 0 < box_h <= height:
            return rng.randint(0, width - box_w), rng.randint(0, height - box_h), box_w, box_h
    in_ratio = width / height
    if in_ratio < RRC_RATIO[0]:
        box_w, box_h = width, round(width / RRC_RATIO[0])
    elif in_ratio > RRC_RATIO[1]:
        box_w, box_h = round(height * RRC_RATIO[1]), height
    else:
        box_w, box_h = width, height
    return (width - box_w) // 2, (height - box_h) // 2, box_w, box_h


def scale_box(width: int, height: int, *, size: int, shorter: tuple[int, int], rng: random.Random) -> Box:
    """He et al. 2015: shorter side resized to s ~ U[shorter], then a random size x size crop."""
    resized_shorter = rng.randint(*shorter)
    side = max(1, min(width, height, round(size * min(width, height) / resized_shorter)))
    return rng.randint(0, width - side), rng.randint(0, height - side), side, side


def centre_box(width: int, height: int, *, size: int, resize: int) -> Box:
    """Shorter side resized to `resize`, then the centred size x size crop."""
    side = max(1, min(width, height, round(size * min(width, height) / resize)))
    return (width - side) // 2, (height - side) // 2, side, side


def five_boxes(width: int, height: int, *, size: int, resize: int) -> list[Box]:
    """The four corner crops and the centre crop of the image resized to shorter side `resize`."""
    side = max(1, min(width, height, round(size * min(width, height) / resize)))
    right, bottom = width - side, height - side
    corners = [(0, 0), (right, 0), (0, bottom), (right, bottom), (right // 2, bottom // 2)]
    return [(left, top, side, side) for left, top in corners]


def sample_rng(seed: int, index: int) -> random.Random:
    """The random stream of one sample in one epoch: the same whatever worker draws it."""
    return random.Random(seed * 2_654_435_761 + index)
