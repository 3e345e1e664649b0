"""conv_stats' candidates that have not run on a GPU.

Forward (op "conv_stats.forward"): "triton:<tile>", the kernel with another tile than its default (up to 3
more per shape class, kernels/experimental/tiles.py _stats_tile_candidates).

Backward (op "conv_stats.backward"), beside the main tree's "cudnn" (a recomputed and written, cuDNN's
dgrad and wgrad, the BatchNorm backward's two passes):
  "triton_wgrad"  Triton's wgrad normalises a on load (kernels/experimental/conv_train_bwd.py), so a is
                  never written; cuDNN's dgrad (which needs w, not a) and the two passes.
  "triton_dgrad"  cuDNN's wgrad on a recomputed a; Triton's stride-1 dgrad with the ReLU mask and the
                  BatchNorm backward's sums in its epilogue, so only the elementwise pass is left.
  "triton_bwd"    both Triton kernels: a never written, no reduction pass.
Every path runs every conv: where the Triton dgrad does not apply (stride 2, or no input gradient) a path
runs cuDNN's dgrad (or none) in its place, so a pin means the same for every conv of a model. The Triton
kernels' tiles are chosen in a second step inside those paths ("conv_wgrad.tile", "conv_dgrad.tile"), on
their first call, so that a path is timed with its best tile (this choice is timed inside the backward
op's body: it moves out with the paths, when a GPU run proves them).

Each is checked on its first call of a problem against the main tree's path.
"""

from __future__ import annotations

import functools

import torch

from fastresnet.experimental.common import checked, tiles_searched
from fastresnet.ops import conv_stats as ops
from fastresnet.ops import tuning
from fastresnet.ops.layout import as_rows, conv_output_shape, empty_conv_output, fits_int32, kernels

TRITON_TILE_PREFIX = "triton:"
BACKWARD_PATHS = ("triton_wgrad", "triton_dgrad", "triton_bwd")
WGRAD_TILE = tuning.Op("conv_wgrad.tile", {"triton": None})
DGRAD_TILE = tuning.Op("conv_dgrad.tile", {"triton": None})


def _train_bwd():
    from fastresnet.kernels.experimental import conv_train_bwd

    return conv_train_bwd


def _tile_names(tiles) -> list[str]:
    """"triton:<tile>" for each tile beside the default (the first), none with FASTRESNET_TILES=default."""
    return [TRITON_TILE_PREFIX + tile.name for tile in tiles[1:]] if tiles_searched() else []


def _tile(name: str):
    """The kernels' tile a candidate name stands for (None: the kernel's default)."""
    return None if name == "triton" else kernels().conv._TileConfig.from_name(name.removeprefix(TRITON_TILE_PREFIX))


def _choose_tile(op: tuning.Op, problem: tuple, x, names, run):
    """The tile to launch with (None: the default), each timed through run(tile), the others named by
    names(). The tiles are a GPU's: where nothing can be measured (Triton's interpreter) the default runs,
    pins too."""
    if not tuning.can_measure(x.device):
        return None
    return _tile(op.choose(problem, x.device, "triton", timed=lambda n: lambda: run(_tile(n)), args=(names,)))


# ---------------------------------------------------------------------------
# The forward's tiles
# ---------------------------------------------------------------------------


