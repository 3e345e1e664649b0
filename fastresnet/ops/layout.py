"""What every op shares: the one import of the kernels, how tensors are laid out for them, the checks.

Dtypes, memory formats, conv output shapes, the rows the BatchNorm kernels address, the one guard on
32-bit indexing, and the checks an op's validator is made of.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_kernels: Optional[SimpleNamespace] = None


def kernels() -> SimpleNamespace:
    """fastresnet.kernels' modules (bn_act, bn_stats, conv, conv_train), imported on first use: Triton's
    interpreter (TRITON_INTERPRET) must be set before the import, and a machine without Triton never
    imports them; then kept (an import statement per call costs about a microsecond)."""
    global _kernels
    if _kernels is None:
        from fastresnet.kernels import bn_act, bn_stats, conv, conv_train

        _kernels = SimpleNamespace(bn_act=bn_act, bn_stats=bn_stats, conv=conv, conv_train=conv_train)
    return _kernels


def pair(v) -> tuple[int, int]:
    """An int or a pair of ints as a pair of ints (torch's conv arguments)."""
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def conv_output_shape(x_shape: Sequence[int], w_shape: Sequence[int], stride=1, padding=0,
                      dilation=1) -> tuple[int, int, int, int]:
    """[N, Cout, OH, OW] of conv2d(x, w): every op, fake implementation and kernel launch takes it from here."""
    n, _, h, w = x_shape
    out_c, _, kh, kw = w_shape
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    return (int(n), int(out_c), (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last where x is laid out so (and not also NCHW-contiguous), else contiguous: the layout an
    op gives its output."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def empty_conv_output(x: Tensor, weight: Tensor, stride, padding, dilation=1) -> Tensor:
    """A conv output buffer in x's dtype and memory format (what a fake implementation promises)."""
    return torch.empty(conv_output_shape(x.shape, weight.shape, stride, padding, dilation), device=x.device,
                       dtype=x.dtype, memory_format=memory_format_of(x))


def with_strides_of(t: Tensor, template: Tensor) -> Tensor:
    """t with template's strides (copied into it when they differ): what an op returns must have the
    strides its fake implementation promised to torch.compile, and a weight gradient the strides of the
    weight (autograd's layout contract; DDP's buckets)."""
    return t if t.stride() == template.stride() else template.copy_(t)


def as_rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """t itself when the BatchNorm kernels can address it by strides (channels_last or NCHW: H and W share
    one stride), else a channels_last copy; never an NCHW copy of a channels_last tensor."""
    if t is None:
        return t
    _, _, h, w = t.shape
    if w == 1 or h == 1 or t.stride(2) == w * t.stride(3):
        return t
    return t.contiguous(memory_format=torch.channels_last)


def fits_int32(*shapes: Optional[Sequence[int]]) -> bool:
    """Whether every tensor of these shapes can be indexed in 32 bits, as the kernels do: the one guard,
    which sends a larger problem to another path (or to an error saying to split the batch)."""
    return all(shape is None or math.prod(shape) < 2**31 for shape in shapes)


# ---------------------------------------------------------------------------
# The checks that the ops' validators are made of
# ---------------------------------------------------------------------------


def check_activation(x, name: str = "x") -> None:
    """x is a 4-D floating tensor of a dtype the kernels take, small enough for their 32-bit indexing."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 4-D NCHW-logical tensor, got {shape}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if not fits_int32(x.shape):
        raise ValueError(f"{name} of shape {tuple(x.shape)} has >= 2**31 elements; split the batch")


def check_channel_vector(v: Optional[Tensor], x: Tensor, name: str) -> None:
    if v is None:
        return
    if v.shape != (x.shape[1],):
        raise ValueError(f"{name} must have shape ({x.shape[1]},) for input {tuple(x.shape)}, got {tuple(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"{name} is on {v.device} but the input is on {x.device}")


def check_residual(residual: Optional[Tensor], shape: Sequence[int], device: torch.device) -> None:
    if residual is None:
        return
    check_activation(residual, "residual")
    if tuple(residual.shape) != tuple(shape):
        raise ValueError(f"residual shape {tuple(residual.shape)} != output shape {tuple(shape)}")
    if residual.device != device:
        raise ValueError(f"residual is on {residual.device} but the input is on {device}")
