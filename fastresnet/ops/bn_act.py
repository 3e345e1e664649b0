"""BatchNorm + residual add + ReLU as torch ops over kernels/bn_act.py and kernels/bn_stats.py.

  batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, relu)
      act(F.batch_norm(...) + residual), with F.batch_norm's arguments and semantics (running statistics
      updated in place; nn.BatchNorm2d's momentum=None lives in fastresnet.nn.BatchNormAct2d).
  affine_act(input, scale, shift, residual=None, relu=True, *, center=None)
      act((input - center) * scale + shift + residual): a BatchNorm with its statistics folded in.
  bn_act_stats(input, mean, invstd, weight, bias, residual=None, relu=True)
      the training BatchNorm's output pass with input's batch statistics known (a conv_stats epilogue
      computed them); gradients as through the whole BatchNorm.

Each runs the eager reference where the kernels cannot run (backend.use_triton), else asks its tuned
choice once and calls its custom op with the chosen path: the same op eagerly and under torch.compile,
which sees its fake implementation (fullgraph=True holds).

batch_norm_act chooses per problem (shape, strides, dtype, residual, ReLU) and stage between the
kernels ("triton") and ATen's BatchNorm ("eager": cuDNN's on a GPU), then the add and the ReLU:
  batch_norm_act.forward   the training forward, timed alone
  batch_norm_act.backward  the backward after a given forward, timed alone on its saved tensors and the
                           real upstream gradient (every forward leaves what every backward reads:
                           mean, invstd, ATen's backend index and reserve space)
  batch_norm_act.step      which forward training calls with gradients run: each forward with its best
                           backward, timed as one step, so that a step is never slower than eager's
  batch_norm_act.eval      inference, and batch_norm_act.eval_grad eval with gradients (frozen statistics)
Where every stage a call runs chose "eager", the call is plain ATen code, as in PyTorch. Under
torch.compile nothing is timed, and the kernels run only where earlier eager calls chose them for every
stage the compiled code runs: elsewhere Inductor's code for the unfused ops, which beat the kernels at
every stage on the H200 (run 1: forward 0.60 / 0.37 / 0.30 / 0.29 ms against 0.87 / 0.56 / 0.43 / 0.41)
and fuses with its neighbours.

Layouts: channels_last and contiguous NCHW tensors go to the kernels as they are (by strides); one whose
H and W do not share a stride (a slice along W) is first copied to channels_last.
"""

from __future__ import annotations

import itertools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastresnet import backend
from fastresnet.ops import tuning
from fastresnet.ops.layout import as_rows, check_activation, check_channel_vector, check_residual, kernels
from fastresnet.reference import affine_act_reference, batch_norm_act_reference

BN_FORWARD = tuning.Op("batch_norm_act.forward", {"triton": None, "eager": None})  # run 1
BN_BACKWARD = tuning.Op("batch_norm_act.backward", {"triton": None, "eager": None})  # run 1
BN_STEP = tuning.Op("batch_norm_act.step", {"triton": None, "eager": None})  # run 2
BN_EVAL = tuning.Op("batch_norm_act.eval", {"triton": None, "eager": None})  # run 2
BN_EVAL_GRAD = tuning.Op("batch_norm_act.eval_grad", {"triton": None, "eager": None})  # run 2

# The experimental shelf's paths by name (fastresnet.experimental.bn_act fills it): forwards and
# backwards as the ops' bodies call them, eval paths as batch_norm_act's arguments.
EXPERIMENTAL: dict[str, Callable] = {}

# Below these many rows (N*H*W) per channel the kernels' training forward lost to cuDNN's BatchNorm +
# add + ReLU on an H200 (bf16, channels_last, batch 256; run 1: fused / eager time 0.60 / 0.74 / 0.94 /
# 1.69 at 56x56 / 28x28 / 14x14 / 7x7, i.e. 802,816 / 200,704 / 50,176 / 12,544 rows). Host time per
# call decides the small shapes, hence a threshold on rows.
TRAIN_FORWARD_MIN_ROWS = 2**15
# The kernels' backward lost to eager at every stage on the H200 (run 2: 0.96x at 56x56, 0.82x / 0.74x /
# 0.65x below).
DEFAULT_BACKWARD = "eager"
# Which of (input, weight, bias, residual) want a gradient, as a problem's field reads it.
_GRADS = {needs: "grads" + "".join(str(int(n)) for n in needs) for needs in itertools.product((False, True), repeat=4)}


