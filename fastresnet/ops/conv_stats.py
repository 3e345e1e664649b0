"""Training conv + BatchNorm fusion: a conv that emits its output's BatchNorm statistics, as a torch op.

A BatchNorm training chain conv -> bn -> relu -> conv -> bn ... becomes

    y1, mean1, invstd1, var1 = conv_stats(x, w1)                                # statistics in the epilogue
    y2, mean2, invstd2, var2 = conv_stats(y1, w2, norm_input=(mean1, invstd1, g1, b1))  # bn1 + relu on load
    out = bn_act_stats(y2, mean2, invstd2, g2, b2, residual=identity)          # bn2 + add + relu, one pass

(bn_act_stats: fastresnet.ops.bn_act). Only raw conv outputs are written; a normalised activation
never is. mean and invstd (1 / sqrt(biased var + eps)) are fp32 and non-differentiable outputs: the
next op's backward is the *full* BatchNorm backward, which accounts for their dependence on the raw
input. The unbiased variance is for running_var.

The forward kernel's tile is chosen per shape (op "conv_stats.tile"), and so is the backward
(op "conv_stats.backward"), which needs grad_w = wgrad(grad_y, a), grad_a = dgrad(grad_y, w), then
grad_x, dgamma, dbeta through the previous BatchNorm + ReLU:

  "cudnn"         a recomputed and written (one elementwise pass), cuDNN's dgrad and wgrad in one call,
                  then the BatchNorm backward's two passes. The fixed rule.
  "triton_wgrad"  Triton's wgrad normalises a on load (kernels/conv_train_bwd.py), so a is never
                  written; cuDNN's dgrad (which needs w, not a) and the two passes.
  "triton_dgrad"  cuDNN's wgrad on a recomputed a; Triton's stride-1 dgrad with the ReLU mask and the
                  BatchNorm backward's sums in its epilogue, so only the elementwise pass is left.
  "triton_bwd"    both Triton kernels: a never written, no reduction pass.
Every path runs every conv: where the Triton dgrad does not apply (stride 2, or no input gradient) a
path runs cuDNN's dgrad (or none) in its place, so a pin means the same for every conv of a model.
The Triton kernels' tiles are chosen in a second step inside those paths ("conv_wgrad.tile",
"conv_dgrad.tile"), on their first call, so a path is timed with its best tile.

As in fastresnet.ops.bn_act, the path is chosen in Python before any op is called
(backend.use_triton): the Triton kernels as torch.library custom ops (opaque to torch.compile, which
sees their fake implementations), or the eager reference, whose statistics are ordinary
differentiable tensors, so autograd through it gives the same gradients.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastresnet import backend
from fastresnet.ops import tuning
from fastresnet.ops.bn_act import batch_norm_backward_kernels
from fastresnet.ops.layout import FLOAT_DTYPES, bn_kernels, empty_conv_output, layout_name, pair, with_strides_of
from fastresnet.reference import conv_stats_reference

BACKWARD = tuning.Tuned("conv_stats.backward")
STATS_TILE = tuning.Tuned("conv_stats.tile")
WGRAD_TILE = tuning.Tuned("conv_wgrad.tile")
DGRAD_TILE = tuning.Tuned("conv_dgrad.tile")

BACKWARD_PATHS = ("cudnn", "triton_wgrad", "triton_dgrad", "triton_bwd")
FIXED_BACKWARD = "cudnn"
TILE_PREFIX = "tile:"

Norm = Optional[tuple[Tensor, Tensor, Tensor, Tensor]]  # (mean, invstd, gamma, beta) of x, fp32


def _kernels():
    # Imported on first use: TRITON_INTERPRET must be set before the import.
    from fastresnet.kernels import bn_stats, conv, conv_train, conv_train_bwd

    return bn_stats, conv, conv_train, conv_train_bwd


def _tile(name: str):
    """The kernels' tile a candidate name stands for ("rule": None, the kernel's own rule)."""
    return None if name == "rule" else _kernels()[1]._TileConfig.from_name(name.removeprefix(TILE_PREFIX))


def _tile_key(kind: str, x: Tensor, weight_shape: Sequence[int], stride, padding, norm: bool) -> str:
    out_c, in_c, kh, kw = weight_shape
    return (f"conv_{kind}.tile:{out_c}x{in_c}k{kh}x{kw}s{stride[0]}x{stride[1]}p{padding[0]}x{padding[1]}"
            f":x{'x'.join(map(str, x.shape))}:{str(x.dtype).removeprefix('torch.')}:norm{int(norm)}:{layout_name(x)}")


def _tile_names(tiles) -> list[str]:
    """"rule" for the fixed rule's tile (the first), "tile:<name>" for the others."""
    return ["rule"] + [TILE_PREFIX + tile.name for tile in tiles[1:]]


