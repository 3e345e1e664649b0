"""batch_norm_act's CPU candidate that has not won on a CPU yet:

  "inductor"   the training BatchNorm (+ add) (+ ReLU) as one function compiled by Inductor, once per problem
               (shapes, strides, dtype, residual, ReLU): its generated C++ reads the input once for the
               statistics and once for the output, and its backward is compiled with it; ops
               batch_norm_act.forward and batch_norm_act.step on a CPU's own route.

On an AVX2 EPYC (2 cores, torch 2.14) it lost to ATen's BatchNorm at all three of ResNet-20's stages
(batch 128, channels_last, forward + backward: about 0.2x-0.4x of eager's speed, bench/RESULTS.md, CPU
section), and its compile costs seconds per problem, more than a short run saves: it stays on the shelf
until a CPU where it wins is recorded. Checked on its first call of a problem against plain PyTorch's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastresnet import backend
from fastresnet.experimental.common import checked
from fastresnet.ops import bn_act as ops

_compiled: dict[tuple, object] = {}


def _train(x: Tensor, weight, bias, residual, eps: float, relu: bool):
    """(y, batch mean, unbiased batch variance) of a training BatchNorm (+ add) (+ ReLU), in x's dtype."""
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
    scale = torch.rsqrt(var + eps)
    scale = scale * weight if weight is not None else scale
    shift = -mean * scale + (bias if bias is not None else 0.0)
    y = x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.float()
    if relu:
        y = torch.relu(y)
    rows = x.numel() // x.shape[1]
    return y.to(x.dtype), mean.detach(), (var * (rows / (rows - 1))).detach()


def _inductor(x, running_mean, running_var, weight, bias, training, momentum, eps, residual, relu):
    key = (ops._problem(x, residual, relu), weight is None, bias is None, eps)
    fn = _compiled.get(key)
    if fn is None:  # one compiled function per problem: no recompiles, no cache-size limit shared
        fn = _compiled[key] = torch.compile(_train, dynamic=False)
    y, mean, var_unbiased = fn(x, weight, bias, residual, eps, relu)
    ops.update_running_stats(running_mean, running_var, mean, var_unbiased, momentum)
    return y


ops.EXPERIMENTAL_CPU["inductor"] = checked("batch_norm_act.step", "inductor", _inductor, ops._eager)
for op in (ops.BN_FORWARD, ops.BN_STEP):
    op.add_experimental("inductor", backend.cpu_route)
