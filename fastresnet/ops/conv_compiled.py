"""conv + BatchNorm (+ residual) (+ ReLU) from a conv's and a BN's own tensors, as one op torch.compile can hold.

The fused inference modules (fastresnet.nn.inference_blocks, folded_layers)
keep folded and packed copies of each conv's weight and choose an
implementation per shape in Python (fastresnet.ops.conv, ops.dispatch):
identity and version checks, cached properties, CUDA-event timing, which
torch.compile cannot trace without graph breaks. Inside torch.compile they
call conv_bn_act_modules instead:

- where the fused kernels run (a GPU; Triton's interpreter in tests), the
  torch.library custom op fastresnet::conv_bn_act_inference: opaque to
  torch.compile, which traces its fake implementation (the output's shape,
  dtype and layout). At run time it does what the eager module does: the
  folded forms cached per conv weight and rebuilt when a source tensor
  changes (the same identity/pointer/version test), and the dispatch's
  choice per shape, timed on the op's first real call as in eager (under
  mode="max-autotune"/"reduce-overhead" that is CUDA graphs' warm-up run,
  which is not captured) or read from the disk cache;
- elsewhere, the eager reference, which torch.compile traces like any
  PyTorch code (as every op of fastresnet does on the CPU).

Under CUDA graphs (torch.compile's mode="reduce-overhead" or "max-autotune")
a replay runs the kernels captured with the folded weights of capture time:
weights or statistics changed in place afterwards are seen only after a
recompile (torch._dynamo.reset()), as with inductor's freezing. Without CUDA
graphs every call checks its sources, as in eager.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from fastresnet import backend
from fastresnet.fold import bn_scale_shift, scale_shift_from_statistics
from fastresnet.ops.conv import PreparedConvBN, compute_dtype, conv_bn_act_prepared, memory_format_of, tensor_key
from fastresnet.reference import conv_bn_act_reference

# conv weight -> (source key, PreparedConvBN); an entry dies with its weight tensor.
_PREPARED_BY_WEIGHT = WeakIdKeyDictionary()


def _prepared(weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, geometry, dtype) -> PreparedConvBN:
    sources = (weight, conv_bias, bn_weight, bn_bias, running_mean, running_var)
    key = (dtype, eps, geometry, *map(tensor_key, sources))
    entry = _PREPARED_BY_WEIGHT.get(weight)
    if entry is None or entry[0] != key:
        scale, shift = scale_shift_from_statistics(running_mean, running_var, bn_weight, bn_bias, eps, conv_bias)
        entry = (key, PreparedConvBN(weight.detach(), scale, shift, *geometry, dtype=dtype))
        _PREPARED_BY_WEIGHT[weight] = entry
    return entry[1]


@torch.library.custom_op("fastresnet::conv_bn_act_inference", mutates_args=())
def conv_bn_act_inference(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Tensor,
    conv_bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    relu: bool,
) -> Tensor:
    """relu(bn(conv(x)) + residual) in x's dtype, x's memory format; inference only."""
    geometry = (tuple(stride), tuple(padding), tuple(dilation), groups)
    prepared = _prepared(weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, geometry, x.dtype)
    out = conv_bn_act_prepared(x, prepared, residual, relu)
    # The layout the fake implementation promises; a no-op except where cuDNN picked
    # channels_last for an NCHW input (the folded weight is channels_last).
    return out.contiguous(memory_format=memory_format_of(x))


@conv_bn_act_inference.register_fake
def _(x, residual, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding,
      dilation, groups, relu):
    out_hw = [
        (size + 2 * pad - dil * (k - 1) - 1) // s + 1
        for size, k, s, pad, dil in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    ]
    shape = (x.shape[0], weight.shape[0], *out_hw)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


def conv_bn_act_modules(conv: nn.Conv2d, bn: nn.Module, x: Tensor, residual=None, relu=True) -> Tensor:
    """relu(bn(conv(x)) + residual) in eval mode, as torch.compile should see it (see the module docstring)."""
    dtype = compute_dtype(x)
    x = x.to(dtype)
    residual = residual.to(dtype) if residual is not None else None
    if not backend.use_triton(x):
        scale, shift = bn_scale_shift(bn, conv.bias)
        return conv_bn_act_reference(x, conv.weight.to(dtype), scale, shift, conv.stride, conv.padding, residual,
                                     relu, conv.dilation, conv.groups)
    return torch.ops.fastresnet.conv_bn_act_inference(
        x, residual, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
        float(getattr(bn, "eps", 1e-5)), list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups,
        relu,
    )
