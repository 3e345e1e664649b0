"""Eager PyTorch references for every fused kernel.

One copy, used by the CPU fallback, the tests and the benchmarks. Each
function here is the definition of what the matching kernel in `kernels/`
must compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_bn_act_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    stride=1,
    padding=0,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """relu(conv2d(x, weight) * scale[c] + shift[c] + residual), in x's dtype.

    The conv runs in x's dtype; the epilogue in fp32 (as the kernel's), cast
    once at the end. Inference BatchNorm is the affine map
    scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale.
    """
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups).float()
    y = y * scale.float().view(1, -1, 1, 1) + shift.float().view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.float()
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.float().view(1, -1, 1, 1)


def affine_act_reference(x, scale, shift, residual=None, relu=True, center=None):
    """y = act((x - center[c]) * scale[c] + shift[c] + residual), computed in fp32,
    returned in x's dtype and memory format. Kernel: kernels/bn_act.py `_affine_act_fwd`."""
    z = x.float()
    if center is not None:
        z = z - _per_channel(center)
    z = z * _per_channel(scale) + _per_channel(shift)
    if residual is not None:
        z = z + residual.float()
    if relu:
        z = torch.relu(z)
    return z.to(x.dtype)


def batch_norm_act_reference(
    x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5, residual=None,
    relu=True
):
    """act(F.batch_norm(x) + residual): BatchNorm in fp32 (running stats updated
    in place by F.batch_norm, unbiased variance), then the residual add and ReLU.
    Kernels: kernels/bn_stats.py `_bn_stats_*` then kernels/bn_act.py `_affine_act_fwd`."""
    z = F.batch_norm(x.float(), running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        z = z + residual.float()
    if relu:
        z = torch.relu(z)
    return z.to(x.dtype)


# ---------------------------------------------------------------------------
# Training-time conv + BatchNorm fusion (kernels/conv_train.py, kernels/bn_stats.py)
# ---------------------------------------------------------------------------


def normalise_act_reference(x, mean, invstd, weight, bias, relu=True):
    """relu((x - mean) * invstd * weight + bias) in fp32, returned in x's dtype: the
    BatchNorm + ReLU that kernels/conv_train.py applies to its input on load."""
    z = (x.float() - _per_channel(mean)) * _per_channel(invstd * weight) + _per_channel(bias)
    return (torch.relu(z) if relu else z).to(x.dtype)


def conv_stats_reference(x, weight, stride=1, padding=0, norm_input=None, eps=1e-5):
    """(y, mean, invstd, unbiased var) with y = conv2d(a, weight) in x's dtype, where a is x, or
    normalise_act_reference(x, *norm_input) when norm_input = (mean, invstd, weight, bias) is given;
    mean and invstd = 1/sqrt(biased var + eps) are y's per-channel batch statistics in fp32 (of y as
    stored), ordinary differentiable tensors, so autograd through them is the full BatchNorm backward
    of whatever normalises y with them; the unbiased variance (for running_var) is detached.
    Kernel: kernels/conv_train.py `_conv_stats_fwd`."""
    a = x if norm_input is None else normalise_act_reference(x, *norm_input)
    y = F.conv2d(a, weight.to(x.dtype), None, stride, padding)
    m = y.numel() // y.shape[1]
    if m <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {y.size()}")
    var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), unbiased=False)
    return y, mean, torch.rsqrt(var + eps), (var * (m / (m - 1))).detach()
