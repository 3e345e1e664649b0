"""BatchNorm + residual add + ReLU as autograd-capable torch ops.

  affine_act(x, scale, shift, residual=None, relu=True, center=None)
      act((x - center) * scale + shift + residual): a BatchNorm with fixed statistics (eval, folded)
      and the epilogue after a cuDNN convolution.
  batch_norm_act(x, weight, bias, running_mean, running_var, training, momentum, eps, residual=None, relu=True)
      act(F.batch_norm(...) + residual), running statistics updated in place exactly as F.batch_norm
      does (nn.BatchNorm2d's momentum=None lives in fastresnet.nn.BatchNormAct2d).
  bn_act_stats(y, mean, invstd, gamma, beta, residual=None, relu=True)
      the training BatchNorm's output pass with y's batch statistics already known (a conv_stats
      epilogue computed them); gradients as through the whole BatchNorm.

Each picks its path in Python before any op is called (backend.use_triton): the Triton kernels
wrapped as torch.library custom ops (torch.compile sees their fake implementations, so
fullgraph=True holds), or the eager reference, which torch.compile traces like any PyTorch code.

On a GPU batch_norm_act chooses per problem (shape, strides, dtype, residual, ReLU) between the
kernels and PyTorch's own BatchNorm2d -> add -> ReLU ("eager", cuDNN), through fastresnet.ops.tuning,
for each stage on its own:
  batch_norm_act.forward   the training forward, timed alone: "triton" (a statistics pass and one
                           normalise/add/ReLU pass), "triton_single" (one launch, small activations),
                           "eager" (aten._batch_norm_impl_index, what F.batch_norm runs)
  batch_norm_act.backward  timed alone after each forward on its saved tensors and the real upstream
                           gradient: "triton" (one reduction and one elementwise pass, the ReLU mask
                           recomputed), "triton_pipelined" (the reduction's row loop pipelined),
                           "eager" (threshold_backward, then ATen's BatchNorm backward)
  batch_norm_act.step      which forward training calls with gradients run: each forward with its best
                           backward timed as one step, so the step is never slower than eager's
  batch_norm_act.eval      inference: "triton" (one launch, the running statistics folded in the
                           kernel), "triton_wide" (the same over whole-row tiles), "triton_affine"
                           (the folded scale, then the affine_act kernel), "eager"
  batch_norm_act.eval_grad eval with gradients (frozen statistics), forward and backward together
Every training forward leaves the same state for the backward (mean, invstd, and aten's backend
index and reserve space), so any backward follows any forward. Inside torch.compile nothing is
timed: the custom ops are traced where earlier eager calls chose the kernels for every stage a
problem runs, else Inductor compiles the eager ops.

Host time decides the small stages (bench/host_time_bn_act.py), so the hot path builds no strings:
a choice is a dict lookup on a tuple, an inference call is one launch with one aten op, and eager
training calls use an autograd.Function rather than the custom ops.

Layouts: channels_last and contiguous NCHW tensors go to the kernels as they are (by strides); one
whose H and W do not share a stride (a slice along W) is first copied to channels_last.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastresnet import backend
from fastresnet.ops import tuning
from fastresnet.ops.layout import (
    as_rows, bn_kernels, check_activation, check_channel_vector, check_residual, layout_name,
)
from fastresnet.reference import affine_act_reference, batch_norm_act_reference

FORWARD = tuning.Tuned("batch_norm_act.forward")
BACKWARD = tuning.Tuned("batch_norm_act.backward")
STEP = tuning.Tuned("batch_norm_act.step")
EVAL = tuning.Tuned("batch_norm_act.eval")
EVAL_GRAD = tuning.Tuned("batch_norm_act.eval_grad")

# Below these many rows (N*H*W) per channel the kernels' training forward lost to cuDNN's BatchNorm +
# add + ReLU on an H200 (bf16, channels_last, batch 256; run 1: fused / eager time 0.60 / 0.74 / 0.94 /
# 1.69 at 56x56 / 28x28 / 14x14 / 7x7, i.e. 802,816 / 200,704 / 50,176 / 12,544 rows). Host time per
# call decides the small shapes, hence a threshold on rows.
TRAIN_FORWARD_MIN_ROWS = 2**15
# The kernels' backward lost to eager at every stage on the H200 (run 2: 0.96x at 56x56, 0.82x / 0.74x /
# 0.65x below).
FIXED_BACKWARD = "eager"
# triton_single runs one program per 16 channels, which can only pay off while the whole activation is
# small: offered up to the 14x14 stage at batch 256 (50,176 rows), where host time and launches decide.
SINGLE_PASS_MAX_ROWS = 2**16


def update_running_stats(running_stats, mean: Tensor, var_unbiased: Tensor, momentum: float) -> None:
    """running = (1 - momentum) * running + momentum * batch for (running_mean, running_var), in one
    launch (four with mul_/add_: host time on short layers). Every training path of the library,
    modules included, updates BatchNorm statistics through this one function."""
    if running_stats is None:
        return
    running_mean, running_var = running_stats
    with torch.no_grad():
        torch._foreach_lerp_([running_mean, running_var],
                             [mean.to(running_mean.dtype), var_unbiased.to(running_var.dtype)], momentum)


def fp32_affine(weight: Optional[Tensor], bias: Optional[Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """weight and bias as the kernels read them: fp32, ones and zeros for None."""
    channels = x.shape[1]
    weight = weight.float() if weight is not None else x.new_ones(channels, dtype=torch.float32)
    bias = bias.float() if bias is not None else x.new_zeros(channels, dtype=torch.float32)
    return weight, bias


def _empty_grad(x: Tensor) -> Tensor:
    """Placeholder output for a gradient that was not asked for (ops return Tensors only)."""
    return x.new_empty(0, dtype=torch.float32)


# ---------------------------------------------------------------------------
# Training forward paths: (y, mean, invstd, impl, reserve)
# ---------------------------------------------------------------------------

_NO_RESERVE: dict[torch.device, Tensor] = {}


def _no_reserve(x: Tensor) -> Tensor:
    """The empty reserve space of a non-cuDNN forward (one per device, not one per call)."""
    reserve = _NO_RESERVE.get(x.device)
    if reserve is None:
        reserve = _NO_RESERVE[x.device] = torch.empty(0, dtype=torch.uint8, device=x.device)
    return reserve


def forward_triton(x, weight, bias, residual, running_stats, momentum, eps, relu):
    k = bn_kernels()
    w, b = fp32_affine(weight, bias, x)
    mean, invstd, var_unbiased = k.bn_stats(x, eps)
    y = k.affine_act_fwd(x, w, b, center=mean, invstd=invstd, residual=residual, relu=relu)
    update_running_stats(running_stats, mean, var_unbiased, momentum)
    return y, mean, invstd, 0, _no_reserve(x)


def forward_triton_single(x, weight, bias, residual, running_stats, momentum, eps, relu):
    w, b = fp32_affine(weight, bias, x)
    y, mean, invstd, var_unbiased = bn_kernels().bn_train_fwd_single(x, w, b, eps, residual=residual, relu=relu)
    update_running_stats(running_stats, mean, var_unbiased, momentum)
    return y, mean, invstd, 0, _no_reserve(x)


def forward_eager(x, weight, bias, residual, running_stats, momentum, eps, relu):
    running_mean, running_var = running_stats if running_stats is not None else (None, None)
    y, mean, invstd, reserve, impl = torch.ops.aten._batch_norm_impl_index(
        x, weight, bias, running_mean, running_var, True, momentum, eps, torch.backends.cudnn.enabled
    )
    if residual is not None:
        y = y + residual
    if relu:
        y = y.relu_()  # a fresh tensor; BatchNorm's backward does not need its output
    return y.to(x.dtype), mean, invstd, impl, reserve


FORWARD_PATHS: dict[str, Callable] = {
    "triton": forward_triton,
    "triton_single": forward_triton_single,
    "eager": forward_eager,
}


def forward_paths_for(x: Tensor) -> tuple[str, ...]:
    """The forward paths worth timing for x (triton_single only for few rows)."""
    if x.shape[0] * x.shape[2] * x.shape[3] <= SINGLE_PASS_MAX_ROWS:
        return tuple(FORWARD_PATHS)
    return tuple(name for name in FORWARD_PATHS if name != "triton_single")


# ---------------------------------------------------------------------------
# Training backward paths: (dx, dweight, dbias, dresidual), None where not needed
# ---------------------------------------------------------------------------


class Saved(NamedTuple):
    """What a backward reads: the inputs, the forward's mean and invstd (1 / sqrt(biased var + eps)), its
    output y (the ReLU mask, kept only while an eager backward may run), aten's backend index (0 native,
    1 cuDNN) and cuDNN's reserve space (0 and empty after the kernels)."""

    x: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    residual: Optional[Tensor]
    mean: Tensor
    invstd: Tensor
    y: Optional[Tensor]
    impl: int
    reserve: Tensor
    running_stats: Optional[tuple[Tensor, Tensor]]
    eps: float
    relu: bool


