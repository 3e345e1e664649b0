"""The device's two ceilings, measured in the calling process: copy bandwidth and matrix rate.

Every achieved GB/s or TFLOP/s is compared with these (bench/ceilings.py writes them for the
benchmarks; fastresnet.profile measures them beside its profile). On a GPU: a 2 GiB
device-to-device copy (bytes read + written) and an 8192^3 product on random data in the
run's dtype, timed with CUDA events. On a CPU: a 64 MiB copy and a 1024^3 fp32 product,
timed with the host clock over all the threads torch uses; meaningful for the CPU ops of a
CPU profile, and nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastresnet.ops.tuning import time_ms


@dataclass(frozen=True)
class Ceilings:
    copy_gbs: float  # bytes read + written per second by a large copy, in GB/s
    matmul_tflops: float  # dense matrix product rate, in TFLOP/s
    dtype: str  # the matrix product's dtype
    device: str  # the device's name

    def as_dict(self) -> dict:
        return {"copy_gbs": self.copy_gbs, "matmul_tflops": self.matmul_tflops, "dtype": self.dtype,
                "device": self.device}


def _time_ms(fn, device: torch.device) -> float:
    # a CPU's copy and product take long: fewer calls there
    return time_ms(fn, device, reps=20) if device.type == "cuda" else time_ms(fn, device, warmup=1, reps=5)


def copy_bandwidth_gbs(device: torch.device | str = "cuda", nbytes: int | None = None) -> float:
    device = torch.device(device)
    nbytes = nbytes or (2 << 30 if device.type == "cuda" else 64 << 20)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16,
                  n: int | None = None) -> float:
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _time_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure(device: torch.device, dtype: torch.dtype | None) -> Ceilings:
    """Both ceilings; the matrix rate in `dtype` (the run's autocast dtype; fp32 without one,
    which on a GPU runs as TF32 where the training program allows it)."""
    dtype = dtype or torch.float32
    if device.type == "cpu":
        dtype = torch.float32  # a CPU's bf16 product rate is not what its fp32 ops meet
        name = "cpu"
    else:
        name = torch.cuda.get_device_name(device)
    return Ceilings(copy_gbs=copy_bandwidth_gbs(device), matmul_tflops=matmul_tflops(device, dtype),
                    dtype=str(dtype).removeprefix("torch."), device=name)
