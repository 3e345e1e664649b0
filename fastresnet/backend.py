"""Which implementations an op chooses between: the Triton kernels', the CPU's, or the eager reference.

Every fused op asks in Python, before the op is called, so that `torch.compile`
traces one route only:
  use_triton(tensor)   the kernels' route: on CUDA, and on the CPU under
                       Triton's interpreter, which makes the CPU stand in for a
                       GPU (the tests);
  cpu_route(tensor)    the CPU's own candidates (PyTorch's oneDNN and ATen paths,
                       timed by fastresnet.ops.tuning): a CPU tensor otherwise;
  neither              the eager reference (FASTRESNET_FORCE_REFERENCE=1, or a
                       device with neither route).

Switches (read at call time, so tests can flip them):
  FASTRESNET_FORCE_REFERENCE=1  always run the eager reference.
  TRITON_INTERPRET=1            run the Triton kernels on the CPU through
                                Triton's interpreter (slow; for tests). It
                                must be set before `fastresnet.kernels`
                                is imported.
"""

from __future__ import annotations

import os

import torch

FORCE_REFERENCE_ENV = "FASTRESNET_FORCE_REFERENCE"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything else
        return False
    return True


# Probed once at import: a plain constant, which torch.compile traces freely
# (it warns about lru_cache-wrapped functions).
_TRITON_AVAILABLE = _import_triton()


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def force_reference() -> bool:
    return _env_flag(FORCE_REFERENCE_ENV)


def triton_interpreter() -> bool:
    return _env_flag("TRITON_INTERPRET")


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the Triton kernels should run on `tensor`'s device."""
    if force_reference() or not triton_available():
        return False
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and triton_interpreter()


def cpu_route(tensor: torch.Tensor) -> bool:
    """True when the CPU's own candidates should run on `tensor` (a CPU tensor without the interpreter)."""
    return tensor.device.type == "cpu" and not force_reference() and not use_triton(tensor)
