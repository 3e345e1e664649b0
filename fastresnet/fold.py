"""Folding inference BatchNorm into the convolution before it.

In eval mode BatchNorm is a per-channel affine map of its input,

    bn(y) = (y - running_mean) / sqrt(running_var + eps) * gamma + beta
          = y * scale + shift,   scale = gamma / sqrt(running_var + eps),
                                 shift = beta - running_mean * scale,

so bn(conv(x, W) + b) = conv(x, W * scale) + (b * scale + shift): one conv with
a bias. `bn_scale_shift` gives (scale, shift) for torch's BatchNorm2d and for
the FrozenBatchNorm2d of torchvision's and timm's detection backbones; the
fused inference blocks keep them in the epilogue, `fold_bn` writes them into
the weights of a copy of the model.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

# Modules whose forward runs their children one after another, in order.
_SEQUENTIAL_CLASS_NAMES = {"Sequential", "IntermediateLayerGetter"}
# Modules known to compute bn{i}(conv{i}(x)) for each pair of children conv{i}, bn{i}.
_CONV_BN_PAIR_CLASS_NAMES = {"ResNet", "CifarResNet", "BasicBlock", "Bottleneck"}
_RESNET_MODULES = ("torchvision.models.resnet", "timm.models.resnet", "fastresnet.models")


def is_batchnorm(module: nn.Module) -> bool:
    """torch's BatchNorm2d, or a FrozenBatchNorm2d (torchvision.ops.misc, timm.layers)."""
    if isinstance(module, nn.BatchNorm2d):
        return True
    return type(module).__name__ == "FrozenBatchNorm2d" and all(
        hasattr(module, a) for a in ("weight", "bias", "running_mean", "running_var")
    )


def foldable_reason(bn: nn.Module) -> str | None:
    """Why this BatchNorm cannot be folded, or None if it can."""
    if not is_batchnorm(bn):
        return f"{type(bn).__name__} is not a BatchNorm2d or FrozenBatchNorm2d"
    if getattr(bn, "running_mean", None) is None:
        return "BatchNorm2d without running statistics (track_running_stats=False) normalizes by batch statistics"
    if type(bn) not in (nn.BatchNorm2d,) and isinstance(bn, nn.BatchNorm2d):
        return f"{type(bn).__name__} subclasses BatchNorm2d with a forward of its own"
    return None


def bn_scale_shift(bn: nn.Module, conv_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in fp32 with bn(y + conv_bias) = y * scale + shift, from the running statistics."""
    eps = getattr(bn, "eps", 1e-5)
    return scale_shift_from_statistics(bn.running_mean, bn.running_var, bn.weight, bn.bias, eps, conv_bias)


def scale_shift_from_statistics(
    running_mean, running_var, weight=None, bias=None, eps: float = 1e-5, conv_bias=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """bn_scale_shift from the BN's tensors themselves (weight/bias None mean 1/0)."""
    var = running_var.detach().float()
    mean = running_mean.detach().float()
    gamma = torch.ones_like(var) if weight is None else weight.detach().float()
    beta = torch.zeros_like(var) if bias is None else bias.detach().float()
    scale = gamma * torch.rsqrt(var + eps)
    shift = beta - mean * scale
    if conv_bias is not None:
        shift = shift + conv_bias.detach().float() * scale
    return scale, shift


def folded_conv(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A new Conv2d (with bias) computing bn(conv(x)) in eval mode; folding in fp32, then the conv's dtype."""
    scale, shift = bn_scale_shift(bn, conv.bias)
    weight = conv.weight.detach()
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        conv.groups, bias=True, padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(weight.float() * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(shift)
    return fused


def _is_conv_bn_pair_module(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ in _CONV_BN_PAIR_CLASS_NAMES and cls.__module__.startswith(_RESNET_MODULES)


def _fold_children(module: nn.Module) -> int:
    """Fold the conv-BN pairs among `module`'s direct children in place; returns how many."""
    children = list(module.named_children())
    pairs = []
    if type(module).__name__ in _SEQUENTIAL_CLASS_NAMES:
        pairs = [(a, b) for (a, _), (b, _) in zip(children, children[1:])]
    elif _is_conv_bn_pair_module(module):
        names = dict(children)
        pairs = [(n, "bn" + n[4:]) for n in names if n.startswith("conv") and "bn" + n[4:] in names]
    folded = 0
    for conv_name, bn_name in pairs:
        conv, bn = getattr(module, conv_name), getattr(module, bn_name)
        if type(conv) is nn.Conv2d and foldable_reason(bn) is None:
            setattr(module, conv_name, folded_conv(conv, bn))
            setattr(module, bn_name, nn.Identity())
            folded += 1
    return folded


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every BatchNorm that directly follows a conv folded into it.

    The folded BatchNorms become nn.Identity and their convs gain a bias, so
    the copy's state_dict differs from the original's (use
    fastresnet.convert(mode="inference") to keep it). A conv-BN pair is
    recognised among the children of sequential containers (nn.Sequential,
    torchvision's IntermediateLayerGetter) and as conv{i}/bn{i} children of the
    ResNet modules of torchvision, timm and fastresnet; other BatchNorms stay.
    The original model is not modified.
    """
    folded_model = copy.deepcopy(model).eval()
    count = sum(_fold_children(m) for m in list(folded_model.modules()))
    folded_model.folded_bn_count = count
    return folded_model
