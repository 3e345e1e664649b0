"""Training metrics without host syncs in the step loop.

Loss sums, correct counts and non-finite counts accumulate in one small tensor
on the device; the host reads it (one `.tolist()`, after an all-reduce across
ranks) once per logging interval. Timing is host-side: wall time between
reads, and the time spent waiting for the next batch (data wait), whose
difference gives the compute-only rate. Achieved TFLOP/s counts a trained
image as 3 forward passes (forward, and a backward of about twice the work)
of 2 FLOPs per multiply-add from fastresnet.flops.count_macs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from fastresnet.training import distributed

# Dense bf16/fp16 tensor-core peak in TFLOP/s (vendor data sheets, no sparsity),
# matched against torch.cuda.get_device_name in this order.
PEAK_TFLOPS_16BIT = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("V100", 125.0),
    ("T4", 65.0),
)


def peak_tflops(device: torch.device, amp: str) -> float | None:
    """The card's 16-bit matrix peak, or None where unknown (CPU, fp32, an unlisted GPU)."""
    if device.type != "cuda" or amp not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS_16BIT:
        if key in name:
            return tflops
    return None


def train_flops_per_image(macs_per_image: int) -> float:
    return 3 * 2 * float(macs_per_image)


class TrainAccumulator:
    """Sums of loss * n (finite steps), correct, n, non-finite steps and n of finite steps, on the device."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = float(labels.shape[0])
        loss = loss.detach().double()
        finite = torch.isfinite(loss).double()
        correct = (logits.detach().argmax(dim=1) == labels).sum().double()
        self.sums += torch.stack(
            [torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * n * finite, correct,
             torch.full_like(loss, n), 1.0 - finite, finite * n]
        )

    def read(self) -> dict:
        """Reduce across ranks, read once, reset. The loss is the mean over finite steps."""
        distributed.all_reduce_sum(self.sums)
        loss_sum, correct, count, nonfinite, finite_count = self.sums.tolist()
        self.sums.zero_()
        return {
            "loss": loss_sum / finite_count if finite_count > 0 else math.nan,
            "error": 100.0 * (1 - correct / count) if count else math.nan,
            "images": int(count),
            "nonfinite_steps": int(nonfinite),
        }


class EvalAccumulator:
    """Top-1 / top-5 correct counts and loss sum, on the device."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, scores: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor) -> None:
        k = min(5, scores.shape[1])
        top = scores.topk(k, dim=1).indices
        hits = top == labels[:, None]
        self.sums += torch.stack(
            [hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
             torch.full((), float(labels.shape[0]), dtype=torch.float64, device=scores.device), loss_sum.double()]
        )

    def read(self) -> dict:
        distributed.all_reduce_sum(self.sums)
        top1, top5, count, loss_sum = self.sums.tolist()
        if count == 0:
            raise RuntimeError("the validation loader yielded no images")
        return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count,
                "top1_error": 100.0 * (1 - top1 / count), "top5_error": 100.0 * (1 - top5 / count),
                "loss": loss_sum / count, "images": int(count)}


class Throughput:
    """Host wall time and data-wait time between two metric reads (the read syncs the device)."""

    def __init__(self):
        self.window_start = time.perf_counter()
        self.data_wait = 0.0

    def restart(self) -> None:
        self.window_start, self.data_wait = time.perf_counter(), 0.0

    def waiting(self):
        return _Stopwatch(self)

    def read(self, images: int) -> dict:
        now = time.perf_counter()
        wall = max(now - self.window_start, 1e-9)
        compute = max(wall - self.data_wait, 1e-9)
        out = {"images_per_s": images / wall, "compute_images_per_s": images / compute,
               "data_wait_fraction": self.data_wait / wall, "seconds": wall}
        self.window_start, self.data_wait = now, 0.0
        return out


class _Stopwatch:
    def __init__(self, owner: Throughput):
        self.owner = owner

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.owner.data_wait += time.perf_counter() - self.start


def memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class JsonLines:
    """Append-only metrics file, one JSON object per line, flushed at once (rank 0 only)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def drop_after(self, step: int) -> None:
        """Keep the records up to `step`, the checkpoint's: a resumed run logs the steps after it again."""
        if self.path is None or not self.path.is_file():
            return
        kept = "".join(json.dumps(r) + "\n" for r in read_jsonl(self.path) if r.get("step", 0) <= step)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(kept)
            tmp.replace(self.path)
        finally:
            tmp.unlink(missing_ok=True)


def read_jsonl(path: Path) -> list[dict]:
    """The records; a line cut short by a killed process (the last one) is left out."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