def _choose_tile(tuned: tuning.Tuned, signature: tuple, x: Tensor, names, key, run, expected=None,
                 outputs=lambda out: (out,)):
    """The tile to launch with (None: the kernel's rule), each candidate timed through run(tile). The tiles
    are a GPU's: where nothing can be measured (Triton's interpreter) the kernel's rule runs, pins too."""
    if not tuning.can_measure(x.device):
        return None
    name = tuned.choose(signature, x.device, names=names, fixed="rule", key=key, expected=expected, outputs=outputs,
                        runs=lambda allowed: {n: (lambda n=n: run(_tile(n))) for n in allowed})
    return _tile(name)


# ---------------------------------------------------------------------------
# The forward: conv with statistics
# ---------------------------------------------------------------------------


def stats_tile(x: Tensor, packed: Tensor, out: Tensor, stride, padding, norm_input, eps: float):
    """The tile of conv_stats' kernel for this problem (None: its rule). A timed tile writes `out`, which the
    real run then overwrites; a tile that has not run on a GPU is checked against the rule's, run into a
    buffer of its own."""
    _, _, conv_train, _ = _kernels()
    m = out.shape[0] * out.shape[2] * out.shape[3]
    out_c, kh, kw, in_c = packed.shape
    signature = (x.shape, x.stride(), x.dtype, packed.shape, out.stride(), tuple(stride), tuple(padding),
                 norm_input is not None)
    return _choose_tile(
        STATS_TILE, signature, x,
        names=lambda: _tile_names(conv_train._stats_tile_candidates(m, out_c, in_c, x.element_size(), x.device)),
        key=lambda: _tile_key("stats", x, (out_c, in_c, kh, kw), stride, padding, norm_input is not None),
        run=lambda tile: _run_into(out, x, packed, stride, padding, norm_input, eps, tile),
        expected=lambda: _run_into(torch.empty_like(out), x, packed, stride, padding, norm_input, eps, None),
        outputs=lambda result: result,
    )


def _run_into(out, x, packed, stride, padding, norm_input, eps, tile):
    return (out, *run_conv_stats(x, packed, out, stride, padding, norm_input, eps, tile))


def run_conv_stats(x, packed, out, stride, padding, norm_input, eps, tile):
    """The Triton conv with `tile` (None: its rule) into `out`: (mean, invstd, unbiased var) of out."""
    bn_stats, _, conv_train, _ = _kernels()
    mean_part, m2_part, rows = conv_train.conv_stats_fwd(x, packed, out, stride, padding, norm_input,
                                                         x.device.type == "cpu", tile)
    return bn_stats.finalize_stats(mean_part, m2_part, out.shape[0] * out.shape[2] * out.shape[3], rows, eps)


