"""conv_stats' backward: cuDNN or Triton for each of its two GEMMs, chosen per shape by measurement.

conv_stats computed y = conv(a, w) with a = x, or a = relu(bn(x)) normalised on
load from the raw x and x's batch statistics. Its backward needs

  grad_w = wgrad(grad_y, a)                       (a GEMM over the output pixels)
  grad_a = dgrad(grad_y, w)                       (a GEMM over the output channels)
  grad_x, dgamma, dbeta = BatchNorm + ReLU backward of grad_a (batch statistics)

Four ways to run it, all on the real inputs (fastresnet.ops.dispatch times
them once per shape on a GPU, keeps the fastest, and caches the choice):

  "cudnn"         a recomputed and written (one elementwise pass), cuDNN's dgrad and
                  wgrad in one call, then the BatchNorm backward's two passes (a
                  reduction and an elementwise pass). The fixed rule.
  "triton_wgrad"  Triton's wgrad normalises a on load (kernels/conv_train_bwd.py), so a
                  is never written; cuDNN's dgrad (which needs w, not a) and the two passes.
  "triton_dgrad"  cuDNN's wgrad on a recomputed a; Triton's stride-1 dgrad with the ReLU
                  mask and the BatchNorm backward's sums in its epilogue, so only the
                  elementwise pass is left.
  "triton_bwd"    both Triton kernels: a never written, no reduction pass.

The Triton kernels' tiles are measured per shape too, in a second step inside
these paths (fastresnet.ops.conv_train_tiles). Stride-2 dgrad is cuDNN's in every path (there the last two equal the first two
and are not measured). On the CPU (Triton's interpreter) the fixed rule runs
unless a path is asked for: conv_stats(..., backward=NAME), the variable
FASTRESNET_CONV_BACKWARD=NAME (for whole models; benchmarks), or
FASTRESNET_DISPATCH=NAME.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from fastresnet.ops import conv_train_tiles, dispatch

BACKWARD_PATHS = ("cudnn", "triton_wgrad", "triton_dgrad", "triton_bwd")
FIXED_BACKWARD = "cudnn"
BACKWARD_ENV = "FASTRESNET_CONV_BACKWARD"

_choices: dict[tuple, str] = {}  # problem signature -> measured choice (no key string on the hot path)

Norm = Optional[tuple[Tensor, Tensor, Tensor, Tensor]]  # (mean, invstd, gamma, beta) of x, fp32


def _kernels():
    from fastresnet.kernels import bn_act, conv_train_bwd

    return bn_act, conv_train_bwd


def clear_choices() -> None:
    """Forget the in-process path choices (dispatch's own memory is cleared separately)."""
    _choices.clear()


def check_backward_path(name: str) -> str:
    if name != "auto" and name not in BACKWARD_PATHS:
        raise ValueError(f"conv_stats backward {name!r}: expected 'auto' or one of {BACKWARD_PATHS}")
    return name


def _triton_dgrad_applies(stride: Sequence[int]) -> bool:
    return tuple(stride) == (1, 1)


def _parts(path: str, stride: Sequence[int]) -> tuple[bool, bool]:
    """(Triton wgrad, Triton dgrad) for a path name; dgrad falls back to cuDNN at stride 2."""
    triton_wgrad = path in ("triton_wgrad", "triton_bwd")
    triton_dgrad = path in ("triton_dgrad", "triton_bwd") and _triton_dgrad_applies(stride)
    return triton_wgrad, triton_dgrad


def candidates(stride: Sequence[int], needs_grad_a: bool) -> list[str]:
    """The paths that differ for this conv (the ones worth timing)."""
    paths = ["cudnn", "triton_wgrad"]
    if needs_grad_a and _triton_dgrad_applies(stride):
        paths += ["triton_dgrad", "triton_bwd"]
    return paths


# ---------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------


def _normalised(x: Tensor, norm: Norm) -> Tensor:
    bn_act, _ = _kernels()
    if norm is None:
        return x
    mean, invstd, gamma, beta = norm
    return bn_act.affine_act_fwd(x, gamma, beta, center=mean, invstd=invstd, relu=True)


def _rows(t: Tensor) -> Tensor:
    bn_act, _ = _kernels()
    return t if bn_act.has_row_strides(t) else t.contiguous(memory_format=torch.channels_last)


def _bn_relu_backward(grad_a: Tensor, x: Tensor, norm) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, sum(g), sum(g * (x - mean))) by issue 3's two passes."""
    bn_act, _ = _kernels()
    mean, invstd, gamma, beta = norm
    grad_x, sum_g, sum_gxc, _ = bn_act.affine_act_bwd(
        _rows(grad_a), x, gamma, beta, center=mean, invstd=invstd, relu=True, param_grads=True, batch_stats=True,
    )
    return grad_x, sum_g, sum_gxc


