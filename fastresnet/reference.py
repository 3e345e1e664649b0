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
    scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale.
    """
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups).float()
    y = y * scale.float().view(1, -1, 1, 1) + shift.float().view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.float()
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype)