def _forward_tile(tile, x, weight, norm_mean, norm_invstd, norm_weight, norm_bias, stride, padding, eps):
    k = kernels()
    out = empty_conv_output(x, weight, stride, padding)
    norm = None if norm_mean is None else (norm_mean, norm_invstd, norm_weight, norm_bias)
    packed = weight.permute(0, 2, 3, 1).contiguous()
    mean_part, m2_part, rows = k.conv_train.conv_stats_fwd(x, packed, out, stride, padding, norm, tile)
    return (out, *k.bn_stats.finalize_stats(mean_part, m2_part, out.numel() // out.shape[1], rows, eps))


def _forward_default(x, weight, norm_mean, norm_invstd, norm_weight, norm_bias, stride, padding, eps):
    return ops._conv_stats(x, weight, norm_mean, norm_invstd, norm_weight, norm_bias, stride, padding, eps, "triton")


@functools.lru_cache(maxsize=None)
def forward_implementation(name: str):
    run = functools.partial(_forward_tile, _tile(name))
    return checked("conv_stats.forward", name, run, _forward_default, outputs=lambda out: out)


def forward_tile_names(x, weight, stride, padding) -> list[str]:
    """"triton:<tile>" for each tile beside the default worth timing; none where nothing is timed (the tile
    lists are a GPU's) or with FASTRESNET_TILES=default."""
    from fastresnet.kernels.experimental.tiles import _stats_tile_candidates

    if not (tuning.can_measure(x.device) and tiles_searched()):
        return []
    out = conv_output_shape(x.shape, weight.shape, stride, padding)
    tiles = _stats_tile_candidates(out[0] * out[2] * out[3], weight.shape[0], x.shape[1], x.element_size(), x.device)
    names = _tile_names(tiles)
    for name in names:
        ops.EXPERIMENTAL.setdefault(name, forward_implementation(name))
    return names


# ---------------------------------------------------------------------------
# The backward's Triton kernels
# ---------------------------------------------------------------------------


def _triton_weight_grad(grad_y, x, weight, norm, stride, padding):
    conv_train_bwd = _train_bwd()
    m = grad_y.shape[0] * grad_y.shape[2] * grad_y.shape[3]
    out_c = weight.shape[0]

    def run(tile):
        return conv_train_bwd.conv_wgrad(grad_y, x, out_c, weight.shape[2:], stride, padding, norm,
                                         interpreted=not x.is_cuda, tile=tile)

    problem = (tuple(weight.shape), tuple(stride), tuple(padding), x.shape, x.dtype, norm is not None, x.stride(),
               grad_y.stride())
    tile = _choose_tile(WGRAD_TILE, problem, x, lambda: _tile_names(
        conv_train_bwd._wgrad_tile_candidates(m, out_c, x.shape[1], x.element_size(), x.device)), run)
    return run(tile).permute(0, 3, 1, 2).to(weight.dtype)  # [Cout, Cin, KH, KW] with channels_last strides


def _triton_input_grad(grad_y, x, weight, norm, padding):
    """(grad_x, sum(g), sum(g * (x - mean))); the sums None without a BatchNorm on the input. A tile is
    timed with the sums of its partials (a smaller BLOCK_M leaves more of them)."""
    conv_train_bwd = _train_bwd()
    m = x.shape[0] * x.shape[2] * x.shape[3]

    def run(tile):
        g, sum_g_part, sum_gx_part = conv_train_bwd.conv_dgrad_bn(grad_y, weight, x, padding, norm,
                                                                  interpreted=not x.is_cuda, tile=tile)
        return (g, None, None) if sum_g_part is None else (g, sum_g_part.sum(0), sum_gx_part.sum(0))

    problem = (tuple(weight.shape), tuple(padding), x.shape, x.dtype, norm is not None, x.stride(), grad_y.stride())
    g, sum_g, sum_gxc = run(_choose_tile(DGRAD_TILE, problem, x, lambda: _tile_names(
        conv_train_bwd._dgrad_tile_candidates(m, x.shape[1], weight.shape[0], x.element_size(), norm is not None,
                                              x.device)), run))
    if norm is None:
        return g, None, None
    return conv_train_bwd.batch_norm_bwd_from_g(g, x, norm, sum_g, sum_gxc), sum_g, sum_gxc


def _cudnn_grads(grad_y, a, weight, stride, padding, input_grad: bool, weight_grad: bool):
    grad_a, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_y, a, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1, [input_grad, weight_grad, False])
    return grad_a, grad_w


def _normalised(x, norm):
    if norm is None:
        return x
    mean, invstd, weight, bias = norm
    return kernels().bn_act.affine_act_fwd(x, weight, bias, center=mean, invstd=invstd, relu=True)


def _backward(path, grad_y, x, weight, norm, stride, padding, input_grad):
    """(grad_x or None, grad_w, grad of the input norm's weight or None, of its bias or None) through `path`."""
    needs_grad_a = input_grad or norm is not None
    triton_wgrad = path in ("triton_wgrad", "triton_bwd")
    triton_dgrad = path in ("triton_dgrad", "triton_bwd") and tuple(stride) == (1, 1) and needs_grad_a
    cudnn_dgrad = needs_grad_a and not triton_dgrad
    grad_a = None
    if triton_wgrad:
        grad_w = _triton_weight_grad(grad_y, x, weight, norm, stride, padding)
        if cudnn_dgrad:  # cuDNN's dgrad reads w only: x stands in for a's shape
            grad_a, _ = _cudnn_grads(grad_y, x, weight, stride, padding, True, False)
    else:  # cuDNN's wgrad needs a in memory; its dgrad comes from the same call
        grad_a, grad_w = _cudnn_grads(grad_y, _normalised(x, norm), weight, stride, padding, cudnn_dgrad, True)
    if triton_dgrad:
        grad_x, sum_g, sum_gxc = _triton_input_grad(grad_y, x, weight, norm, padding)
        return grad_x, grad_w, None if norm is None else sum_gxc * norm[1], sum_g
    if grad_a is None or norm is None:
        return grad_a, grad_w, None, None
    mean, invstd, norm_weight, norm_bias = norm
    grad_x, sum_g, sum_gx, _ = kernels().bn_act.affine_act_bwd(
        as_rows(grad_a), x, norm_weight, norm_bias, center=mean, invstd=invstd, relu=True, param_grads=True,
        batch_stats=True)
    return grad_x, grad_w, sum_gx * invstd, sum_g


def _backward_applies(x, weight, stride, has_norm) -> bool:
    """The Triton backward kernels index in int32 (the output is at most x's pixels by weight's channels)."""
    return fits_int32(x.shape, (x.shape[0], weight.shape[0], *x.shape[2:]))


for _path in BACKWARD_PATHS:
    ops.EXPERIMENTAL[_path] = checked("conv_stats.backward", _path, functools.partial(_backward, _path),
                                      functools.partial(_backward, "cudnn"), outputs=lambda grads: grads)
    ops.CONV_STATS_BACKWARD.add_experimental(_path, _backward_applies)
ops.CONV_STATS_FORWARD.add_experimental(TRITON_TILE_PREFIX, forward_tile_names)
for _op in (WGRAD_TILE, DGRAD_TILE):
    _op.add_experimental(TRITON_TILE_PREFIX, lambda names: names())