def batch_norm_backward_kernels(grad_y, x, weight, bias, mean, invstd, residual, relu, pipeline=False):
    """(dx, dweight, dbias, dresidual) of the training BatchNorm (+ add) (+ ReLU) with batch statistics;
    weight and bias fp32, dresidual None without a residual: one reduction, one elementwise pass."""
    dx, sum_g, sum_gx, dres = bn_kernels().affine_act_bwd(
        as_rows(grad_y), x, weight, bias, center=mean, invstd=invstd, residual=residual, relu=relu,
        param_grads=True, batch_stats=True, pipeline=pipeline,
    )
    return dx, sum_gx * invstd, sum_g, dres


def backward_triton(s: Saved, grad_y: Tensor, needs: tuple, pipeline: bool = False) -> tuple:
    w, b = fp32_affine(s.weight, s.bias, s.x)
    grads = batch_norm_backward_kernels(grad_y, s.x, w, b, s.mean, s.invstd, s.residual, s.relu, pipeline)
    return tuple(g if need else None for need, g in zip(needs, grads))


def backward_triton_pipelined(s: Saved, grad_y: Tensor, needs: tuple) -> tuple:
    return backward_triton(s, grad_y, needs, pipeline=True)


def backward_eager(s: Saved, grad_y: Tensor, needs: tuple) -> tuple:
    g = torch.ops.aten.threshold_backward(grad_y, s.y, 0) if s.relu else grad_y
    dres = g.to(s.residual.dtype) if needs[3] else None
    g_bn = g.to(s.x.dtype)
    if s.impl == 1:  # cuDNN wants the gradient in the input's layout, as autograd gives it
        layout = torch.channels_last if s.x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        g_bn = g_bn.contiguous(memory_format=layout)
    # cuDNN may write its reserve space (autograd clones it when the graph is retained).
    reserve = s.reserve.clone() if s.reserve.numel() else s.reserve
    running_mean, running_var = s.running_stats if s.running_stats is not None else (None, None)
    mask = [needs[0], needs[1] and s.weight is not None, needs[2] and s.bias is not None]
    dx, dweight, dbias = torch.ops.aten._batch_norm_impl_index_backward(
        s.impl, s.x, g_bn, s.weight, running_mean, running_var, s.mean, s.invstd, True, s.eps, mask, reserve
    )
    return (dx if mask[0] else None, dweight if mask[1] else None, dbias if mask[2] else None, dres)


