"""Conv -> BN (-> ReLU) chains outside the blocks (the stem, deep stems, Sequentials) fused in place.

Such a chain is spread over three sibling modules (conv1, bn1, relu) that the
parent calls one after another, and the state_dict keys live on each. To
fuse it without renaming anything, each module is replaced by an instance of
a subclass of its own class that shares its parameters and buffers (the same
tensors, the same keys, still an instance of the original class):

- the conv computes conv + BN (+ ReLU) as one conv_bn_act in eval mode,
  reading the BatchNorm's current statistics through a reference to it;
- the BatchNorm and the ReLU pass their input through in eval mode (the conv
  already applied them; ReLU is idempotent anyway).

In training mode all three behave exactly as before. In eval mode with an
input that requires grad, the conv runs the differentiable eager reference
(conv, then the BN's affine map, then ReLU), so gradients still reach the
conv and BN parameters.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from fastresnet.nn.inference_blocks import ConvBNCache
from fastresnet.reference import conv_bn_act_reference


class _PassThroughInEval:
    """Mixin: in eval mode this layer was already applied by the fused conv before it."""

    def forward(self, x):
        if self.training:
            return super().forward(x)
        return x


class _ConvBNActInEval:
    """Mixin for nn.Conv2d: in eval mode, conv + the folded BN (+ ReLU) in one op."""

    def forward(self, x):
        if self.training:
            return super().forward(x)
        bn, relu = self.__dict__["folded_bn"], self.__dict__["folded_relu"]
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _differentiable_conv_bn_act(self, bn, x, relu)
        return self.__dict__["folded_cache"].run("conv", self, bn, x, relu=relu)


def _differentiable_conv_bn_act(conv: nn.Conv2d, bn: nn.Module, x, relu: bool):
    scale = torch.rsqrt(bn.running_var + getattr(bn, "eps", 1e-5))
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return conv_bn_act_reference(
        x, conv.weight, scale, shift, conv.stride, conv.padding, None, relu, conv.dilation, conv.groups
    )


@functools.lru_cache(maxsize=None)
def _subclass(mixin: type, cls: type) -> type:
    return type(f"Folded{cls.__name__}", (mixin, cls), {"__module__": __name__})


def _retyped(module: nn.Module, mixin: type) -> nn.Module:
    """A new instance of (mixin + module's class) sharing module's state: same tensors, same keys."""
    new = _subclass(mixin, type(module)).__new__(_subclass(mixin, type(module)))
    new.__dict__.update(module.__dict__)
    return new


def fold_chain(parent: nn.Module, conv_name: str, bn_name: str, relu_name: str | None) -> None:
    """Replace parent's children conv -> bn (-> relu), called in that order by parent, by the fused trio."""
    conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
    folded_bn = _retyped(bn, _PassThroughInEval)
    folded_conv = _retyped(conv, _ConvBNActInEval)
    # Plain attributes, not submodules: the BN stays registered (and saved) under its own name only.
    folded_conv.__dict__.update(folded_bn=folded_bn, folded_relu=relu_name is not None, folded_cache=ConvBNCache())
    setattr(parent, conv_name, folded_conv)
    setattr(parent, bn_name, folded_bn)
    if relu_name is not None:
        setattr(parent, relu_name, _retyped(getattr(parent, relu_name), _PassThroughInEval))


def is_folded_conv(module: nn.Module) -> bool:
    return isinstance(module, _ConvBNActInEval)