@torch.library.custom_op("fastresnet::conv_stats", mutates_args=())
def _conv_stats_op(x: Tensor, weight: Tensor, in_mean: Optional[Tensor], in_invstd: Optional[Tensor],
                   in_gamma: Optional[Tensor], in_beta: Optional[Tensor], stride: Sequence[int],
                   padding: Sequence[int], eps: float, use_cudnn: bool, backward: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, unbiased var). use_cudnn: cuDNN's conv on a transient normalised input, then a
    statistics pass. backward: the backward path (BACKWARD_PATHS or "auto"), for the autograd formula."""
    norm = None if in_mean is None else (in_mean, in_invstd, in_gamma, in_beta)
    out = empty_conv_output(x, weight, stride, padding)
    if use_cudnn:
        a = _normalised(x, norm)
        y = torch.ops.aten.convolution(a, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1)
        y = with_strides_of(y, out)
        return (y, *bn_kernels().bn_stats(y, eps))
    packed = weight.permute(0, 2, 3, 1).contiguous()  # [Cout, KH, KW, Cin]: free for a channels_last weight
    tile = stats_tile(x, packed, out, stride, padding, norm, eps)  # measured here, where the inputs are real
    bn_stats, _, conv_train, _ = _kernels()
    mean_part, m2_part, rows = conv_train.conv_stats_fwd(x, packed, out, stride, padding, norm, x.device.type == "cpu",
                                                         tile)
    return (out, *bn_stats.finalize_stats(mean_part, m2_part, out.numel() // out.shape[1], rows, eps))


@_conv_stats_op.register_fake
def _(x, weight, in_mean, in_invstd, in_gamma, in_beta, stride, padding, eps, use_cudnn, backward):
    out = empty_conv_output(x, weight, stride, padding)
    stat = x.new_empty(weight.shape[0], dtype=torch.float32)
    return out, stat, torch.empty_like(stat), torch.empty_like(stat)


# ---------------------------------------------------------------------------
# The backward: cuDNN or Triton for each of its two GEMMs
# ---------------------------------------------------------------------------


def _normalised(x: Tensor, norm: Norm) -> Tensor:
    """a = relu(bn(x)) written (for cuDNN, which cannot normalise on load), or x."""
    if norm is None:
        return x
    mean, invstd, gamma, beta = norm
    return bn_kernels().affine_act_fwd(x, gamma, beta, center=mean, invstd=invstd, relu=True)


def _triton_weight_grad(grad_y: Tensor, x: Tensor, weight: Tensor, norm, stride, padding) -> Tensor:
    conv_train_bwd = _kernels()[3]
    m = grad_y.shape[0] * grad_y.shape[2] * grad_y.shape[3]
    out_c = weight.shape[0]

    def run(tile):
        return conv_train_bwd.conv_wgrad(grad_y, x, out_c, weight.shape[2:], stride, padding, norm,
                                         interpreted=x.device.type == "cpu", tile=tile)

    tile = _choose_tile(
        WGRAD_TILE, (x.shape, x.stride(), x.dtype, weight.shape, grad_y.stride(), tuple(stride), tuple(padding),
                     norm is not None), x,
        names=lambda: _tile_names(conv_train_bwd._wgrad_tile_candidates(m, out_c, x.shape[1], x.element_size(),
                                                                         x.device)),
        key=lambda: _tile_key("wgrad", x, weight.shape, stride, padding, norm is not None), run=run,
    )
    return run(tile).permute(0, 3, 1, 2).to(weight.dtype)  # [Cout, Cin, KH, KW] with channels_last strides


def _triton_input_grad(grad_y: Tensor, x: Tensor, weight: Tensor, norm, padding):
    """(grad_x, sum(g), sum(g * (x - mean))); the sums None without a BatchNorm on the input. A tile is
    timed with the sums of its partials (a smaller BLOCK_M leaves more of them)."""
    conv_train_bwd = _kernels()[3]
    m = x.shape[0] * x.shape[2] * x.shape[3]

    def run(tile):
        g, sum_g_part, sum_gx_part = conv_train_bwd.conv_dgrad_bn(grad_y, weight, x, padding, norm,
                                                                  interpreted=x.device.type == "cpu", tile=tile)
        return (g, None, None) if sum_g_part is None else (g, sum_g_part.sum(0), sum_gx_part.sum(0))

    tile = _choose_tile(
        DGRAD_TILE, (x.shape, x.stride(), x.dtype, weight.shape, grad_y.stride(), tuple(padding), norm is not None),
        x,
        names=lambda: _tile_names(conv_train_bwd._dgrad_tile_candidates(m, x.shape[1], weight.shape[0],
                                                                         x.element_size(), norm is not None,
                                                                         x.device)),
        key=lambda: _tile_key("dgrad", x, weight.shape, (1, 1), padding, norm is not None), run=run,
        outputs=lambda result: result,
    )
    g, sum_g, sum_gxc = run(tile)
    if norm is None:
        return g, None, None
    return conv_train_bwd.batch_norm_bwd_from_g(g, x, norm, sum_g, sum_gxc), sum_g, sum_gxc


def _cudnn_grads(grad_y, a, weight, stride, padding, input_grad: bool, weight_grad: bool):
    grad_a, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_y, a, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1, [input_grad, weight_grad, False]
    )
    return grad_a, grad_w


def run_backward(path: str, grad_y: Tensor, x: Tensor, weight: Tensor, norm: Norm, stride: Sequence[int],
                 padding: Sequence[int], input_grad: bool):
    """(grad_x or None, grad_w, dgamma or None, dbeta or None) through `path`: grad_x w.r.t. the raw x
    (through its BatchNorm with batch statistics) when norm is given or input_grad; the BatchNorm's
    parameter gradients when norm is given."""
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
    mean, invstd, gamma, beta = norm
    grad_x, dgamma, dbeta, _ = batch_norm_backward_kernels(grad_a, x, gamma, beta, mean, invstd, None, True)
    return grad_x, grad_w, dgamma, dbeta


def _backward_key(x, weight, stride, padding, norm, input_grad) -> str:
    return (f"conv_stats.backward:{weight.shape[0]}x{weight.shape[1]}k{weight.shape[2]}x{weight.shape[3]}"
            f"s{stride[0]}p{padding[0]}:x{'x'.join(map(str, x.shape))}:{str(x.dtype).removeprefix('torch.')}"
            f":norm{int(norm is not None)}:xgrad{int(input_grad)}:{layout_name(x)}")


def choose_backward(requested: str, grad_y: Tensor, x: Tensor, weight: Tensor, norm: Norm, stride: Sequence[int],
                    padding: Sequence[int], input_grad: bool) -> str:
    """The backward path to run: the requested one, else (requested == "auto") the tuned choice (the
    fixed rule where nothing can be measured: the CPU, or a CUDA-graph capture before any choice). A
    choice made earlier (CUDA graphs' uncaptured warm-up run) is what a capture records."""
    if requested != "auto":
        return requested
    signature = (x.shape, x.stride(), x.dtype, x.device, weight.shape, grad_y.stride(), tuple(stride), tuple(padding),
                 norm is not None, input_grad)
    return BACKWARD.choose(
        signature, x.device, names=BACKWARD_PATHS,
        fixed=FIXED_BACKWARD, key=lambda: _backward_key(x, weight, stride, padding, norm, input_grad),
        runs=lambda names: {name: (lambda name=name: run_backward(name, grad_y, x, weight, norm, stride, padding,
                                                                  input_grad)) for name in names},
        outputs=lambda grads: grads,
    )


@torch.library.custom_op("fastresnet::conv_stats_backward", mutates_args=())
def _conv_stats_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, in_mean: Optional[Tensor],
                            in_invstd: Optional[Tensor], in_gamma: Optional[Tensor], in_beta: Optional[Tensor],
                            stride: Sequence[int], padding: Sequence[int], input_grad: bool, backward: str
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_gamma, grad_beta); grad_x empty unless input_grad or a prologue, the last
    two empty without a prologue. The path is chosen here, at run time, where the inputs are real:
    torch.compile sees only the fake implementation."""
    norm = None if in_mean is None else (in_mean, in_invstd, in_gamma, in_beta)
    path = choose_backward(backward, grad_y, x, weight, norm, stride, padding, input_grad)
    grad_x, grad_w, dgamma, dbeta = run_backward(path, grad_y, x, weight, norm, stride, padding, input_grad)
    grad_w = with_strides_of(grad_w, torch.empty_like(weight))
    grad_x = with_strides_of(grad_x, torch.empty_like(x)) if grad_x is not None else x.new_empty(0)
    if norm is None:
        return grad_x, grad_w, x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    return grad_x, grad_w, dgamma, dbeta


@_conv_stats_backward_op.register_fake
def _(grad_y, x, weight, in_mean, in_invstd, in_gamma, in_beta, stride, padding, input_grad, backward):
    norm = in_mean is not None
    grad_x = torch.empty_like(x) if (input_grad or norm) else x.new_empty(0)
    channel = torch.empty_like(in_mean) if norm else x.new_empty(0, dtype=torch.float32)
    return grad_x, torch.empty_like(weight), channel, torch.empty_like(channel)


def save_conv_stats_context(ctx, inputs, output, backward: str = "auto"):
    """setup_context of every op with conv_stats' leading inputs (x, weight, in_mean, in_invstd, in_gamma,
    in_beta, stride, padding, ...) and outputs (y, mean, invstd, var): the cuDNN-graph op of
    fastresnet.ops.cudnn_graph shares this backward."""
    x, weight, in_mean, in_invstd, in_gamma, in_beta, stride, padding = inputs[:8]
    _, mean, invstd, var_unbiased = output
    ctx.save_for_backward(x, weight, in_mean, in_invstd, in_gamma, in_beta)
    ctx.stride, ctx.padding, ctx.backward = list(stride), list(padding), backward
    ctx.mark_non_differentiable(mean, invstd, var_unbiased)


def conv_stats_input_grads(ctx, grad_y) -> tuple:
    """Gradients of (x, weight, in_mean, in_invstd, in_gamma, in_beta), None where not needed."""
    x, weight, in_mean, in_invstd, in_gamma, in_beta = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_w, grad_gamma, grad_beta = torch.ops.fastresnet.conv_stats_backward(
        grad_y, x, weight, in_mean, in_invstd, in_gamma, in_beta, ctx.stride, ctx.padding, needs[0], ctx.backward
    )
    norm = in_mean is not None
    return (grad_x if needs[0] else None, grad_w if needs[1] else None, None, None,
            grad_gamma if norm and needs[4] else None, grad_beta if norm and needs[5] else None)


def _conv_stats_setup_context(ctx, inputs, output):
    save_conv_stats_context(ctx, inputs, output, backward=inputs[10])


def _conv_stats_backward(ctx, grad_y, _grad_mean, _grad_invstd, _grad_var):
    # No gradients for stride, padding, eps, use_cudnn and backward.
    return (*conv_stats_input_grads(ctx, grad_y), None, None, None, None, None)


torch.library.register_autograd("fastresnet::conv_stats", _conv_stats_backward, setup_context=_conv_stats_setup_context)


# ---------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------


def check_conv_inputs(x: Tensor, weight: Tensor, norm_input: Norm) -> None:
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv_stats: x and weight must be 4-D, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in FLOAT_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"conv_stats: x ({x.dtype}) and weight ({weight.dtype}) must share one float dtype")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv_stats: x has {x.shape[1]} channels, weight {tuple(weight.shape)} expects "
                         f"{weight.shape[1]}")
    if norm_input is not None:
        for name, v in zip(("mean", "invstd", "gamma", "beta"), norm_input):
            if v.shape != (x.shape[1],):
                raise ValueError(f"conv_stats: norm_input {name} must have shape ({x.shape[1]},), got {tuple(v.shape)}")


def fp32_norm(norm_input: Norm) -> tuple:
    """The four per-channel tensors of norm_input as the kernels read them (fp32), or four Nones."""
    return (None,) * 4 if norm_input is None else tuple(v.float() for v in norm_input)


def conv_stats(x: Tensor, weight: Tensor, stride=1, padding=0, eps: float = 1e-5, norm_input: Norm = None,
               use_cudnn: bool = False, backward: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, unbiased var) with y = conv2d(a, weight, stride, padding) (no bias, groups 1,
    dilation 1), a = x, or relu((x - mean) * invstd * gamma + beta) for norm_input = (mean, invstd,
    gamma, beta), the previous conv_stats' statistics and its BatchNorm's affine parameters.

    y has x's dtype and memory format; mean, invstd (1/sqrt(biased var + eps)) and the unbiased variance
    are y's per-channel batch statistics, fp32. Gradients flow to x (through its BatchNorm, with batch
    statistics), weight, gamma and beta.

    use_cudnn: cuDNN's conv instead of the Triton kernel (the normalised input is then written, used and
    freed, and the statistics take a pass of the BatchNorm kernels); the backward is the same. Where
    cuDNN's 3x3 beats the Triton one, a block mixes the two.

    backward: "auto" (tuned per shape, op "conv_stats.backward") or one of BACKWARD_PATHS.
    """
    check_conv_inputs(x, weight, norm_input)
    if backward != "auto" and backward not in BACKWARD_PATHS:
        raise ValueError(f"conv_stats backward {backward!r}: expected 'auto' or one of {BACKWARD_PATHS}")
    stride, padding = list(pair(stride)), list(pair(padding))
    if not backend.use_triton(x):
        return conv_stats_reference(x, weight, stride, padding, norm_input, eps)
    return torch.ops.fastresnet.conv_stats(x, weight, *fp32_norm(norm_input), stride, padding, eps, use_cudnn,
                                           backward)
