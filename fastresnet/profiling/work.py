"""The work an op did, from the shapes torch.profiler recorded (`record_shapes=True`).

FLOPs are the matrix products' (2 per multiply-add): a convolution's forward, input gradient
(dgrad) and weight gradient (wgrad), and the fc layer's matmuls. Bytes are the least traffic
the op needs: every tensor it reads read once, its output written once (for BatchNorm, ReLU,
add and copies the floor the copy bandwidth sets; a fused kernel can do better by never
writing an intermediate, which shows as time below that floor). An op without an estimator
here (inductor's fused kernels, fastresnet's custom ops) has unknown work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastresnet.profiling import categories as cat

ITEMSIZE = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4,
            "short int": 2, "signed char": 1, "unsigned char": 1, "bool": 1}
ELEMENTWISE_OPS = {  # ops whose output has the shape of their largest input
    "aten::batch_norm", "aten::native_batch_norm", "aten::cudnn_batch_norm", "aten::_batch_norm_with_update",
    "aten::native_batch_norm_backward", "aten::cudnn_batch_norm_backward", "aten::batch_norm_backward",
    "aten::relu", "aten::relu_", "aten::clamp_min", "aten::clamp_min_", "aten::threshold_backward",
    "aten::add", "aten::add_",
}


@dataclass(frozen=True)
class Work:
    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.bytes + other.bytes)


@dataclass(frozen=True)
class _Tensor:
    shape: tuple[int, ...]
    itemsize: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


def _inputs(args: dict) -> list[_Tensor | None]:
    """The op's inputs as tensors (None for scalars, lists, or tensors of an unknown dtype)."""
    dims, types = args.get("Input Dims") or [], args.get("Input type") or []
    out = []
    for shape, kind in zip(dims, types):
        size = ITEMSIZE.get(kind)
        ok = size is not None and isinstance(shape, list) and all(isinstance(d, int) for d in shape)
        out.append(_Tensor(tuple(shape), size) if ok else None)
    return out


def _concrete(args: dict, index: int):
    """A recorded scalar input: '[1, 1]' -> [1, 1], 'True' -> True, '1' -> 1; None if absent."""
    values = args.get("Concrete Inputs") or []
    if index >= len(values) or values[index] == "":
        return None
    text = values[index].strip()
    if text.startswith("["):
        return [_scalar(v) for v in text.strip("[]").split(",") if v.strip()]
    return _scalar(text)


def _scalar(text: str):
    text = text.strip()
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        return float(text)


def _convolution(args: dict) -> dict[str, Work] | None:
    x, w = (_inputs(args) + [None, None])[:2]
    stride, padding, dilation = (_concrete(args, i) for i in (3, 4, 5))
    transposed = _concrete(args, 6)
    if x is None or w is None or len(x.shape) != 4 or transposed or not (stride and padding and dilation):
        return None
    n, _, h, wd = x.shape
    out_c, in_per_group, kh, kw = w.shape
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (wd + 2 * padding[-1] - dilation[-1] * (kw - 1) - 1) // stride[-1] + 1
    flops = 2 * n * out_c * out_h * out_w * in_per_group * kh * kw
    out_bytes = n * out_c * out_h * out_w * x.itemsize
    return {cat.CONV_FORWARD: Work(flops, x.nbytes + w.nbytes + out_bytes)}


def _convolution_backward(args: dict) -> dict[str, Work] | None:
    tensors = (_inputs(args) + [None] * 3)[:3]
    mask = _concrete(args, 10)
    if any(t is None for t in tensors) or not isinstance(mask, list) or len(tensors[0].shape) != 4:
        return None
    grad_out, x, w = tensors
    n, out_c, out_h, out_w = grad_out.shape
    flops = 2 * n * out_c * out_h * out_w * math.prod(w.shape[1:])
    dgrad = Work(flops, grad_out.nbytes + w.nbytes + x.nbytes) if mask[0] else Work()
    wgrad = Work(flops, grad_out.nbytes + x.nbytes + w.nbytes) if mask[1] else Work()
    return {cat.CONV_DGRAD: dgrad, cat.CONV_WGRAD: wgrad, cat.CONV_BACKWARD: dgrad + wgrad}


def _matmul(args: dict) -> dict[str, Work] | None:
    tensors = [t for t in _inputs(args) if t is not None]
    if len(tensors) < 2:
        return None
    a, b = tensors[-2], tensors[-1]  # addmm(bias, a, b); mm(a, b); bmm(a, b)
    if len(a.shape) != len(b.shape) or len(a.shape) not in (2, 3) or a.shape[-1] != b.shape[-2]:
        return None
    batch = a.shape[0] if len(a.shape) == 3 else 1
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    out_bytes = batch * m * n * a.itemsize
    return {cat.MATMUL: Work(2 * batch * m * k * n, sum(t.nbytes for t in tensors) + out_bytes)}


def _elementwise(args: dict) -> dict[str, Work] | None:
    tensors = [t for t in _inputs(args) if t is not None]
    if not tensors:
        return None
    return {cat.BN_ACT: Work(0, sum(t.nbytes for t in tensors) + max(t.nbytes for t in tensors))}


def _copy(args: dict) -> dict[str, Work] | None:
    tensors = [t for t in _inputs(args)[:2] if t is not None]
    return {cat.COPIES: Work(0, sum(t.nbytes for t in tensors))} if len(tensors) == 2 else None


def _fill(args: dict) -> dict[str, Work] | None:
    tensors = _inputs(args)
    return {cat.COPIES: Work(0, tensors[0].nbytes)} if tensors and tensors[0] is not None else None


def _pad(args: dict) -> dict[str, Work] | None:
    tensors, pad = _inputs(args), _concrete(args, 1)
    if not tensors or tensors[0] is None or not isinstance(pad, list) or len(pad) % 2:
        return None
    shape = list(tensors[0].shape)
    for i in range(len(pad) // 2):  # pairs from the last dimension backwards
        shape[-1 - i] += pad[2 * i] + pad[2 * i + 1]
    return {cat.COPIES: Work(0, tensors[0].nbytes + math.prod(shape) * tensors[0].itemsize)}


ESTIMATORS = {
    "aten::convolution": _convolution,
    "aten::convolution_backward": _convolution_backward,
    "aten::mm": _matmul, "aten::addmm": _matmul, "aten::bmm": _matmul,
    "aten::copy_": _copy,
    "aten::fill_": _fill, "aten::zero_": _fill,
    "aten::constant_pad_nd": _pad,
    **{name: _elementwise for name in ELEMENTWISE_OPS},
}


def estimate(name: str, args: dict) -> dict[str, Work] | None:
    """The op's work per category, or None where it is not known."""
    estimator = ESTIMATORS.get(name)
    if estimator is None:
        return None
    try:
        return estimator(args)
    except (TypeError, ValueError, IndexError, ZeroDivisionError):  # a recorded shape of a form not met before
        return None