def _triton_weight_grad(grad_y: Tensor, x: Tensor, weight: Tensor, norm, stride, padding) -> Tensor:
    _, conv_train_bwd = _kernels()
    tile = conv_train_tiles.choose_wgrad_tile(grad_y, x, weight, stride, padding, norm)  # measured per shape
    packed = conv_train_bwd.conv_wgrad(
        grad_y, x, weight.shape[0], weight.shape[2:], stride, padding, norm, interpreted=x.device.type == "cpu",
        tile=None if tile is None else conv_train_tiles.tile_from_name(tile),
    )
    return packed.permute(0, 3, 1, 2).to(weight.dtype)  # [Cout, Cin, KH, KW] with channels_last strides


def _triton_input_grad(grad_y: Tensor, x: Tensor, weight: Tensor, norm, padding):
    """(grad_x, sum(g), sum(g * (x - mean))); the sums None without a BatchNorm on the input."""
    _, conv_train_bwd = _kernels()
    tile = conv_train_tiles.choose_dgrad_tile(grad_y, x, weight, padding, norm)  # measured per shape
    g, sum_g_part, sum_gx_part = conv_train_bwd.conv_dgrad_bn(
        grad_y, weight, x, padding, norm, interpreted=x.device.type == "cpu",
        tile=None if tile is None else conv_train_tiles.tile_from_name(tile),
    )
    if norm is None:
        return g, None, None
    sum_g, sum_gxc = sum_g_part.sum(0), sum_gx_part.sum(0)
    return conv_train_bwd.batch_norm_bwd_from_g(g, x, norm, sum_g, sum_gxc), sum_g, sum_gxc


def _cudnn_grads(grad_y, a, weight, stride, padding, input_grad: bool, weight_grad: bool):
    grad_a, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_y, a, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
        [input_grad, weight_grad, False],
    )
    return grad_a, grad_w


# ---------------------------------------------------------------------------
# One path, and the choice
# ---------------------------------------------------------------------------


def run_backward(path: str, grad_y: Tensor, x: Tensor, weight: Tensor, norm: Norm,
                 stride: Sequence[int], padding: Sequence[int], input_grad: bool):
    """(grad_x or None, grad_w, sum(g) or None, sum(g * (x - mean)) or None) through `path`.

    grad_x is the gradient w.r.t. the raw x (through its BatchNorm with batch statistics)
    when norm is given or input_grad; the sums are the BatchNorm's dbeta and dgamma / invstd."""
    needs_grad_a = input_grad or norm is not None
    triton_wgrad, triton_dgrad = _parts(path, stride)
    triton_dgrad = triton_dgrad and needs_grad_a
    cudnn_dgrad = needs_grad_a and not triton_dgrad
    grad_a = None
    if triton_wgrad:
        grad_w = _triton_weight_grad(grad_y, x, weight, norm, stride, padding)
        if cudnn_dgrad:  # cuDNN's dgrad reads w only: x stands in for a's shape
            grad_a, _ = _cudnn_grads(grad_y, x, weight, stride, padding, True, False)
    else:  # cuDNN's wgrad needs a in memory; its dgrad comes from the same call
        a = _normalised(x, norm)
        grad_a, grad_w = _cudnn_grads(grad_y, a, weight, stride, padding, cudnn_dgrad, True)
        del a
    if triton_dgrad:
        grad_x, sum_g, sum_gxc = _triton_input_grad(grad_y, x, weight, norm, padding)
        return grad_x, grad_w, sum_g, sum_gxc
    if grad_a is None or norm is None:
        return grad_a, grad_w, None, None
    grad_x, sum_g, sum_gxc = _bn_relu_backward(grad_a, x, norm)
    return grad_x, grad_w, sum_g, sum_gxc


