"""When a fused module computes as the plain modules it stands for, so that every tool users point at a
converted model sees an ordinary PyTorch model.

- Graph captures made to outlive fastresnet (torch.fx's symbolic trace, torch.jit.trace, torch.export and the
  ONNX and AOTInductor exports built on it) record the plain modules' computation: standard ATen ops, no
  fastresnet custom op, so what they write runs where fastresnet is not installed. torch.compile keeps the
  fused paths: its code runs in this process.
- Hooks: while a hook is registered on a module that a fused path would not call (a block's conv1, bn1, relu,
  downsample, ...; a folded stem's conv1, bn1, relu), or a global module hook (torch.nn.modules.module's
  register_module_forward_hook and the like, as FlopCounterMode's module tracker registers), the fused module
  calls the plain modules instead: every hook sees what its module returns and a value it returns is used.
- torch.jit.script refuses fused modules with one line naming what works.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn
from torch.nn.modules import module as _module


def capturing(x) -> bool:
    """A graph capture records this call: FX's symbolic trace (x is its Proxy), torch.jit.trace, torch.export."""
    return isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_exporting()


def _has_hooks(module: Optional[nn.Module]) -> bool:
    return module is not None and bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                                       or module._backward_pre_hooks)


def hooked(modules: Iterable[Optional[nn.Module]]) -> bool:
    """Whether any of `modules` has a forward or backward hook, or a global module hook is registered."""
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
            or _module._global_backward_pre_hooks):
        return True
    return any(_has_hooks(m) for m in modules)


def fx_leaf_call(module: nn.Module, *args, **kwargs):
    """The call_module node FX's tracer records for a leaf module, for a module it would trace into (only
    torch.nn's own classes are leaves to it): the graph then calls the module as it is."""
    tracer = next(a for a in args if isinstance(a, torch.fx.Proxy)).tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, kwargs)


def refuse_script(module: nn.Module):
    """What a fused module's __prepare_scriptable__ does: TorchScript cannot compile the tuned Python paths."""
    raise RuntimeError(f"torch.jit.script cannot compile fastresnet's {type(module).__name__}: use torch.jit.trace "
                       "or torch.export on the converted model, or torch.jit.script(fastresnet.fold_bn(model)), "
                       "a plain copy")
