"""Fused inference ResNet blocks: every conv + BN (+ residual) (+ ReLU) is one conv_bn_act call.

A bottleneck in eval mode becomes three ops (plus one for a projection
shortcut) instead of eleven: conv1+bn1+relu, conv2+bn2+relu, and
conv3+bn3+add+relu, each writing its output once.

The blocks keep the original block's children under the original names
(conv1, bn1, ..., downsample), so a converted model's state_dict has the
original's keys and values and loads the original's checkpoints. They are new
module instances, not subclasses of the block they replace.

Folded weights are derived from those parameters and buffers and cached per
conv; the cache is refreshed when any source tensor changes, detected by its
identity, storage pointer, dtype, device and version counter (`tensor._version`,
which every in-place write bumps: optimizer steps, `load_state_dict`,
`copy_`, `.data` edits through in-place ops). Tensors created under
`torch.inference_mode` have no version counter; for them only identity,
pointer, dtype and device are checked.

In training mode, or when the input requires grad, a block runs the original
eager composition (the BatchNorms then update their statistics as usual):
the fused path is inference-only.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fastresnet.fold import bn_scale_shift
from fastresnet.ops.conv import PreparedConvBN, compute_dtype, conv_bn_act_prepared, tensor_key
from fastresnet.ops.conv_compiled import conv_bn_act_modules


def _source_key(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype):
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    geometry = (conv.stride, conv.padding, conv.dilation, conv.groups, getattr(bn, "eps", None))
    return (dtype, geometry, *map(tensor_key, tensors))


def prepare_conv_bn(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype) -> PreparedConvBN:
    scale, shift = bn_scale_shift(bn, conv.bias)
    return PreparedConvBN(
        conv.weight.detach(), scale, shift, conv.stride, conv.padding, conv.dilation, conv.groups, dtype=dtype
    )


class ConvBNCache:
    """Prepared (folded, packed, cast) forms of conv-BN pairs, rebuilt when their sources change."""

    def __init__(self):
        self._prepared: dict[str, tuple[tuple, PreparedConvBN]] = {}

    def prepared(self, name: str, conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype) -> PreparedConvBN:
        key = _source_key(conv, bn, dtype)
        cached = self._prepared.get(name)
        if cached is None or cached[0] != key:
            cached = (key, prepare_conv_bn(conv, bn, dtype))
            self._prepared[name] = cached
        return cached[1]

    def run(self, name, conv, bn, x, residual=None, relu=True) -> torch.Tensor:
        """conv_bn_act of x through the pair (conv, bn), under the cache entry `name`.

        Inside torch.compile: conv_bn_act_modules, which the compiler can hold
        without a graph break (a custom op on the kernel path, the traced
        reference elsewhere); this cache is then not used.
        """
        if torch.compiler.is_compiling():
            return conv_bn_act_modules(conv, bn, x, residual, relu)
        prepared = self.prepared(name, conv, bn, compute_dtype(x))
        return conv_bn_act_prepared(x, prepared, residual, relu)


class _FusedResNetBlock(nn.Module):
    """Shared machinery: (conv{i}, bn{i}) stages, a shortcut, the fused and the eager forward."""

    num_convs: int = 0

    def __init__(self, block: nn.Module):
        super().__init__()
        for i in range(1, self.num_convs + 1):
            self.add_module(f"conv{i}", getattr(block, f"conv{i}"))
            self.add_module(f"bn{i}", getattr(block, f"bn{i}"))
        self.downsample = getattr(block, "downsample", None)
        self.residual = bool(getattr(block, "residual", True))
        self.replaced_class = f"{type(block).__module__}.{type(block).__qualname__}"
        self._folded = ConvBNCache()

    def extra_repr(self) -> str:
        return f"replaces={self.replaced_class}, residual={self.residual}"

    # -- fused (inference) ------------------------------------------------

    def _fused_conv_bn(self, name, conv, bn, x, residual=None, relu=True):
        return self._folded.run(name, conv, bn, x, residual, relu)

    def _projection(self):
        """(parameter-free modules to run first, conv, bn) when downsample is such a Sequential, else None."""
        ds = self.downsample
        if not isinstance(ds, nn.Sequential) or len(ds) < 2:
            return None
        *prefix, conv, bn = list(ds)
        if type(conv) is not nn.Conv2d or not _is_foldable_bn(bn):
            return None
        if any(any(True for _ in m.parameters()) or any(True for _ in m.buffers()) for m in prefix):
            return None
        return prefix, conv, bn

    def _shortcut(self, x, fused: bool):
        if self.downsample is None:
            return x
        projection = self._projection()
        if not fused or projection is None:  # option A shortcuts and anything else: run as a module
            return self.downsample(x)
        prefix, conv, bn = projection
        for module in prefix:  # e.g. timm's avg_down AvgPool2d
            x = module(x)
        return self._fused_conv_bn("downsample", conv, bn, x, relu=False)

    # -- forward ------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = not self.training and not (torch.is_grad_enabled() and x.requires_grad)
        shortcut = self._shortcut(x, fused) if self.residual else None
        out = x
        for i in range(1, self.num_convs + 1):
            conv, bn = getattr(self, f"conv{i}"), getattr(self, f"bn{i}")
            residual = shortcut if i == self.num_convs else None
            if fused:
                out = self._fused_conv_bn(f"conv{i}", conv, bn, out, residual)
            else:
                out = bn(conv(out))
                out = torch.relu(out if residual is None else out + residual)
        return out


def _is_foldable_bn(module: nn.Module) -> bool:
    from fastresnet.fold import foldable_reason

    return foldable_reason(module) is None


class InferenceBasicBlock(_FusedResNetBlock):
    """Inference BasicBlock: relu(bn1(conv1 x)) -> relu(bn2(conv2 .) + shortcut(x)), two fused ops."""

    expansion = 1
    num_convs = 2


class InferenceBottleneck(_FusedResNetBlock):
    """Inference Bottleneck (1x1, 3x3, 1x1; stride wherever the original put it), three fused ops."""

    expansion = 4
    num_convs = 3