def default_forward(x: Tensor, training: bool) -> str:
    """The path a GPU runs where nothing is timed: in eval the kernels' pass, a training forward by rows."""
    if not training:
        return "triton"
    return "triton" if x.shape[0] * x.shape[2] * x.shape[3] >= TRAIN_FORWARD_MIN_ROWS else "eager"


def _default(x: Tensor, gpu_default: str) -> str:
    """Where nothing is timed: on a GPU `gpu_default`, under torch.compile Inductor's code ("eager"); on
    the CPU the kernels (Triton's interpreter: the tests)."""
    if torch.compiler.is_compiling():
        return "eager" if tuning.can_measure(x.device) else "triton"
    return gpu_default if x.is_cuda else "triton"


def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor], mean: Tensor,
                         var_unbiased: Tensor, momentum: float) -> None:
    """running = (1 - momentum) * running + momentum * batch for both, in one launch (four with mul_/add_:
    host time on short layers). Every path of the library that updates BatchNorm statistics itself goes
    through here."""
    if running_mean is None:
        return
    with torch.no_grad():
        torch._foreach_lerp_([running_mean, running_var],
                             [mean.to(running_mean.dtype), var_unbiased.to(running_var.dtype)], momentum)


def _fp32(weight: Optional[Tensor], bias: Optional[Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """weight and bias as the kernels read them: fp32, ones and zeros for None."""
    weight = weight.float() if weight is not None else x.new_ones(x.shape[1], dtype=torch.float32)
    bias = bias.float() if bias is not None else x.new_zeros(x.shape[1], dtype=torch.float32)
    return weight, bias


def _empty(x: Tensor) -> Tensor:
    """The output standing for a gradient that was not asked for (custom ops return tensors only)."""
    return x.new_empty(0, dtype=torch.float32)


_NO_RESERVE: dict[torch.device, Tensor] = {}


def _no_reserve(x: Tensor) -> Tensor:
    """The empty reserve space of a forward without cuDNN (one per device, not one per call)."""
    reserve = _NO_RESERVE.get(x.device)
    if reserve is None:
        reserve = _NO_RESERVE[x.device] = torch.empty(0, dtype=torch.uint8, device=x.device)
    return reserve


def _eager(x, running_mean, running_var, weight, bias, training, momentum, eps, residual, relu):
    """What plain PyTorch runs for BatchNorm2d -> add -> ReLU, in x's dtype."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    if relu:
        y = F.relu(y, inplace=True)  # a fresh tensor: BatchNorm's backward does not need its output
    return y.to(x.dtype)


# ---------------------------------------------------------------------------
# The custom ops
# ---------------------------------------------------------------------------


@torch.library.custom_op("fastresnet::affine_act", mutates_args=())
def _affine_act(x: Tensor, scale: Tensor, shift: Tensor, center: Optional[Tensor], residual: Optional[Tensor],
                relu: bool) -> Tensor:
    return kernels().bn_act.affine_act_fwd(x, scale, shift, center=center, residual=residual, relu=relu)


@_affine_act.register_fake
def _(x, scale, shift, center, residual, relu):
    return torch.empty_like(x)


@torch.library.custom_op("fastresnet::affine_act_backward", mutates_args=())
def _affine_act_backward(grad_y: Tensor, x: Tensor, scale: Tensor, shift: Tensor, center: Optional[Tensor],
                         residual: Optional[Tensor], relu: bool, param_grads: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_scale, grad_shift, grad_residual); grad_scale and grad_shift are empty unless
    param_grads, grad_residual is empty without a residual."""
    dx, sum_g, sum_gx, dres = kernels().bn_act.affine_act_bwd(
        grad_y, x, scale, shift, center=center, residual=residual, relu=relu, param_grads=param_grads)
    return (dx, sum_gx if param_grads else _empty(x), sum_g if param_grads else _empty(x),
            dres if dres is not None else _empty(x))


@_affine_act_backward.register_fake
def _(grad_y, x, scale, shift, center, residual, relu, param_grads):
    channels = x.new_empty(x.shape[1], dtype=torch.float32) if param_grads else _empty(x)
    residual_grad = torch.empty_like(residual) if residual is not None else _empty(x)
    return torch.empty_like(x), channels, torch.empty_like(channels), residual_grad


def _affine_act_setup(ctx, inputs, output):
    x, scale, shift, center, residual, relu = inputs
    ctx.save_for_backward(x, scale, shift, center, residual)
    ctx.relu = relu


def _affine_act_grads(ctx, grad_y):
    x, scale, shift, center, residual = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, dscale, dshift, dres = torch.ops.fastresnet.affine_act_backward(
        as_rows(grad_y), x, scale, shift, center, residual, ctx.relu, needs[1] or needs[2] or needs[3])
    # d/dcenter of (x - center) * scale is -scale, summed over the rows like dshift.
    dcenter = -scale * dshift if needs[3] else None
    return (dx if needs[0] else None, dscale if needs[1] else None, dshift if needs[2] else None, dcenter,
            dres if needs[4] else None, None)


torch.library.register_autograd("fastresnet::affine_act", _affine_act_grads, setup_context=_affine_act_setup)


@torch.library.custom_op("fastresnet::batch_norm_act_train", mutates_args=())
def _batch_norm_act_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                          eps: float, relu: bool, path: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """(y, mean, invstd, unbiased var, reserve, impl) of a training forward through `path`: the statistics
    fp32 (invstd = 1 / sqrt(biased var + eps)), reserve and impl ATen's (cuDNN's reserve space and backend
    index, 1 for cuDNN; empty and 0 after the kernels). The caller updates the running statistics."""
    if path == "eager":
        y, mean, invstd, reserve, impl = torch.ops.aten._batch_norm_impl_index(
            x, weight, bias, None, None, True, 0.0, eps, torch.backends.cudnn.enabled)
        y = y + residual if residual is not None else y
        m = x.numel() // x.shape[1]
        var_unbiased = (invstd.float().pow(-2) - eps).clamp_min_(0) * (m / (m - 1))
        return (y.relu_() if relu else y).to(x.dtype), mean, invstd, var_unbiased, reserve, impl
    if path != "triton":
        return EXPERIMENTAL[path](x, weight, bias, residual, eps, relu)
    k = kernels()
    weight, bias = _fp32(weight, bias, x)
    mean_part, m2_part, rows = k.bn_stats.stats_partials(x)
    mean, invstd, var_unbiased = k.bn_stats.finalize_stats(mean_part, m2_part, x.numel() // x.shape[1], rows, eps)
    y = k.bn_act.affine_act_fwd(x, weight, bias, center=mean, invstd=invstd, residual=residual, relu=relu)
    return y, mean, invstd, var_unbiased, _no_reserve(x), 0


@_batch_norm_act_train.register_fake
def _(x, weight, bias, residual, eps, relu, path):
    stat = x.new_empty(x.shape[1], dtype=torch.float32)
    return (torch.empty_like(x), stat, torch.empty_like(stat), torch.empty_like(stat),
            x.new_empty(0, dtype=torch.uint8), 0)


@torch.library.custom_op("fastresnet::batch_norm_act_backward", mutates_args=())
def _batch_norm_act_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                             residual: Optional[Tensor], mean: Tensor, invstd: Tensor, y: Optional[Tensor],
                             reserve: Tensor, impl: int, eps: float, relu: bool, wanted: list[bool], path: str
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_residual) of the training BatchNorm (+ add) (+ ReLU) with batch
    statistics through `path`, each empty where not `wanted`. "eager" needs the forward's output y for
    the ReLU mask; the kernels recompute it."""
    if path == "eager":
        g = torch.ops.aten.threshold_backward(grad_y, y, 0) if relu else grad_y
        dres = g.to(residual.dtype) if wanted[3] and residual is not None else _empty(x)
        g = g.to(x.dtype)
        if impl == 1:  # cuDNN wants the gradient in the input's layout, as autograd gives it
            cl = x.is_contiguous(memory_format=torch.channels_last)
            g = g.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        # cuDNN may write its reserve space (autograd clones it when the graph is retained).
        reserve = reserve.clone() if reserve.numel() else reserve
        mask = [wanted[0], wanted[1] and weight is not None, wanted[2] and bias is not None]
        grads = torch.ops.aten._batch_norm_impl_index_backward(impl, x, g, weight, None, None, mean, invstd, True,
                                                               eps, mask, reserve)
        return (*(grad if keep else _empty(x) for grad, keep in zip(grads, mask)), dres)
    if path == "triton":
        weight, bias = _fp32(weight, bias, x)
        dx, sum_g, sum_gx, dres = kernels().bn_act.affine_act_bwd(
            as_rows(grad_y), x, weight, bias, center=mean, invstd=invstd, residual=residual, relu=relu,
            param_grads=True, batch_stats=True)
        grads = (dx, sum_gx * invstd, sum_g, dres)
    else:
        grads = EXPERIMENTAL[path](grad_y, x, weight, bias, residual, mean, invstd, relu)
    return tuple(grad if keep and grad is not None else _empty(x) for grad, keep in zip(grads, wanted))


@_batch_norm_act_backward.register_fake
def _(grad_y, x, weight, bias, residual, mean, invstd, y, reserve, impl, eps, relu, wanted, path):
    channel = x.new_empty(x.shape[1], dtype=torch.float32)
    like = (x, channel, channel, residual)
    return tuple(torch.empty_like(t) if keep and t is not None else _empty(x) for t, keep in zip(like, wanted))


def _train_setup(ctx, inputs, output):
    x, weight, bias, residual, eps, relu, path = inputs
    y, mean, invstd, var_unbiased, reserve, impl = output
    ctx.mark_non_differentiable(mean, invstd, var_unbiased, reserve)
    ctx.wanted = tuple(ctx.needs_input_grad[:4])
    ctx.problem, ctx.forward, ctx.impl, ctx.eps, ctx.relu = _problem(x, residual, relu), path, impl, eps, relu
    # After the kernels' backward (chosen already) the output need not be kept for the ReLU mask.
    backward = BN_BACKWARD.known(_backward_problem(ctx.problem, path, ctx.wanted), x.device)
    keep = relu and backward in (None, "eager")
    ctx.save_for_backward(x, weight, bias, residual, mean, invstd, y if keep else None, reserve)


def _train_grads(ctx, grad_y, *_):
    x, weight, bias, residual, mean, invstd, y, reserve = ctx.saved_tensors
    path = _backward_path(ctx, grad_y, x, weight, bias, residual, mean, invstd, y, reserve)
    if path == "eager" and ctx.relu and y is None:  # the output was not kept: the kernels need no mask
        path = "triton"
    dx, dweight, dbias, dres = torch.ops.fastresnet.batch_norm_act_backward(
        grad_y, x, weight, bias, residual, mean, invstd, y, reserve, ctx.impl, ctx.eps, ctx.relu, list(ctx.wanted),
        path)
    wanted = ctx.wanted
    return (dx if wanted[0] else None, dweight if wanted[1] else None, dbias if wanted[2] else None,
            dres if wanted[3] else None, None, None, None)


torch.library.register_autograd("fastresnet::batch_norm_act_train", _train_grads, setup_context=_train_setup)


@torch.library.custom_op("fastresnet::bn_act_stats", mutates_args=())
def _bn_act_stats(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor],
                  relu: bool) -> Tensor:
    return kernels().bn_act.affine_act_fwd(x, weight, bias, center=mean, invstd=invstd, residual=residual, relu=relu)


@_bn_act_stats.register_fake
def _(x, mean, invstd, weight, bias, residual, relu):
    return torch.empty_like(x)


def _bn_act_stats_setup(ctx, inputs, output):
    x, mean, invstd, weight, bias, residual, relu = inputs
    ctx.save_for_backward(x, weight, bias, residual, mean, invstd)
    ctx.relu = relu


def _bn_act_stats_grads(ctx, grad_y):
    x, weight, bias, residual, mean, invstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    wanted = [needs[0], needs[3], needs[4], needs[5]]
    dx, dweight, dbias, dres = torch.ops.fastresnet.batch_norm_act_backward(
        grad_y, x, weight, bias, residual, mean, invstd, None, x.new_empty(0, dtype=torch.uint8), 0, 0.0, ctx.relu,
        wanted, "triton")
    return (dx if wanted[0] else None, None, None, dweight if wanted[1] else None, dbias if wanted[2] else None,
            dres if wanted[3] else None, None)


torch.library.register_autograd("fastresnet::bn_act_stats", _bn_act_stats_grads, setup_context=_bn_act_stats_setup)


# ---------------------------------------------------------------------------
# The choices
# ---------------------------------------------------------------------------


def _problem(x: Tensor, residual: Optional[Tensor], relu: bool) -> tuple:
    """What a choice depends on, cheap to build on every call."""
    return (x.shape, x.stride(), x.dtype, None if residual is None else (residual.stride(), residual.dtype), relu)


def _backward_problem(problem: tuple, forward: str, wanted: tuple) -> tuple:
    return (*problem, "after-" + forward, _GRADS[wanted])


def _training_run(x, weight, bias, residual, eps, relu, forward: str):
    """A forward through `forward` without autograd (timing moves no running statistic)."""
    with torch.no_grad():
        return torch.ops.fastresnet.batch_norm_act_train(x, weight, bias, residual, eps, relu, forward)


def _forward_alone(problem, x, weight, bias, residual, eps, relu) -> str:
    return BN_FORWARD.choose(
        problem, x.device, _default(x, default_forward(x, True)), args=(x,),
        timed=lambda name: lambda: _training_run(x, weight, bias, residual, eps, relu, name))


def _backward_after(forward, problem, wanted, saved, grad_y) -> str:
    """The backward path after `forward`, timed alone on what that forward saved."""
    x, weight, bias, residual, mean, invstd, y, reserve, impl, eps, relu = saved
    return BN_BACKWARD.choose(
        _backward_problem(problem, forward, wanted), x.device, _default(x, DEFAULT_BACKWARD), args=(x,),
        timed=lambda name: lambda: torch.ops.fastresnet.batch_norm_act_backward(
            grad_y, x, weight, bias, residual, mean, invstd, y, reserve, impl, eps, relu, list(wanted), name))


def _backward_path(ctx, grad_y, x, weight, bias, residual, mean, invstd, y, reserve) -> str:
    """The backward to run after ctx's forward; at the first backward of a problem with gradients also the
    step: each forward followed by its best backward, timed as one, so that a forward that wins alone but
    leaves a slower backward behind (ATen's native backward after the kernels, where cuDNN's follows its
    own forward) cannot make a training step slower than eager's."""
    saved = (x, weight, bias, residual, mean, invstd, y, reserve, ctx.impl, ctx.eps, ctx.relu)
    path = _backward_after(ctx.forward, ctx.problem, ctx.wanted, saved, grad_y)
    step_problem = (*ctx.problem, _GRADS[ctx.wanted])
    if torch.compiler.is_compiling() or BN_STEP.known(step_problem, x.device) is not None:
        return path

    def step(forward):
        out = _training_run(x, weight, bias, residual, ctx.eps, ctx.relu, forward)
        saved_after = (x, weight, bias, residual, out[1], out[2], out[0], out[4], out[5], ctx.eps, ctx.relu)
        backward = _backward_after(forward, ctx.problem, ctx.wanted, saved_after, grad_y)  # timed before the steps
        return lambda: _step(x, weight, bias, residual, grad_y, ctx, forward, backward)

    try:
        BN_STEP.choose(step_problem, x.device, ctx.forward, timed=step, args=(x,))
    except Exception as err:  # a failing candidate must not break training: keep this forward
        tuning.log.info("tuning: the step choice for %s failed, keeping %s: %s", ctx.problem, ctx.forward, err)
        BN_STEP.remember(step_problem, x.device, ctx.forward)
    return path


def _step(x, weight, bias, residual, grad_y, ctx, forward: str, backward: str):
    y, mean, invstd, _, reserve, impl = _training_run(x, weight, bias, residual, ctx.eps, ctx.relu, forward)
    grads = torch.ops.fastresnet.batch_norm_act_backward(grad_y, x, weight, bias, residual, mean, invstd, y, reserve,
                                                         impl, ctx.eps, ctx.relu, list(ctx.wanted), backward)
    return (y, invstd, *grads)


def _training_paths(problem, wanted, x, weight, bias, residual, eps, relu) -> tuple[str, bool]:
    """(the forward to run, whether every stage of the call is "eager": then plain ATen code runs)."""
    device = x.device
    if not any(wanted):
        forward = _forward_alone(problem, x, weight, bias, residual, eps, relu)
        return forward, forward == "eager"
    # The forward whose step (with its best backward) was fastest, decided at the first backward; until
    # then the forward timed alone.
    forward = BN_STEP.known((*problem, _GRADS[wanted]), device) or _forward_alone(problem, x, weight, bias,
                                                                                  residual, eps, relu)
    backward_problem = _backward_problem(problem, forward, wanted)
    if torch.compiler.is_compiling():  # nothing is timed: a choice made eagerly, a pin or the default
        backward = BN_BACKWARD.choose(backward_problem, device, _default(x, DEFAULT_BACKWARD), timed=None)
        return forward, not (forward.startswith("triton") and backward.startswith("triton"))
    return forward, forward == "eager" and BN_BACKWARD.known(backward_problem, device) == "eager"


def _eval_with_grad_run(x, running_mean, running_var, weight, bias, eps, residual, relu, name):
    """An eval path with gradients, forward and backward, on detached copies (no .grad accumulates). The
    upstream gradient is a constant: timing must leave the run's random stream as it was (a run whose
    choices come from the disk cache draws the same numbers)."""

    def leaf(t):
        return None if t is None else t.detach().requires_grad_(t.requires_grad)

    x_, w_, b_, r_ = (leaf(t) for t in (x, weight, bias, residual))
    wrt = [t for t in (x_, w_, b_, r_) if t is not None and t.requires_grad]
    with torch.enable_grad():
        y = batch_norm_act(x_, running_mean, running_var, w_, b_, False, 0.0, eps, r_, relu, path=name)
        return torch.autograd.grad(y, wrt, torch.ones_like(y))


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------


def _validate(x, running_mean, running_var, weight, bias, training, residual) -> None:
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


def batch_norm_act(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5, residual: Optional[Tensor] = None, relu: bool = True,
                   *, path: Optional[str] = None) -> Tensor:
    """act(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) + residual),
    with F.batch_norm's semantics: in training the batch statistics normalise the input and, when given,
    the running statistics are updated in place (running_var with the unbiased variance); otherwise the
    running statistics normalise it. weight/bias None mean 1/0. `path` runs an eval path by name (timing).
    """
    _validate(input, running_mean, running_var, weight, bias, training, residual)
    if not backend.use_triton(input):
        return batch_norm_act_reference(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                        residual, relu)
    x, residual = as_rows(input), as_rows(residual)
    wanted = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (x, weight, bias, residual))
    problem = _problem(x, residual, relu)
    if training:
        forward, plain = _training_paths(problem, wanted, x, weight, bias, residual, eps, relu)
        if plain:
            return _eager(x, running_mean, running_var, weight, bias, True, momentum, eps, residual, relu)
        y, mean, _, var_unbiased, _, _ = torch.ops.fastresnet.batch_norm_act_train(x, weight, bias, residual, eps,
                                                                                   relu, forward)
        update_running_stats(running_mean, running_var, mean, var_unbiased, momentum)
        return y
    op = BN_EVAL_GRAD if any(wanted) else BN_EVAL
    path = path or op.choose(problem, x.device, _default(x, "triton"), args=(x,), timed=lambda name: lambda: (
        _eval_with_grad_run(x, running_mean, running_var, weight, bias, eps, residual, relu, name) if any(wanted)
        else batch_norm_act(x, running_mean, running_var, weight, bias, False, 0.0, eps, residual, relu, path=name)))
    if path == "eager":
        return _eager(x, running_mean, running_var, weight, bias, False, 0.0, eps, residual, relu)
    if path != "triton" and not torch.compiler.is_compiling():  # the shelf's eval kernels are no custom ops
        return EXPERIMENTAL[path](x, running_mean, running_var, weight, bias, eps, residual, relu)
    weight, bias = _fp32(weight, bias, x)
    scale = weight * torch.rsqrt(running_var.float() + eps)  # through autograd: eval with gradients
    return torch.ops.fastresnet.affine_act(x, scale, bias, running_mean.float(), residual, relu)


def affine_act(input: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None, relu: bool = True, *,
               center: Optional[Tensor] = None) -> Tensor:
    """act((input - center[c]) * scale[c] + shift[c] + residual[n, c, h, w]).

    input: NCHW-logical, channels_last or contiguous, fp32/fp16/bf16; the output has its dtype and memory
    format. scale, shift, center: per channel, computed in fp32. center (default none) keeps a large mean
    out of the rounding: the eval BatchNorm passes its running mean. Gradients flow to every input.
    """
    check_activation(input)
    for name, v in (("scale", scale), ("shift", shift), ("center", center)):
        check_channel_vector(v, input, name)
    check_residual(residual, input.shape, input.device)
    if not backend.use_triton(input):
        return affine_act_reference(input, scale, shift, residual, relu, center)
    center = center.float() if center is not None else None
    return torch.ops.fastresnet.affine_act(as_rows(input), scale.float(), shift.float(), center, as_rows(residual),
                                           relu)


def bn_act_stats(input: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor,
                 residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """act((input - mean) * invstd * weight + bias + residual), the input's batch statistics from conv_stats.

    The training BatchNorm's output pass without a statistics pass: gradients flow to the input (with
    batch statistics), weight, bias and the residual.
    """
    check_residual(residual, input.shape, input.device)
    if not backend.use_triton(input):
        return affine_act_reference(input, invstd * weight, bias, residual, relu, center=mean)
    return torch.ops.fastresnet.bn_act_stats(as_rows(input), mean, invstd, weight.float(), bias.float(),
                                             as_rows(residual), relu)
