"""Conv -> BN (-> ReLU) chains outside the blocks (the stem, deep stems, Sequentials) fused in place.

Such a chain is spread over three sibling modules (conv1, bn1, relu) that the parent calls one after
another, and the state_dict keys live on each. To fuse it without renaming anything, each module is
replaced by an instance of a subclass of its own class that shares its parameters and buffers (the same
tensors, the same keys, still an instance of the original class): FoldedConv2d, FoldedBatchNorm2d,
FoldedSyncBatchNorm, FoldedFrozenBatchNorm2d, FoldedReLU, importable like any module class.

The three fold while their parent's forward runs (a forward pre-hook and an always-called forward hook
on the parent count its calls), in eval: then the conv computes conv + BN (+ ReLU) as one conv_bn_act,
from the BatchNorm's tensors as they are at that call, and the BatchNorm and the ReLU pass their input
through. Everywhere else each computes as its own class does:
- a call of one of them alone (`model.conv1(x)` is a convolution), and a graph that calls them (an FX
  GraphModule of the model, which records them as leaf modules);
- in training, and where any of the three is in training mode;
- while any of them has a hook, or a global module hook is registered (fastresnet.nn.plain): each hook
  sees what its module returns;
- where the parent no longer holds the trio (a SyncBatchNorm put in by
  torch.nn.SyncBatchNorm.convert_sync_batchnorm, a module swapped by hand);
- under torch.jit.trace and torch.export, which record the plain modules.
In eval with gradients wanted (an input or the conv weight that requires grad, grad mode on), and for
dtypes the kernels do not take, the conv computes the eager composition conv -> BN (-> ReLU) itself, so
gradients still reach the conv and BN parameters.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

from fastresnet.nn.batchnorm import folded_affine, reduces_across_processes, synced_on_cpu
from fastresnet.nn.plain import capturing, fx_leaf_call, hooked, refuse_script
from fastresnet.ops.conv_bn_act import conv_bn_act
from fastresnet.ops.layout import FLOAT_DTYPES


class _Chain:
    """One folded chain: the parent, the child names, and how many calls of the parent's forward are under
    way (its hooks count them). Pickled and deep-copied with the model; a copy starts with none under way."""

    def __init__(self, parent: nn.Module, conv: str, bn: str, relu: Optional[str]):
        self.parent, self.names, self.calls = parent, (conv, bn, relu), 0
        self.handles = (parent.register_forward_pre_hook(self.enter),
                        parent.register_forward_hook(self.exit, always_call=True))

    def __getstate__(self):
        return {**self.__dict__, "calls": 0}

    def enter(self, parent, args) -> None:
        self.calls += 1

    def exit(self, parent, args, output) -> None:
        self.calls -= 1

    def module(self, i: int) -> Optional[nn.Module]:
        name = self.names[i]
        return None if name is None else self.parent._modules.get(name)

    def intact(self) -> bool:
        """The parent still holds the folded trio (an attribute lookup per slot)."""
        return all(name is None or getattr(self.module(i), "__dict__", {}).get("fold_chain") is self
                   for i, name in enumerate(self.names))

    def folds(self, x) -> bool:
        """Whether the trio computes as one op at this call; each of the three asks, with the same answer."""
        if self.calls <= 0 or capturing(x) or not self.intact():
            return False
        trio = [self.module(i) for i in range(3)]
        return not any(m is not None and m.training for m in trio) and not hooked(trio)

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()


class _PassThroughWhileFolded:
    """Mixin for the BN and ReLU: while the chain folds, the conv before them applied them."""

    def forward(self, x):
        if isinstance(x, torch.fx.Proxy):
            return fx_leaf_call(self, x)
        if self.__dict__["fold_chain"].folds(x):
            return x
        if self.training and reduces_across_processes(self) and not x.is_cuda:  # torch's runs on GPUs only
            return synced_on_cpu(self, x, None, False)
        return super().forward(x)

    def __prepare_scriptable__(self):
        refuse_script(self)


class FoldedConv2d(nn.Conv2d):
    """nn.Conv2d that computes conv + the BN (+ ReLU) of its chain as one op while the chain folds; with
    gradients wanted, or a dtype the kernels do not take, the eager composition."""

    def forward(self, x):
        if isinstance(x, torch.fx.Proxy):
            return fx_leaf_call(self, x)
        chain = self.__dict__["fold_chain"]
        if not chain.folds(x):
            return super().forward(x)
        bn, relu = chain.module(1), chain.names[2] is not None
        if x.dtype not in FLOAT_DTYPES or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            y = super(_PassThroughWhileFolded, bn).forward(super().forward(x))  # the BN's own class's forward
            return F.relu(y) if relu else y
        scale, shift = folded_affine(bn)
        return conv_bn_act(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                           scale=scale, shift=shift, relu=relu)

    def __prepare_scriptable__(self):
        refuse_script(self)


class FoldedBatchNorm2d(_PassThroughWhileFolded, nn.BatchNorm2d):
    pass


class FoldedSyncBatchNorm(_PassThroughWhileFolded, nn.SyncBatchNorm):
    pass


class FoldedFrozenBatchNorm2d(_PassThroughWhileFolded, FrozenBatchNorm2d):
    pass


class FoldedReLU(_PassThroughWhileFolded, nn.ReLU):
    pass


# The classes a chain's modules may have (exactly), and their folded subclasses.
FOLDED = {nn.Conv2d: FoldedConv2d, nn.BatchNorm2d: FoldedBatchNorm2d, nn.SyncBatchNorm: FoldedSyncBatchNorm,
          FrozenBatchNorm2d: FoldedFrozenBatchNorm2d, nn.ReLU: FoldedReLU}
_FOLDED_CLASSES = tuple(FOLDED.values())
_PLAIN = {folded: plain for plain, folded in FOLDED.items()}


def _retyped(module: nn.Module, cls: type) -> nn.Module:
    """A new instance of cls sharing module's state: same tensors, same keys."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new.__dict__.pop("fold_chain", None)
    return new


def fold_chain(parent: nn.Module, conv_name: str, bn_name: str, relu_name: Optional[str]) -> None:
    """Replace parent's children conv -> bn (-> relu), called in that order by parent and of classes FOLDED
    names, by the folded trio."""
    chain = _Chain(parent, conv_name, bn_name, relu_name)
    for name in (conv_name, bn_name, relu_name):
        if name is not None:
            module = getattr(parent, name)
            folded = _retyped(module, FOLDED[type(module)])
            folded.__dict__["fold_chain"] = chain  # a plain attribute, not a submodule: the state_dict is unchanged
            setattr(parent, name, folded)


def unfold_chains(model: nn.Module) -> None:
    """Undo fold_chain in model: every folded module it holds back to its own class (sharing its state),
    the hooks of the chains whose parent it holds removed. A module it shares with another model is
    replaced here, not there: the other model's chains still fold."""
    for parent in list(model.modules()):
        for hook in list(parent._forward_pre_hooks.values()):
            if isinstance(getattr(hook, "__self__", None), _Chain):
                hook.__self__.remove_hooks()
        for name, child in list(parent._modules.items()):
            if isinstance(child, _FOLDED_CLASSES):
                setattr(parent, name, _retyped(child, _PLAIN[type(child)]))


def is_folded_conv(module: nn.Module) -> bool:
    return isinstance(module, FoldedConv2d)