BACKWARD_PATHS: dict[str, Callable] = {
    "triton": backward_triton,
    "triton_pipelined": backward_triton_pipelined,
    "eager": backward_eager,
}


def forward_saved(path: str, x, weight, bias, residual, eps, relu) -> Saved:
    """What a forward path leaves for the backward, run without autograd and without running
    statistics (for timing a backward after it); y is kept even without a ReLU, so that a new
    forward's output can be checked."""
    with torch.no_grad():
        y, mean, invstd, impl, reserve = FORWARD_PATHS[path](x, weight, bias, residual, None, 0.0, eps, relu)
    return Saved(x, weight, bias, residual, mean, invstd, y, impl, reserve, None, eps, relu)


class BatchNormActTrain(torch.autograd.Function):
    """act(BatchNorm_train(x) + residual) through a chosen forward path; the backward path is chosen
    (timed the first time) when the backward runs, by `choose_backward(saved, grad_y)`. `known_backward`
    is that choice when already made: after a kernel backward the output need not be kept for the ReLU
    mask. Running statistics are updated in the forward (in a tuple, so autograd does not see them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_stats, momentum, eps, relu, forward, choose_backward,
                known_backward):
        y, mean, invstd, impl, reserve = FORWARD_PATHS[forward](
            x, weight, bias, residual, running_stats, momentum, eps, relu
        )
        keep_output = relu and known_backward in (None, "eager")
        ctx.save_for_backward(x, weight, bias, residual, mean, invstd, y if keep_output else None, reserve)
        ctx.impl, ctx.running_stats, ctx.eps, ctx.relu = impl, running_stats, eps, relu
        ctx.choose_backward = choose_backward
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, residual, mean, invstd, y, reserve = ctx.saved_tensors
        saved = Saved(x, weight, bias, residual, mean, invstd, y, ctx.impl, reserve, ctx.running_stats,
                      ctx.eps, ctx.relu)
        path = ctx.choose_backward(saved, grad_y)
        if path == "eager" and ctx.relu and y is None:  # the output was not kept: the kernels need no mask
            path = "triton"
        grads = BACKWARD_PATHS[path](saved, grad_y, ctx.needs_input_grad[:4])
        return (*grads, None, None, None, None, None, None, None)


# ---------------------------------------------------------------------------
# Eval paths
# ---------------------------------------------------------------------------


def _eval_kernel(x, weight, bias, running_mean, running_var, eps, residual, relu):
    """Inference: one launch, the scale folded in the kernel, nothing else on the host."""
    return bn_kernels().bn_eval_act_fwd(x, weight, bias, running_mean, running_var, eps, residual=residual,
                                        relu=relu)


def _eval_kernel_wide(x, weight, bias, running_mean, running_var, eps, residual, relu):
    """The same kernel over whole-row tiles (up to 256 channels): worth timing above 64 channels."""
    return bn_kernels().bn_eval_act_fwd(x, weight, bias, running_mean, running_var, eps, residual=residual,
                                        relu=relu, wide=True)


def _eval_affine(x, weight, bias, running_mean, running_var, eps, residual, relu):
    """The folded scale through autograd, then affine_act (whose backward gives x, scale, shift and the
    residual): eval with gradients, and inference where the one-launch kernel is not chosen."""
    weight, bias = fp32_affine(weight, bias, x)
    scale = weight * torch.rsqrt(running_var.float() + eps)
    return affine_act(x, scale, bias, residual, relu, center=running_mean)


def _eager_batch_norm_act(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu):
    """What plain PyTorch runs for BatchNorm2d -> add -> ReLU (cuDNN's BatchNorm on a GPU), in x's
    dtype, running statistics updated by F.batch_norm itself."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    if relu:
        y = F.relu(y, inplace=True)  # on a fresh tensor; BatchNorm's backward does not need its output
    return y.to(x.dtype)


def _eval_eager(x, weight, bias, running_mean, running_var, eps, residual, relu):
    return _eager_batch_norm_act(x, weight, bias, running_mean, running_var, False, 0.0, eps, residual, relu)


EVAL_PATHS = {"triton": _eval_kernel, "triton_wide": _eval_kernel_wide, "triton_affine": _eval_affine,
              "eager": _eval_eager}
EVAL_WITH_GRAD_PATHS = {"triton": _eval_affine, "eager": _eval_eager}


# ---------------------------------------------------------------------------
# Custom ops: what torch.compile traces
# ---------------------------------------------------------------------------


@torch.library.custom_op("fastresnet::affine_act", mutates_args=())
def _affine_act_op(x: Tensor, scale: Tensor, shift: Tensor, center: Optional[Tensor], residual: Optional[Tensor],
                   relu: bool) -> Tensor:
    return bn_kernels().affine_act_fwd(x, scale, shift, center=center, residual=residual, relu=relu)


@_affine_act_op.register_fake
def _(x, scale, shift, center, residual, relu):
    return torch.empty_like(x)


@torch.library.custom_op("fastresnet::affine_act_backward", mutates_args=())
def _affine_act_backward_op(grad_y: Tensor, x: Tensor, scale: Tensor, shift: Tensor, center: Optional[Tensor],
                            residual: Optional[Tensor], relu: bool, param_grads: bool
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_scale, grad_shift, grad_residual); grad_scale and grad_shift are empty unless
    param_grads, grad_residual is empty without a residual."""
    dx, sum_g, sum_gx, dres = bn_kernels().affine_act_bwd(
        grad_y, x, scale, shift, center=center, residual=residual, relu=relu, param_grads=param_grads
    )
    return (dx, sum_gx if param_grads else _empty_grad(x), sum_g if param_grads else _empty_grad(x),
            dres if dres is not None else _empty_grad(x))


@_affine_act_backward_op.register_fake
def _(grad_y, x, scale, shift, center, residual, relu, param_grads):
    channels = x.new_empty(x.shape[1], dtype=torch.float32) if param_grads else _empty_grad(x)
    residual_grad = torch.empty_like(residual) if residual is not None else _empty_grad(x)
    return torch.empty_like(x), channels, torch.empty_like(channels), residual_grad


def _affine_act_setup_context(ctx, inputs, output):
    x, scale, shift, center, residual, relu = inputs
    ctx.save_for_backward(x, scale, shift, center, residual)
    ctx.relu = relu


def _affine_act_backward(ctx, grad_y):
    x, scale, shift, center, residual = ctx.saved_tensors
    needs = ctx.needs_input_grad
    param_grads = needs[1] or needs[2] or needs[3]
    dx, dscale, dshift, dres = torch.ops.fastresnet.affine_act_backward(
        as_rows(grad_y), x, scale, shift, center, residual, ctx.relu, param_grads
    )
    # d/dcenter of (x - center) * scale is -scale, summed over the rows like dshift.
    dcenter = -scale * dshift if needs[3] else None
    return (dx if needs[0] else None, dscale if needs[1] else None, dshift if needs[2] else None, dcenter,
            dres if needs[4] else None, None)


torch.library.register_autograd("fastresnet::affine_act", _affine_act_backward, setup_context=_affine_act_setup_context)


@torch.library.custom_op("fastresnet::batch_norm_act_train", mutates_args=())
def _batch_norm_act_train_op(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], eps: float,
                             relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, unbiased var): the last three per channel, fp32."""
    k = bn_kernels()
    mean, invstd, var_unbiased = k.bn_stats(x, eps)
    y = k.affine_act_fwd(x, weight, bias, center=mean, invstd=invstd, residual=residual, relu=relu)
    return y, mean, invstd, var_unbiased


@_batch_norm_act_train_op.register_fake
def _(x, weight, bias, residual, eps, relu):
    stat = x.new_empty(x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), stat, torch.empty_like(stat), torch.empty_like(stat)


@torch.library.custom_op("fastresnet::bn_act_stats", mutates_args=())
def _bn_act_stats_op(y: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor,
                     residual: Optional[Tensor], relu: bool) -> Tensor:
    return bn_kernels().affine_act_fwd(y, gamma, beta, center=mean, invstd=invstd, residual=residual, relu=relu)


@_bn_act_stats_op.register_fake
def _(y, mean, invstd, gamma, beta, residual, relu):
    return torch.empty_like(y)


@torch.library.custom_op("fastresnet::batch_norm_act_backward", mutates_args=())
def _batch_norm_act_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                                invstd: Tensor, residual: Optional[Tensor], relu: bool
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_residual) of the training BatchNorm with batch statistics,
    the last empty without a residual: the backward of batch_norm_act_train and of bn_act_stats."""
    dx, dweight, dbias, dres = batch_norm_backward_kernels(grad_y, x, weight, bias, mean, invstd, residual, relu)
    return dx, dweight, dbias, dres if dres is not None else _empty_grad(x)


@_batch_norm_act_backward_op.register_fake
def _(grad_y, x, weight, bias, mean, invstd, residual, relu):
    residual_grad = torch.empty_like(residual) if residual is not None else _empty_grad(x)
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias), residual_grad


def _batch_stats_backward(ctx, grad_y):
    x, weight, bias, mean, invstd, residual = ctx.saved_tensors
    return torch.ops.fastresnet.batch_norm_act_backward(grad_y, x, weight, bias, mean, invstd, residual, ctx.relu)


def _train_setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, relu = inputs
    _, mean, invstd, var_unbiased = output
    ctx.save_for_backward(x, weight, bias, mean, invstd, residual)
    ctx.mark_non_differentiable(mean, invstd, var_unbiased)
    ctx.relu = relu


def _train_backward(ctx, grad_y, _grad_mean, _grad_invstd, _grad_var):
    dx, dweight, dbias, dres = _batch_stats_backward(ctx, grad_y)
    needs = ctx.needs_input_grad
    return (dx if needs[0] else None, dweight if needs[1] else None, dbias if needs[2] else None,
            dres if needs[3] else None, None, None)


torch.library.register_autograd("fastresnet::batch_norm_act_train", _train_backward,
                                setup_context=_train_setup_context)


def _bn_act_stats_setup_context(ctx, inputs, output):
    y, mean, invstd, gamma, beta, residual, relu = inputs
    ctx.save_for_backward(y, gamma, beta, mean, invstd, residual)
    ctx.relu = relu


def _bn_act_stats_backward(ctx, grad_out):
    dy, dgamma, dbeta, dres = _batch_stats_backward(ctx, grad_out)
    needs = ctx.needs_input_grad
    return (dy if needs[0] else None, None, None, dgamma if needs[3] else None, dbeta if needs[4] else None,
            dres if needs[5] else None, None)


torch.library.register_autograd("fastresnet::bn_act_stats", _bn_act_stats_backward,
                                setup_context=_bn_act_stats_setup_context)


def _custom_op_batch_norm_act(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu):
    """The kernels as custom ops with fake implementations: what torch.compile traces."""
    if not training:
        return _eval_affine(x, weight, bias, running_mean, running_var, eps, residual, relu)
    weight, bias = fp32_affine(weight, bias, x)
    y, mean, _, var_unbiased = torch.ops.fastresnet.batch_norm_act_train(x, weight, bias, residual, eps, relu)
    stats = None if running_mean is None else (running_mean, running_var)
    update_running_stats(stats, mean, var_unbiased, momentum)
    return y


COMPILED_PATHS = {"triton": _custom_op_batch_norm_act, "eager": _eager_batch_norm_act}


# ---------------------------------------------------------------------------
# The choices
# ---------------------------------------------------------------------------


def _signature(x: Tensor, residual: Optional[Tensor], relu: bool) -> tuple:
    """What a choice depends on, cheap to build on every call (no strings)."""
    res = None if residual is None else (residual.stride(), residual.dtype)
    return (x.shape, x.stride(), x.dtype, x.device, res, relu)


def _problem_key(stage: str, x: Tensor, residual: Optional[Tensor], relu: bool, detail: str = "") -> str:
    return (f"batch_norm_act.{stage}:x{'x'.join(map(str, x.shape))}:{str(x.dtype).removeprefix('torch.')}"
            f":{layout_name(x)}:res{int(residual is not None)}:relu{int(relu)}{detail}")


def _grads_detail(needs: tuple) -> str:
    """Which of (x, weight, bias, residual) get a gradient, as in ':grads1111'."""
    return f":grads{''.join(str(int(n)) for n in needs)}"


def fixed_forward(x: Tensor, training: bool) -> str:
    """The rule on a GPU where nothing is timed: in eval the pass that has run there, a training forward
    by rows, as measured on the H200."""
    if not training:
        return "triton_affine"
    rows = x.shape[0] * x.shape[2] * x.shape[3]
    return "triton" if rows >= TRAIN_FORWARD_MIN_ROWS else "eager"


def _fixed(x: Tensor, gpu_rule: str) -> str:
    """The rule where nothing is timed: on the CPU the kernels (Triton's interpreter: the tests)."""
    return gpu_rule if x.is_cuda else "triton"


def _timed_forwards(x, weight, bias, residual, eps, relu):
    """Each forward path on the real inputs, without running statistics (timing moves no statistic)
    and without autograd; its y and invstd are what a new path is checked on (a mean near 0 has no
    relative precision)."""

    def runs(names):
        return {name: (lambda path=FORWARD_PATHS[name]: _no_grad(path, x, weight, bias, residual, None, 0.0, eps,
                                                                 relu)) for name in names}
    return runs


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


# Each choice looks its memo up before building the arguments of choose(): host time on the hot path.


def _forward_alone(sig, x, weight, bias, residual, eps, relu) -> str:
    return FORWARD.memo.get(sig) or FORWARD.choose(
        sig, x.device, names=lambda: forward_paths_for(x), fixed=_fixed(x, fixed_forward(x, True)),
        key=lambda: _problem_key("forward", x, residual, relu),
        runs=_timed_forwards(x, weight, bias, residual, eps, relu), outputs=lambda out: (out[0], out[2]),
    )


def _backward_after(forward, saved, grad_y, sig, needs, x, residual, relu) -> str:
    """The backward path after `forward`, timed alone on its saved tensors."""
    return BACKWARD.memo.get((sig, forward, needs)) or BACKWARD.choose(
        (sig, forward, needs), x.device, names=tuple(BACKWARD_PATHS),
        fixed=_fixed(x, FIXED_BACKWARD),
        key=lambda: _problem_key("backward", x, residual, relu, f":after-{forward}{_grads_detail(needs)}"),
        runs=lambda names: {name: (lambda path=BACKWARD_PATHS[name]: path(saved, grad_y, needs)) for name in names},
        outputs=lambda grads: grads,
    )


def _choose_step(first_forward, first_backward, grad_y, sig, needs, x, weight, bias, residual, eps, relu):
    """Which forward later calls with gradients run: each forward path followed by its best backward,
    timed as one step. A forward that wins alone but leaves a slower backward behind (ATen's native
    backward after the kernels' forward, instead of cuDNN's after its own) cannot so make a training
    step slower than eager's."""
    best_backward = {first_forward: first_backward}

    def saved_after(forward):
        return forward_saved(forward, x, weight, bias, residual, eps, relu)

    def runs(names):
        for forward in names:
            if forward not in best_backward:
                best_backward[forward] = _backward_after(forward, saved_after(forward), grad_y, sig, needs, x,
                                                         residual, relu)

        def step(forward):
            saved = saved_after(forward)
            return saved, BACKWARD_PATHS[best_backward[forward]](saved, grad_y, needs)

        return {forward: (lambda f=forward: step(f)) for forward in names}

    return STEP.choose(
        (sig, needs), x.device, names=lambda: forward_paths_for(x), fixed=first_forward,
        key=lambda: _problem_key("step", x, residual, relu, _grads_detail(needs)), runs=runs,
        outputs=lambda out: (out[0].y, out[0].invstd, *out[1]),
    )


def _train(x, weight, bias, running_mean, running_var, momentum, eps, residual, relu, needs):
    stats = None if running_mean is None else (running_mean, running_var)
    sig = _signature(x, residual, relu)
    if not any(needs):
        forward = _forward_alone(sig, x, weight, bias, residual, eps, relu)
        return FORWARD_PATHS[forward](x, weight, bias, residual, stats, momentum, eps, relu)[0]
    # With gradients: the forward whose step (with its best backward) was fastest, decided at the first
    # backward; until then the forward timed alone.
    forward = STEP.known((sig, needs)) or _forward_alone(sig, x, weight, bias, residual, eps, relu)

    def choose_backward(saved, grad_y):
        path = _backward_after(forward, saved, grad_y, sig, needs, x, residual, relu)
        if STEP.known((sig, needs)) is None:
            try:
                _choose_step(forward, path, grad_y, sig, needs, x, weight, bias, residual, eps, relu)
            except Exception as err:  # a failing candidate must not break training: keep this forward
                tuning.log.info("tuning: the step choice for %s failed, keeping %s: %s", sig, forward, err)
                STEP.remember((sig, needs), forward)
        return path

    return BatchNormActTrain.apply(x, weight, bias, residual, stats, momentum, eps, relu, forward, choose_backward,
                                   BACKWARD.known((sig, forward, needs)))


def _eval(x, weight, bias, running_mean, running_var, eps, residual, relu, needs_grad):
    args = (x, weight, bias, running_mean, running_var, eps, residual, relu)
    sig = _signature(x, residual, relu)
    if needs_grad:
        path = EVAL_GRAD.memo.get(sig) or EVAL_GRAD.choose(
            sig, x.device, names=tuple(EVAL_WITH_GRAD_PATHS), fixed="triton",
            key=lambda: _problem_key("eval_grad", x, residual, relu), runs=lambda names: _timed_with_grad(names, args),
        )
        return EVAL_WITH_GRAD_PATHS[path](*args)
    path = EVAL.memo.get(sig) or EVAL.choose(
        sig, x.device,
        # whole-row tiles differ from the default only above 64 channels
        names=lambda: [name for name in EVAL_PATHS if name != "triton_wide" or x.shape[1] > 64],
        fixed=_fixed(x, fixed_forward(x, False)), key=lambda: _problem_key("eval", x, residual, relu),
        runs=lambda names: {name: (lambda path=EVAL_PATHS[name]: _no_grad(path, *args)) for name in names},
    )
    return EVAL_PATHS[path](*args)


def _timed_with_grad(names, args):
    """Eval paths with gradients, forward and backward together, on detached copies (no .grad
    accumulates). The upstream gradient is a constant: timing must leave the run's random stream as
    it was (a run whose choices come from the disk cache draws the same numbers)."""
    x, weight, bias, running_mean, running_var, eps, residual, relu = args

    def leaf(t):
        return None if t is None else t.detach().requires_grad_(t.requires_grad)

    x_, w_, b_, r_ = (leaf(t) for t in (x, weight, bias, residual))
    wrt = [t for t in (x_, w_, b_, r_) if t is not None and t.requires_grad]
    grad_y = torch.ones_like(x)

    def step(path):
        with torch.enable_grad():
            y = path(x_, w_, b_, running_mean, running_var, eps, r_, relu)
            torch.autograd.grad(y, wrt, grad_y)

    return {name: (lambda path=EVAL_WITH_GRAD_PATHS[name]: step(path)) for name in names}


@torch.compiler.assume_constant_result
def _pinned(op: str) -> Optional[str]:
    return tuning.settings().pin_for(op)


def compiled_path(x: Tensor, residual: Optional[Tensor], relu: bool, training: bool, needs: tuple) -> str:
    """The path traced inside torch.compile, where nothing is timed: the kernels (custom ops) only where
    earlier eager calls chose them for every stage the compiled code runs, else "eager", i.e.
    Inductor's code for the unfused ops, which beat the kernels at every stage on the H200 (run 1:
    forward 0.60 / 0.37 / 0.30 / 0.29 ms against 0.87 / 0.56 / 0.43 / 0.41) and can fuse with its
    neighbours. A pin ("batch_norm_act=triton" or "=eager") forces either."""
    grad = any(needs)
    stage = ("batch_norm_act.forward" if not grad else "batch_norm_act.backward") if training else (
        "batch_norm_act.eval_grad" if grad else "batch_norm_act.eval")
    pin = _pinned(stage)
    if pin in ("triton", "eager"):
        return pin
    if not tuning.can_measure(x.device):  # the CPU: the kernels (Triton's interpreter, the tests)
        return "triton"
    sig = _signature(x, residual, relu)
    if not training:
        return _family((EVAL_GRAD if grad else EVAL).known(sig))
    if not grad:
        return _family(FORWARD.known(sig))
    forward = STEP.known((sig, needs)) or FORWARD.known(sig)
    if _family(forward) == "eager":
        return "eager"
    return _family(BACKWARD.known((sig, forward, needs)))


def _family(path: Optional[str]) -> str:
    """"triton" for any of the kernels' paths (the custom ops stand for them all under torch.compile),
    else "eager" (also when nothing was chosen)."""
    return "triton" if path is not None and path.startswith("triton") else "eager"


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------


def affine_act(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None, relu: bool = True, *,
               center: Optional[Tensor] = None) -> Tensor:
    """y = act((x - center[c]) * scale[c] + shift[c] + residual[n, c, h, w]).

    x: NCHW-logical, channels_last or contiguous, fp32/fp16/bf16; y has x's dtype and memory format.
    scale, shift, center: per channel, computed in fp32. center (default none) keeps a large mean out
    of the rounding: the eval BatchNorm passes its running mean. Gradients flow to x, scale, shift,
    center and residual.
    """
    check_activation(x)
    for name, v in (("scale", scale), ("shift", shift), ("center", center)):
        check_channel_vector(v, x, name)
    check_residual(residual, x.shape, x.device)
    if not backend.use_triton(x):
        return affine_act_reference(x, scale, shift, residual, relu, center)
    center = center.float() if center is not None else None
    return torch.ops.fastresnet.affine_act(as_rows(x), scale.float(), shift.float(), center, as_rows(residual), relu)


def batch_norm_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], training: bool, momentum: float, eps: float,
                   residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """act(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) + residual),
    with F.batch_norm's semantics: in training the batch statistics normalise x and, when given, the
    running statistics are updated in place (running_var with the unbiased variance); otherwise the
    running statistics normalise x. weight/bias None mean 1/0.
    """
    check_activation(x)
    for name, v in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        check_channel_vector(v, x, name)
    check_residual(residual, x.shape, x.device)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var must be given when training=False")
    if training and x.numel() // x.shape[1] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    if not backend.use_triton(x):
        return batch_norm_act_reference(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                        residual, relu)
    x, residual = as_rows(x), as_rows(residual)
    needs = _needed_inputs(x, weight, bias, residual)
    if torch.compiler.is_compiling():
        path = compiled_path(x, residual, relu, training, needs)
        return COMPILED_PATHS[path](x, weight, bias, running_mean, running_var, training, momentum, eps, residual,
                                    relu)
    if training:
        return _train(x, weight, bias, running_mean, running_var, momentum, eps, residual, relu, needs)
    return _eval(x, weight, bias, running_mean, running_var, eps, residual, relu, any(needs))


