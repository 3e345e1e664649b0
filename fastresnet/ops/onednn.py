"""The CPU as fastresnet measures on it: what the CPU is, and oneDNN's convolution with fused post-ops.

PyTorch runs its CPU convolutions through oneDNN, but offers oneDNN's fused form (the convolution with
its bias, a residual add and a ReLU applied as post-ops while each output tile is still in cache, which
is what Inductor's CPU pattern matcher emits) only as private ATen ops. Every use of them, and of the
private probes of the CPU's bf16 units, is in this file, so that a torch that drops or changes them
breaks here alone: tests/test_onednn.py checks their signatures by name, and at run time a missing op
leaves the candidate out (`available()`), so the plain path runs.

  torch.ops.mkldnn._convolution_pointwise(X, W, B, padding, stride, dilation, groups, attr, scalars,
                                          algorithm)                          conv + bias (+ ReLU)
  torch.ops.mkldnn._convolution_pointwise.binary(X, other, W, B, padding, stride, dilation, groups,
                                                 binary_attr, alpha, unary_attr, unary_scalars,
                                                 unary_algorithm)             conv + bias + other (+ ReLU)
  torch.cpu._is_amx_tile_supported(), torch.cpu._is_avx512_bf16_supported()  the CPU's bf16 units

binary_attr "add" writes a new output; "sum" (accumulate into `other` in place) is refused by the
out-of-place overload ("Binary Fusion behavior undefined"). Weights are passed dense (channels_last) and
reordered by oneDNN at each call: the op folds BatchNorm into them at every call from the live
statistics, and a reorder cached across calls would go stale (measured on an AVX2 EPYC at ResNet-50's
shapes, batch 16: prepacking at each call was no faster than the dense weight).

The CPU's identity keys the tuning cache (fastresnet.ops.tuning): the model name, the vector ISA
PyTorch dispatches to, the bf16 units, a limit set on oneDNN's ISA (ONEDNN_MAX_CPU_ISA, which hides
AMX: how a test makes a CPU without bf16 units) and the thread count, since each changes which
candidate is fastest.
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Optional

import torch
from torch import Tensor

ISA_LIMIT_ENVS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
# oneDNN ISA limits below AVX512_CORE_BF16: under one of these oneDNN runs no bf16 dot-product
# instruction, whatever the CPU has.
_NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def _private(owner, *names):
    """owner.name1.name2..., or None where this torch lacks it."""
    for name in names:
        try:
            owner = getattr(owner, name)
        except (AttributeError, RuntimeError):
            return None
    return owner


def conv_pointwise_ops():
    """(the unary overload, the binary overload) of oneDNN's fused convolution, or None."""
    unary = _private(torch.ops, "mkldnn", "_convolution_pointwise", "default")
    binary = _private(torch.ops, "mkldnn", "_convolution_pointwise", "binary")
    return (unary, binary) if unary is not None and binary is not None else None


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether this torch has oneDNN and its fused convolution ops."""
    return torch.backends.mkldnn.is_available() and conv_pointwise_ops() is not None


def supports(x: Tensor, weight: Tensor, residual: Optional[Tensor]) -> bool:
    """Whether the fused convolution can run this problem: a CPU tensor in fp32, or bf16 where oneDNN
    has a bf16 path on this CPU (it refuses bf16 without AVX512BW/VL/DQ or AVX-NE-CONVERT), and a
    residual of x's dtype."""
    if not available() or x.device.type != "cpu" or weight.dtype != x.dtype:
        return False
    if residual is not None and residual.dtype != x.dtype:
        return False
    if x.dtype == torch.float32:
        return True
    probe = _private(torch.ops, "mkldnn", "_is_mkldnn_bf16_supported")
    return x.dtype == torch.bfloat16 and probe is not None and bool(probe())


def conv_bias_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int,
                  residual: Optional[Tensor], relu: bool) -> Tensor:
    """relu(conv2d(x, weight, bias) + residual) as one oneDNN convolution with post-ops; weight in x's
    memory format is read without a copy."""
    unary, binary = conv_pointwise_ops()
    geometry = (list(padding), list(stride), list(dilation), groups)
    act = "relu" if relu else None
    if residual is None:
        return unary(x, weight, bias, *geometry, act or "none", [], None)
    return binary(x, residual, weight, bias, *geometry, "add", None, act, [], None)


# ---------------------------------------------------------------------------
# What the CPU is
# ---------------------------------------------------------------------------


def isa_limit() -> Optional[str]:
    """The limit set on oneDNN's ISA (ONEDNN_MAX_CPU_ISA, or its old name DNNL_MAX_CPU_ISA), upper case."""
    for name in ISA_LIMIT_ENVS:
        value = os.environ.get(name, "").strip().upper()
        if value:
            return value
    return None


def bf16_units() -> bool:
    """Whether oneDNN may run bf16 products natively here: AMX-BF16 tiles or AVX512-BF16, not hidden by an
    ISA limit. Without them bf16 is emulated, slower than fp32 (an AVX2 EPYC: about 13x on a ResNet-20
    training step), and no bf16 candidate is worth timing."""
    if isa_limit() in _NO_BF16_ISAS:
        return False
    return _cpu_has("_is_amx_tile_supported") or _cpu_has("_is_avx512_bf16_supported")


def _cpu_has(probe: str) -> bool:
    """torch.cpu's private probe `probe`, False where this torch lacks it."""
    fn = _private(torch, "cpu", probe)
    return fn is not None and bool(fn())


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (lscpu's), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def cpu_features() -> list[str]:
    """What a CPU measurement depends on besides the model name: the ISA, the bf16 units, an ISA limit."""
    features = [torch.backends.cpu.get_cpu_capability()]
    if _cpu_has("_is_amx_tile_supported"):
        features.append("AMX")
    if _cpu_has("_is_avx512_bf16_supported"):
        features.append("AVX512-BF16")
    limit = isa_limit()
    if limit:
        features.append(f"oneDNN<={limit}")
    return features


def describe_cpu() -> str:
    """One line naming the CPU as the tuning cache and the reports do: model, ISA and units, threads."""
    return f"{cpu_model()} [{', '.join(cpu_features())}] {torch.get_num_threads()} threads"