def _requested() -> Optional[str]:
    """A path forced by FASTRESNET_CONV_BACKWARD, or by FASTRESNET_DISPATCH naming one of ours."""
    forced = os.environ.get(BACKWARD_ENV, "").strip()
    if forced:
        return check_backward_path(forced)
    mode = dispatch.dispatch_mode()
    if mode in BACKWARD_PATHS:
        return mode
    return FIXED_BACKWARD if mode != "measure" else None  # "fixed", or another op's candidate name


def _problem_key(x, weight, grad_y, stride, padding, norm, input_grad) -> str:
    layout = "cl" if x.is_contiguous(memory_format=torch.channels_last) else "any"
    return (f"conv_stats_backward:{weight.shape[0]}x{weight.shape[1]}k{weight.shape[2]}x{weight.shape[3]}"
            f"s{stride[0]}p{padding[0]}:x{'x'.join(map(str, x.shape))}:{str(x.dtype).removeprefix('torch.')}"
            f":norm{int(norm is not None)}:xgrad{int(input_grad)}:{layout}")


def timed_runs(grad_y: Tensor, x: Tensor, weight: Tensor, norm: Norm, stride: Sequence[int],
               padding: Sequence[int], input_grad: bool) -> dict:
    """The candidates the dispatch times: each path on the real tensors. The Triton kernels entered
    before running on a GPU, so each Triton path's first (untimed) call is compared with cuDNN's
    gradients, and one that is off is left out however fast (wrong gradients would train wrong)."""
    names = candidates(stride, input_grad or norm is not None)
    runs = {
        name: (lambda name=name: run_backward(name, grad_y, x, weight, norm, stride, padding, input_grad))
        for name in names
    }
    expected = functools.cache(runs[FIXED_BACKWARD])
    for name in names:
        if name != FIXED_BACKWARD:
            runs[name] = dispatch.checked_on_first_call("conv_stats backward", name, runs[name], expected,
                                                        lambda grads: grads)
    return runs


def choose_backward(requested: str, grad_y: Tensor, x: Tensor, weight: Tensor, norm: Norm,
                    stride: Sequence[int], padding: Sequence[int], input_grad: bool) -> str:
    """The path to run: the requested one, else (requested == "auto") the environment's, else the
    fastest by measurement on a GPU (the fixed rule where nothing can be measured: the CPU, or
    inside CUDA-graph capture before any measurement). A choice measured earlier (CUDA graphs'
    uncaptured warm-up run) is what a capture records."""
    if requested != "auto":
        return requested
    forced = _requested()
    if forced is not None:
        return forced
    signature = (tuple(x.shape), x.stride(), x.dtype, x.device, tuple(weight.shape), grad_y.stride(), tuple(stride),
                 tuple(padding), norm is not None, input_grad)
    choice = _choices.get(signature)
    if choice is None:
        if not x.is_cuda or torch.cuda.is_current_stream_capturing():  # nothing to measure, or no sync allowed
            return FIXED_BACKWARD
        runs = timed_runs(grad_y, x, weight, norm, stride, padding, input_grad)
        key = _problem_key(x, weight, grad_y, stride, padding, norm, input_grad)
        choice = dispatch.choose(key, runs, FIXED_BACKWARD, x.device)
        _choices[signature] = choice
    return choice
