"""Folding inference BatchNorm into the convolution before it: `fold_bn(model)`.

In eval mode BatchNorm is a per-channel affine map of its input,

    bn(y) = (y - running_mean) / sqrt(running_var + eps) * weight + bias
          = y * scale + shift,   scale = weight / sqrt(running_var + eps),
                                 shift = bias - running_mean * scale,

so bn(conv(x, W) + b) = conv(x, W * scale) + (b * scale + shift): one conv with a bias. The fused
inference ops keep (scale, shift) in their epilogue (fastresnet.ops.conv_bn_act.bn_scale_shift, the one
implementation of the formula); fold_bn writes them into the weights of a copy of the model.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from fastresnet.nn.recognise import conv_bn_chains, foldable_reason
from fastresnet.ops.conv_bn_act import bn_scale_shift


def folded_conv(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A new Conv2d (with bias) computing bn(conv(x)) in eval mode; folding in fp32, then the conv's dtype."""
    scale, shift = bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, getattr(bn, "eps", 1e-5),
                                  conv.bias)
    weight = conv.weight.detach()
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                      conv.groups, bias=True, padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight.float() * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(shift)
    return fused


def _fold_children(module: nn.Module) -> int:
    """Fold the conv-BN pairs among `module`'s direct children in place; returns how many."""
    folded = 0
    for conv_name, bn_name, _ in conv_bn_chains(module, in_blocks=True):
        conv, bn = getattr(module, conv_name), getattr(module, bn_name)
        if type(conv) is nn.Conv2d and foldable_reason(bn) is None:
            setattr(module, conv_name, folded_conv(conv, bn))
            setattr(module, bn_name, nn.Identity())
            folded += 1
    return folded


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every BatchNorm that directly follows a conv folded into it.

    The folded BatchNorms become nn.Identity and their convs gain a bias, so the copy's state_dict
    differs from the original's (use fastresnet.convert(mode="inference") to keep it). A conv-BN pair is
    recognised where fastresnet.nn.recognise.conv_bn_chains finds one: neighbours in sequential
    containers, and the conv{i}/bn{i} children of the ResNets and blocks of torchvision, timm and
    fastresnet; other BatchNorms stay. The original model is not modified.
    """
    folded_model = copy.deepcopy(model).eval()
    folded_model.folded_bn_count = sum(_fold_children(m) for m in list(folded_model.modules()))
    return folded_model
