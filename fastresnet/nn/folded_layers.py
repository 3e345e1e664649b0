"""Conv -> BN (-> ReLU) chains outside the blocks (the stem, deep stems, Sequentials) fused in place.

Such a chain is spread over three sibling modules (conv1, bn1, relu) that the parent calls one after
another, and the state_dict keys live on each. To fuse it without renaming anything, each module is
replaced by an instance of a subclass of its own class that shares its parameters and buffers (the same
tensors, the same keys, still an instance of the original class):

- the conv computes conv + BN (+ ReLU) as one conv_bn_act in eval mode, from the BatchNorm's tensors
  as they are at that call;
- the BatchNorm and the ReLU pass their input through in eval mode (the conv already applied them).

That is right only while the parent still holds these three: each checks, at every eval call, that the
parent's slots hold the trio it was folded with, and where one was replaced (a SyncBatchNorm put in by
torch.nn.SyncBatchNorm.convert_sync_batchnorm, a module swapped by hand) all three compute as the
modules they are. In training mode all three behave as their own classes do. In eval with gradients wanted (an
input or the conv weight that requires grad, grad mode on) the conv computes the differentiable eager
composition conv -> BN (-> ReLU) itself, so gradients still reach the conv and BN parameters.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastresnet.nn.batchnorm import folded_affine, reduces_across_processes, synced_on_cpu
from fastresnet.ops.conv_bn_act import conv_bn_act


class _Chain:
    """The parent and the child names of one folded chain."""

    def __init__(self, parent: nn.Module, conv: str, bn: str, relu: Optional[str]):
        self.parent, self.names = parent, (conv, bn, relu)

    def module(self, i: int) -> nn.Module:
        return self.parent._modules[self.names[i]]

    def intact(self) -> bool:
        """The parent still holds the folded trio (an attribute lookup per slot)."""
        modules = self.parent._modules
        return all(name is None or getattr(modules.get(name), "__dict__", {}).get("fold_chain") is self
                   for name in self.names)


class _PassThroughInEval:
    """Mixin for the BN and ReLU: in eval the conv before them applied them."""

    def forward(self, x):
        if not self.training and self.__dict__["fold_chain"].intact():
            return x
        if reduces_across_processes(self) and not x.is_cuda:  # torch's SyncBatchNorm runs on GPUs only
            return synced_on_cpu(self, x, None, False)
        return super().forward(x)


class _ConvBNActInEval:
    """Mixin for nn.Conv2d: in eval, conv + the BN (+ ReLU) as one op; with gradients wanted, the
    differentiable eager composition."""

    def forward(self, x):
        chain = self.__dict__["fold_chain"]
        if self.training or not chain.intact():
            return super().forward(x)
        bn, relu = chain.module(1), chain.names[2] is not None
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            y = super(_PassThroughInEval, bn).forward(super().forward(x))  # the BN's own class's forward
            return F.relu(y) if relu else y
        scale, shift = folded_affine(bn)
        return conv_bn_act(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                           scale=scale, shift=shift, relu=relu)


@functools.lru_cache(maxsize=None)
def _subclass(mixin: type, cls: type) -> type:
    return type(f"Folded{cls.__name__}", (mixin, cls), {"__module__": __name__})


def _retyped(module: nn.Module, mixin: type, chain: _Chain) -> nn.Module:
    """A new instance of (mixin + module's class) sharing module's state: same tensors, same keys."""
    new = _subclass(mixin, type(module)).__new__(_subclass(mixin, type(module)))
    new.__dict__.update(module.__dict__)
    new.__dict__["fold_chain"] = chain  # a plain attribute, not a submodule: nothing changes in the state_dict
    return new


def fold_chain(parent: nn.Module, conv_name: str, bn_name: str, relu_name: Optional[str]) -> None:
    """Replace parent's children conv -> bn (-> relu), called in that order by parent, by the fused trio."""
    chain = _Chain(parent, conv_name, bn_name, relu_name)
    setattr(parent, conv_name, _retyped(getattr(parent, conv_name), _ConvBNActInEval, chain))
    setattr(parent, bn_name, _retyped(getattr(parent, bn_name), _PassThroughInEval, chain))
    if relu_name is not None:
        setattr(parent, relu_name, _retyped(getattr(parent, relu_name), _PassThroughInEval, chain))


def is_folded_conv(module: nn.Module) -> bool:
    return isinstance(module, _ConvBNActInEval)
