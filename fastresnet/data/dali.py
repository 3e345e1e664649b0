"""`dali`: NVIDIA DALI reads, decodes and augments ImageNet on the GPU.

The train pipeline: `fn.readers.file` sharded by rank (shard_id / num_shards),
`mixed` decoding (nvJPEG, with `hw_decoder_load` of the JPEGs sent to the
A100/H100 hardware decoder), the recipe's crop, a random flip, normalisation
and, for the paper's recipe, PCA lighting, all on the GPU, handing out NHWC
fp16 (or fp32, cast to bf16 on the device: DALI has no bf16) that is read as
NCHW channels_last with no copy. Val: shorter side to 256, centre 224 crop;
or the ten crops (4 corners, centre, and their flips). Without a GPU the
same pipeline runs on the CPU (device_id=None): that is what the CPU tests run.

The shuffle is ours, not the reader's: each epoch's file list is the
permutation of (seed, epoch) that every back end uses, cut evenly for the
ranks; the reader's contiguous shards of it are then disjoint random subsets,
and its own shuffle stays off so that the order is a pure function of
(seed, epoch) and a rank knows exactly which files it has delivered. A
pipeline is built per epoch (cheap next to an ImageNet epoch).

Bad files: what the scan finds (non-images, empty classes) follows the
policy before DALI starts; a file DALI cannot decode stops the pipeline with
its path in the message. bad_files="fail" raises BadImageError naming it;
"skip" rebuilds the pipeline for this rank's files not yet delivered, minus
that file, and carries on. DALI's decoder also reads through JPEGs that
libjpeg, and so Pillow and every other back end, refuse (an unknown marker, a
second frame header, a table that contradicts its length: fastresnet.data.jpeg);
a thread pool checks each file's marker structure in delivery order while DALI
decodes, once per file and process, and a batch reaches the model only after
its files passed: "fail" stops naming the file, "skip" drops it from the batch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
except ImportError as error:  # DALI is optional (the `dali` extra)
    raise ImportError(
        "the dali back end needs NVIDIA DALI: pip install nvidia-dali-cuda130 (fastresnet[dali])"
    ) from error

from .augment import IMAGENET_MEAN, IMAGENET_STD, LIGHTING_EIGVAL, LIGHTING_EIGVEC, nhwc_to_model_layout
from .config import DataConfig
from .crops import RRC_RATIO
from .folder import BadImageError, ImageList, open_rgb, read_bytes, report_skipped, scan_image_folder
from .jpeg import is_jpeg, structure_problem
from .loader import Batch, DataLoaders, Loader, Shard, batches_per_epoch, epoch_seed

READER = "Reader"
CHECK_CHUNK = 64  # files per task of the structure checks
PREFETCH_DEPTH = 2  # batches DALI prepares ahead (its default prefetch_queue_depth)
FAILED_SAMPLE = re.compile(r"Failed to decode sample #?\d*\s*:\s*(\S+)")
# nvJPEG's scratch buffers, preallocated so that the first large images do not stall (NVIDIA's RN50 values)
DEVICE_MEMORY_PADDING = 211_025_920  # bytes
HOST_MEMORY_PADDING = 140_544_512  # bytes


def decode(jpegs, cfg: DataConfig, device: str, **crop):
    """Decode to RGB; `mixed` (GPU) with the hardware decoder's share, or the CPU."""
    options = dict(device=device, output_type=types.RGB)
    if device == "mixed":
        options |= dict(
            hw_decoder_load=cfg.hw_decoder_load,
            device_memory_padding=DEVICE_MEMORY_PADDING,
            host_memory_padding=HOST_MEMORY_PADDING,
        )
    if crop:
        return fn.decoders.image_random_crop(jpegs, **options, **crop)
    return fn.decoders.image(jpegs, **options)


def pixel_normalisation(image_dtype):
    return dict(
        mean=[255 * m for m in IMAGENET_MEAN],
        std=[255 * s for s in IMAGENET_STD],
        dtype=image_dtype,
        output_layout="HWC",
    )


def lighting_offset(std: float):
    """AlexNet's PCA lighting, in normalised units: sum_k eigvec[:, k] * eigval[k] * alpha_k / pixel std."""
    alpha = fn.random.normal(shape=[3], stddev=std)
    eigvec, eigval = np.asarray(LIGHTING_EIGVEC, np.float32), np.asarray(LIGHTING_EIGVAL, np.float32)
    columns = eigvec * eigval[None, :] / np.asarray(IMAGENET_STD, np.float32)[:, None]
    return sum(alpha[k] * types.Constant(np.ascontiguousarray(columns[:, k])) for k in range(3))


