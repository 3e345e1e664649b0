"""Measure the device's two ceilings and describe the environment.

The copy bandwidth (a large device-to-device copy, bytes read + written)
and the dense bf16 matrix rate (an 8192^3 product on random data), measured
by fastresnet.profiling.ceilings, are the floors every kernel's achieved
GB/s or TFLOP/s is compared with (../shared/MEASURING.md). On a CPU it only
reports the environment.

    python bench/ceilings.py --out ceilings.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch

from fastresnet.profiling.ceilings import copy_bandwidth_gbs, matmul_tflops


def _git_revision() -> str | None:
    """The commit measured: FASTRESNET_GIT_REV (a copy without .git), else git's answer."""
    if os.environ.get("FASTRESNET_GIT_REV"):
        return os.environ["FASTRESNET_GIT_REV"]
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def environment() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "git": _git_revision(),
    }
    for name in ("triton", "torchvision", "timm"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            info[name] = None
    if torch.cuda.is_available():
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON here as well as to stdout")
    args = parser.parse_args(argv)
    result = {"environment": environment()}
    if torch.cuda.is_available():
        result["copy_gbs"] = copy_bandwidth_gbs()
        result["bf16_matmul_tflops"] = matmul_tflops()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