def _needed_inputs(x, weight, bias, residual) -> tuple[bool, bool, bool, bool]:
    """Which of (x, weight, bias, residual) autograd will want a gradient for."""
    if not torch.is_grad_enabled():
        return (False, False, False, False)
    return tuple(t is not None and t.requires_grad for t in (x, weight, bias, residual))


def bn_act_stats(y: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor,
                 residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """act((y - mean) * invstd * gamma + beta + residual), y's batch statistics from conv_stats.

    The training BatchNorm's output pass without a statistics pass: gradients flow to y (with batch
    statistics), gamma, beta and the residual.
    """
    check_residual(residual, y.shape, y.device)
    if not backend.use_triton(y):
        return affine_act_reference(y, invstd * gamma, beta, residual, relu, center=mean)
    return torch.ops.fastresnet.bn_act_stats(as_rows(y), mean, invstd, gamma.float(), beta.float(),
                                             as_rows(residual), relu)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the process group, whose gradient is the sum of every rank's gradient (each rank's loss
    depends on every rank's share of the statistics)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        total = tensor.clone()
        torch.distributed.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


def sync_batch_norm_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], momentum: float, eps: float, group,
                        residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """act(BatchNorm(x) + residual) with the batch statistics of the whole process group: what
    nn.SyncBatchNorm computes in training, for the CPUs torch's does not run on (gloo). Eager and
    differentiable: the per-channel sums are reduced in fp64 (no cancellation in E[x^2] - E[x]^2 at
    the scales of activations), their gradient reduced back; running statistics as F.batch_norm's,
    with the unbiased variance of the whole group's batch."""
    xd = x.double()
    local = torch.stack([xd.sum((0, 2, 3)), xd.square().sum((0, 2, 3)),
                         xd.new_full((x.shape[1],), x.numel() // x.shape[1])])
    sums, squares, counts = _AllReduceSum.apply(local, group)
    mean = sums / counts
    var = (squares / counts - mean.square()).clamp_min(0.0)
    if running_mean is not None:
        update_running_stats((running_mean, running_var), mean.float(), (var * counts / (counts - 1)).float(),
                             momentum)
    scale = torch.rsqrt(var + eps).float()
    scale = scale * weight if weight is not None else scale
    shift = bias if bias is not None else torch.zeros_like(scale)
    return affine_act_reference(x, scale, shift, residual, relu, center=mean.float())