def read_shard(files, labels, shard_id, num_shards):
    """This rank's files in the order given: the (seed, epoch) permutation is applied to `files`
    before the pipeline is built, so the reader neither shuffles nor leaves its shard."""
    return fn.readers.file(
        files=files,
        labels=labels,
        shard_id=shard_id,
        num_shards=num_shards,
        random_shuffle=False,
        stick_to_shard=True,
        name=READER,
    )


@pipeline_def(enable_conditionals=False)
def train_pipeline(files, labels, *, shard_id, num_shards, cfg: DataConfig, decode_device: str, image_dtype):
    jpegs, labels = read_shard(files, labels, shard_id, num_shards)
    size = cfg.image_size
    mirror = fn.random.coin_flip(probability=0.5)
    if cfg.recipe == "rrc":
        images = decode(
            jpegs,
            cfg,
            decode_device,
            random_area=list(cfg.rrc_scale),
            random_aspect_ratio=list(RRC_RATIO),
            num_attempts=10,
        )
        images = fn.resize(images, resize_x=size, resize_y=size)
        images = fn.crop_mirror_normalize(images, mirror=mirror, **pixel_normalisation(image_dtype))
    else:  # paper-scale: shorter side to s ~ U[256, 480], random size x size crop, lighting
        images = decode(jpegs, cfg, decode_device)
        images = fn.resize(images, resize_shorter=fn.random.uniform(range=list(cfg.scale_range)))
        images = fn.crop_mirror_normalize(
            images,
            crop=(size, size),
            crop_pos_x=fn.random.uniform(range=(0.0, 1.0)),
            crop_pos_y=fn.random.uniform(range=(0.0, 1.0)),
            mirror=mirror,
            **pixel_normalisation(types.FLOAT),
        )
        if cfg.lighting_std > 0:
            offset = lighting_offset(cfg.lighting_std)  # drawn on the CPU: 3 numbers per image
            images = images + (offset.gpu() if decode_device == "mixed" else offset)
        images = fn.cast(images, dtype=image_dtype)
    return images, labels


@pipeline_def(enable_conditionals=False)
def val_pipeline(files, labels, *, shard_id, num_shards, cfg: DataConfig, decode_device: str, image_dtype):
    """torchvision's evaluation views, made as the other back ends make them: each box (crops.centre_box,
    crops.five_boxes) cut from the decoded image in its own pixels, then resized to size x size. Resizing
    the whole image and cropping after puts the crop up to a pixel elsewhere and resamples it
    differently (0.06-0.15 mean absolute difference from torchvision, normalised, on photos)."""
    jpegs, labels = read_shard(files, labels, shard_id, num_shards)
    images = decode(jpegs, cfg, decode_device)
    size, normalisation = cfg.image_size, pixel_normalisation(image_dtype)
    boxes = val_boxes(fn.peek_image_shape(jpegs), size=size, resize=cfg.resize_before_crop)
    if not cfg.ten_crop:
        return crop_resize(images, boxes[-1], size, normalisation), labels
    views = [crop_resize(images, box, size, normalisation, mirror=mirror) for mirror in (0, 1) for box in boxes]
    return fn.stack(*views), labels


def val_boxes(shape, *, size: int, resize: int) -> list:
    """(top, left, side) of the four corner boxes and the centre box (last), in the image's pixels,
    as crops.five_boxes computes them (its rounding of the side is half-up here)."""
    height, width = shape[0], shape[1]
    shorter = dmath.min(height, width)
    side = dmath.max(1, dmath.min(shorter, dmath.floor(size * shorter / resize + 0.5)))
    right, bottom = width - side, height - side
    corners = [(0, 0), (0, right), (bottom, 0), (bottom, right), (dmath.floor(bottom / 2), dmath.floor(right / 2))]
    return [(top, left, side) for top, left in corners]


def crop_resize(images, box, size: int, normalisation: dict, mirror: int = 0):
    top, left, side = box
    anchor = fn.stack(fn.cast(top, dtype=types.FLOAT), fn.cast(left, dtype=types.FLOAT))
    extent = fn.stack(fn.cast(side, dtype=types.FLOAT), fn.cast(side, dtype=types.FLOAT))
    # the box stays on the CPU for a GPU slice too: DALI takes slice arguments from the host
    crop = fn.slice(images, anchor, extent, axis_names="HW", normalized_anchor=False, normalized_shape=False)
    crop = fn.resize(crop, resize_x=size, resize_y=size, antialias=True)
    return fn.crop_mirror_normalize(crop, mirror=mirror, **normalisation)


def decodes(path: str) -> bool:
    try:
        open_rgb(path)
    except BadImageError:
        return False
    return True


def jpeg_problems(paths: list[str]) -> list[str | None]:
    """For each file: why libjpeg would refuse it (a JPEG, by content), or None."""
    problems = []
    for path in paths:
        try:
            data = read_bytes(path)
        except BadImageError as error:
            problems.append(error.reason)
            continue
        problems.append(structure_problem(data) if is_jpeg(data) else None)
    return problems


class StructureChecks:
    """The JPEG structure of an epoch's files, checked by a thread pool in delivery order, each file
    once per process (`sound` remembers the files that passed)."""

    def __init__(self, files: list[str], order: list[int], sound: set[int], workers: int) -> None:
        self.sound = sound
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))
        self.pending: dict[int, tuple] = {}  # file index -> (future of its chunk, position in it)
        todo = [index for index in dict.fromkeys(order) if index not in sound]
        for start in range(0, len(todo), CHECK_CHUNK):
            chunk = todo[start : start + CHECK_CHUNK]
            future = self.pool.submit(jpeg_problems, [files[index] for index in chunk])
            self.pending.update((index, (future, position)) for position, index in enumerate(chunk))

    def problems(self, indices: list[int]) -> list[tuple[int, str]]:
        """(index, problem) of the bad files among `indices`, waiting for their checks."""
        bad = []
        for index in indices:
            if index in self.sound or index not in self.pending:
                continue
            future, position = self.pending.pop(index)
            problem = future.result()[position]
            if problem is None:
                self.sound.add(index)
            else:
                bad.append((index, problem))
        return bad

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class DaliLoader(Loader):
    def __init__(self, images: ImageList, cfg: DataConfig, *, device: torch.device, shard: Shard, train: bool) -> None:
        super().__init__()
        self.images, self.cfg, self.device, self.shard, self.train = images, cfg, device, shard, train
        self.batch_size = cfg.batch_size if train else cfg.eval_batch_size
        self.drop_last = cfg.drop_last and train
        self.crops = 10 if cfg.ten_crop and not train else 1
        self.skipped = len(images.skipped)
        self.skipped_files.update((bad.path, bad.reason or "") for bad in images.skipped)
        self.excluded: set[str] = set()  # files DALI failed to decode or libjpeg refuses, left out under "skip"
        self.sound: set[int] = set()  # files whose JPEG structure passed the check
        self._count_samples(self.shard_size(len(images.files)), self.drop_last)

    def shard_size(self, n: int) -> int:
        """Files of this rank: train lists are cut to a multiple of world_size; DALI's shard i of n
        files is [floor(i n / w), floor((i + 1) n / w))."""
        rank, world = self.shard.rank, self.shard.world_size
        if self.train:
            return n // world
        return (rank + 1) * n // world - rank * n // world

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, self.drop_last)

    def epoch_files(self) -> list[int]:
        """The epoch's file order (all ranks), as indices into the file list."""
        n = len(self.images.files)
        if not self.train:
            return list(range(n))
        generator = torch.Generator().manual_seed(epoch_seed(self.shard.seed, self.epoch))
        return torch.randperm(n, generator=generator)[: n - n % self.shard.world_size].tolist()

    def __iter__(self) -> Iterator[Batch]:
        order = self.epoch_files()
        size = self.shard_size(len(order))
        start = self.shard.rank * len(order) // self.shard.world_size
        mine = order[start : start + size]  # what DALI's shard of `order` holds, in delivery order
        pending = [i for i in mine if self.images.files[i] not in self.excluded]
        skipped_before = self.skipped
        self.skipped += len(mine) - len(pending)  # bad files found in an earlier epoch: skipped again
        if len(pending) == size:  # DALI shards the epoch's list itself
            files, shard_id, num_shards = order, self.shard.rank, self.shard.world_size
        else:  # this rank's files without the known bad ones
            files, shard_id, num_shards = pending, 0, 1
        delivered = from_current = 0
        iterator = None
        checks = StructureChecks(self.images.files, pending, self.sound, self.cfg.workers)
        try:
            while delivered < len(self):
                try:
                    if iterator is None:  # DALI's iterator runs the first batch when it is made
                        iterator = self.iterator(files, shard_id=shard_id, num_shards=num_shards)
                    outputs = next(iterator)
                except StopIteration:
                    break
                except RuntimeError as error:  # DALI reports a decode failure as RuntimeError
                    undelivered = pending[from_current * self.batch_size :]
                    # DALI reads ahead, and past the end of the shard it wraps around to the shard's start
                    in_flight = undelivered[: self.read_ahead] + pending[: self.read_ahead]
                    self.handle_decode_failure(error, [self.images.files[i] for i in in_flight])
                    pending = [i for i in undelivered if self.images.files[i] not in self.excluded]
                    if not pending:
                        break
                    files, shard_id, num_shards, iterator, from_current = pending, 0, 1, None, 0
                    continue
                first = from_current * self.batch_size
                delivered += 1
                from_current += 1
                images, labels = self.to_model_input(outputs[0])
                images, labels = self.without_refused(images, labels, pending[first : first + len(labels)], checks)
                if len(labels):
                    yield images, labels
        finally:
            checks.close()
        report_skipped(self.skipped - skipped_before, f"DaliLoader epoch {self.epoch}")

    def without_refused(self, images, labels, indices: list[int], checks: StructureChecks) -> Batch:
        """The batch without the files whose JPEG structure libjpeg refuses (skip), or BadImageError (fail)."""
        bad = checks.problems(indices)
        if not bad:
            return images, labels
        paths = {self.images.files[index]: problem for index, problem in bad}
        if self.cfg.bad_files == "fail":
            path, problem = next(iter(paths.items()))
            raise BadImageError(path, f"{problem}: DALI's decoder would read it through, Pillow and libjpeg refuse it")
        self.excluded.update(paths)
        self.skipped += len(paths)
        self.skipped_files.update((path, f"{problem} (refused by libjpeg)") for path, problem in paths.items())
        keep = torch.tensor([index not in dict(bad) for index in indices], device=labels.device)
        return images[keep.repeat_interleave(self.crops)], labels[keep]

    @property
    def read_ahead(self) -> int:
        """Files DALI may be decoding beyond those delivered: the current and prefetched batches."""
        return (PREFETCH_DEPTH + 2) * self.batch_size

    def handle_decode_failure(self, error: RuntimeError, in_flight: list[str]) -> None:
        """Find the file(s) DALI choked on; raise (fail) or exclude and count them (skip).

        DALI names the file only sometimes ("Failed to decode sample #3 : path");
        otherwise the culprit is among the files in flight, which Pillow checks."""
        in_flight = list(dict.fromkeys(in_flight))
        match = FAILED_SAMPLE.search(str(error))
        if match and match.group(1) in in_flight:
            bad = [match.group(1)]
        else:
            with ThreadPoolExecutor(max_workers=max(1, self.cfg.workers)) as pool:
                bad = [path for path, ok in zip(in_flight, pool.map(decodes, in_flight), strict=True) if not ok]
        last_line = str(error).strip().splitlines()[-1]
        if not bad:
            raise RuntimeError(
                f"DALI failed on a file under {self.cfg.root} that Pillow decodes: {error}\n"
                f"(`python -m fastresnet.data verify {self.cfg.root}` lists bad files)"
            ) from error
        if self.cfg.bad_files == "fail":
            raise BadImageError(bad[0], f"DALI cannot decode it ({last_line})") from error
        self.excluded.update(bad)
        self.skipped += len(bad)
        self.skipped_files.update((path, f"DALI cannot decode it ({last_line})") for path in bad)

    def iterator(self, indices: list[int], *, shard_id: int, num_shards: int) -> DALIGenericIterator:
        gpu = self.device.type == "cuda"
        pipeline = (train_pipeline if self.train else val_pipeline)(
            files=[self.images.files[i] for i in indices],
            labels=[self.images.labels[i] for i in indices],
            shard_id=shard_id,
            num_shards=num_shards,
            cfg=self.cfg,
            decode_device="mixed" if gpu else "cpu",
            image_dtype=types.FLOAT16 if self.cfg.dtype == "float16" else types.FLOAT,
            batch_size=self.batch_size,
            num_threads=max(1, self.cfg.workers),
            device_id=(self.device.index or 0) if gpu else None,
            seed=(epoch_seed(self.shard.seed, self.epoch) + 7 * self.shard.rank) % (2**31 - 1),
            prefetch_queue_depth=PREFETCH_DEPTH,
        )
        pipeline.build()
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        return DALIGenericIterator([pipeline], ["images", "labels"], reader_name=READER, last_batch_policy=policy)

    def to_model_input(self, outputs: dict) -> Batch:
        images = outputs["images"].to(self.device, non_blocking=True)  # already there on a GPU
        if self.crops > 1:  # (B, 10, H, W, C) -> (B * 10, H, W, C): each image's crops together
            images = images.flatten(0, 1)
        images = nhwc_to_model_layout(images).to(self.cfg.torch_dtype)
        labels = outputs["labels"].view(-1).to(device=self.device, dtype=torch.int64)
        return images, labels


def build_dali(cfg: DataConfig, *, device: torch.device, shard: Shard):
    train_list, val_list = scan_image_folder(cfg.root, bad_files=cfg.bad_files)
    return DataLoaders(
        train=DaliLoader(train_list, cfg, device=device, shard=shard, train=True),
        val=DaliLoader(val_list, cfg, device=device, shard=shard, train=False),
        num_classes=len(train_list.classes),
        image_size=cfg.image_size,
        backend="dali",
    )
