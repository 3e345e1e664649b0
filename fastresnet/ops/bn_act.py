"""BatchNorm + residual add + ReLU as autograd-capable torch ops.

Two public functions:
  affine_act(x, scale, shift, residual=None, relu=True)
      y = act(x * scale[c] + shift[c] + residual): the eval / folded BatchNorm,
      also the epilogue after a cuDNN convolution.
  batch_norm_act(x, weight, bias, running_mean, running_var, training, momentum, eps,
                 residual=None, relu=True)
      act(F.batch_norm(...) + residual), running statistics updated in place
      exactly like F.batch_norm (momentum is a float here; nn.BatchNorm2d's
      momentum=None lives in fastresnet.nn.BatchNormAct2d).

Each picks its path in Python, before any op is called (backend.use_triton):
the Triton kernels wrapped as torch.library custom ops (opaque to
torch.compile, which sees their fake implementations, so fullgraph=True
traces them without a break), or the eager reference, which torch.compile
traces like any PyTorch code.

On a GPU batch_norm_act also chooses, per problem (shape, strides, dtype,
train/eval, residual, ReLU, gradient needed), between the fused kernels
("triton") and PyTorch's own F.batch_norm + add + ReLU ("eager", cuDNN): the
first call times both, forward and backward, on the real inputs
(fastresnet.ops.dispatch: disk cache, FASTRESNET_DISPATCH, decisions()), so the
op is never slower than plain PyTorch. Inside torch.compile nothing is timed:
an earlier eager call's choice is used, else the fixed rule (fixed_path), which
there is Inductor's code for the unfused ops.

Layouts: channels_last and contiguous NCHW tensors go to the kernels as they
are (by strides; channels_last is the fast one). A tensor whose H and W do not
share one stride (for example a slice along W) is first copied to
channels_last; nothing is ever silently made NCHW-contiguous.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastresnet import backend
from fastresnet.ops import dispatch
from fastresnet.reference import affine_act_reference, batch_norm_act_reference

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    # Imported on first use: TRITON_INTERPRET must be set before the import.
    from fastresnet.kernels import bn_act

    return bn_act


def _as_rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """t itself when the kernels can address it by strides, else a channels_last copy."""
    if t is None or _kernels().has_row_strides(t):
        return t
    return t.contiguous(memory_format=torch.channels_last)


def _empty_grad(x: Tensor) -> Tensor:
    """Placeholder output for a gradient that was not asked for (ops return Tensors only)."""
    return x.new_empty(0, dtype=torch.float32)


# ---------------------------------------------------------------------------
# affine_act: y = act((x - center) * scale + shift + residual)
# ---------------------------------------------------------------------------


@torch.library.custom_op("fastresnet::affine_act", mutates_args=())
def _affine_act_op(
    x: Tensor, scale: Tensor, shift: Tensor, center: Optional[Tensor], residual: Optional[Tensor], relu: bool
) -> Tensor:
    return _kernels().affine_act_fwd(x, scale, shift, center=center, residual=residual, relu=relu)


@_affine_act_op.register_fake
def _(x, scale, shift, center, residual, relu):
    return torch.empty_like(x)


@torch.library.custom_op("fastresnet::affine_act_backward", mutates_args=())
def _affine_act_backward_op(
    grad_y: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    center: Optional[Tensor],
    residual: Optional[Tensor],
    relu: bool,
    param_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_scale, grad_shift, grad_residual); grad_scale and grad_shift
    are empty unless param_grads, grad_residual is empty without a residual."""
    dx, sum_g, sum_gx, dres = _kernels().affine_act_bwd(
        grad_y, x, scale, shift, center=center, residual=residual, relu=relu, param_grads=param_grads
    )
    return (
        dx,
        sum_gx if param_grads else _empty_grad(x),
        sum_g if param_grads else _empty_grad(x),
        dres if dres is not None else _empty_grad(x),
    )


@_affine_act_backward_op.register_fake
def _(grad_y, x, scale, shift, center, residual, relu, param_grads):
    channels = x.new_empty(x.shape[1], dtype=torch.float32) if param_grads else _empty_grad(x)
    return (
        torch.empty_like(x),
        channels,
        torch.empty_like(channels),
        torch.empty_like(residual) if residual is not None else _empty_grad(x),
    )


def _affine_act_setup_context(ctx, inputs, output):
    x, scale, shift, center, residual, relu = inputs
    ctx.save_for_backward(x, scale, shift, center, residual)
    ctx.relu = relu


def _affine_act_backward(ctx, grad_y):
    x, scale, shift, center, residual = ctx.saved_tensors
    needs = ctx.needs_input_grad
    param_grads = needs[1] or needs[2] or needs[3]
    dx, dscale, dshift, dres = torch.ops.fastresnet.affine_act_backward(
        _as_rows(grad_y), x, scale, shift, center, residual, ctx.relu, param_grads
    )
    # d/dcenter of (x - center) * scale is -scale, summed over the rows like dshift.
    dcenter = -scale * dshift if needs[3] else None
    return (
        dx if needs[0] else None,
        dscale if needs[1] else None,
        dshift if needs[2] else None,
        dcenter,
        dres if needs[4] else None,
        None,
    )


torch.library.register_autograd(
    "fastresnet::affine_act", _affine_act_backward, setup_context=_affine_act_setup_context
)


# ---------------------------------------------------------------------------
# batch_norm_act in training: batch statistics, then the affine_act pass
# ---------------------------------------------------------------------------


@torch.library.custom_op("fastresnet::batch_norm_act_train", mutates_args=())
def _batch_norm_act_train_op(
    x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], eps: float, relu: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, unbiased var): the last three per channel, fp32."""
    return _train_forward(x, weight, bias, residual, eps, relu)


def _train_forward(x, weight, bias, residual, eps, relu):
    k = _kernels()
    mean, invstd, var_unbiased = k.bn_stats(x, eps)
    y = k.affine_act_fwd(x, weight, bias, center=mean, invstd=invstd, residual=residual, relu=relu)
    return y, mean, invstd, var_unbiased


@_batch_norm_act_train_op.register_fake
def _(x, weight, bias, residual, eps, relu):
    stat = x.new_empty(x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), stat, torch.empty_like(stat), torch.empty_like(stat)


@torch.library.custom_op("fastresnet::batch_norm_act_backward", mutates_args=())
def _batch_norm_act_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    mean: Tensor,
    invstd: Tensor,
    residual: Optional[Tensor],
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_residual), the last empty without a residual.
    One reduction pass (sum g, sum g*(x-mean)) and one elementwise pass."""
    dx, dweight, dbias, dres = _train_backward(grad_y, x, weight, bias, mean, invstd, residual, relu)
    return dx, dweight, dbias, dres if dres is not None else _empty_grad(x)


def _train_backward(grad_y, x, weight, bias, mean, invstd, residual, relu):
    dx, sum_g, sum_gx, dres = _kernels().affine_act_bwd(
        grad_y, x, weight, bias, center=mean, invstd=invstd, residual=residual, relu=relu,
        param_grads=True, batch_stats=True,
    )
    return dx, sum_gx * invstd, sum_g, dres


@_batch_norm_act_backward_op.register_fake
def _(grad_y, x, weight, bias, mean, invstd, residual, relu):
    return (
        torch.empty_like(x),
        torch.empty_like(mean),
        torch.empty_like(mean),
        torch.empty_like(residual) if residual is not None else _empty_grad(x),
    )


def _batch_norm_act_setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, relu = inputs
    _, mean, invstd, var_unbiased = output
    ctx.save_for_backward(x, weight, bias, mean, invstd, residual)
    ctx.mark_non_differentiable(mean, invstd, var_unbiased)
    ctx.relu = relu


def _needed_grads(needs, grads) -> tuple:
    """(dx, dweight, dbias, dresidual) where autograd asked for them, None for the rest and for
    the two non-tensor arguments (eps, relu): shared by the custom op and the autograd.Function."""
    return (*(g if need else None for need, g in zip(needs[:4], grads)), None, None)


def _batch_norm_act_backward(ctx, grad_y, _grad_mean, _grad_invstd, _grad_var):
    x, weight, bias, mean, invstd, residual = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = torch.ops.fastresnet.batch_norm_act_backward(
        _as_rows(grad_y), x, weight, bias, mean, invstd, residual, ctx.relu
    )
    return _needed_grads(needs, grads)


torch.library.register_autograd(
    "fastresnet::batch_norm_act_train", _batch_norm_act_backward, setup_context=_batch_norm_act_setup_context
)


class _BatchNormActTrain(torch.autograd.Function):
    """Outside torch.compile: the same kernels and backward as
    fastresnet::batch_norm_act_train, without the custom-op machinery that
    torch.compile needs. On this project's CPU, with the kernels stubbed out,
    a forward+backward costs ~115 us through the custom op and its registered
    autograd, ~60 us through this Function: host time that a GPU waits on
    when a layer's kernels are short (the 7x7 and 14x14 stages)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, relu):
        y, mean, invstd, var_unbiased = _train_forward(x, weight, bias, residual, eps, relu)
        ctx.save_for_backward(x, weight, bias, mean, invstd, residual)
        ctx.mark_non_differentiable(mean, invstd, var_unbiased)
        ctx.relu = relu
        return y, mean, invstd, var_unbiased

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_invstd, _grad_var):
        x, weight, bias, mean, invstd, residual = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = _train_backward(_as_rows(grad_y), x, weight, bias, mean, invstd, residual, ctx.relu)
        return _needed_grads(needs, grads)


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------


def _check_input(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 4-D NCHW-logical tensor, got {shape}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def _check_channel_vector(v: Optional[Tensor], x: Tensor, name: str) -> None:
    if v is None:
        return
    if v.shape != (x.shape[1],):
        raise ValueError(f"{name} must have shape ({x.shape[1]},) for input {tuple(x.shape)}, got {tuple(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"{name} is on {v.device} but the input is on {x.device}")


def _check_residual(residual: Optional[Tensor], x: Tensor) -> None:
    if residual is None:
        return
    _check_input(residual, "residual")
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != input shape {tuple(x.shape)}")
    if residual.device != x.device:
        raise ValueError(f"residual is on {residual.device} but the input is on {x.device}")


def affine_act(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    *,
    center: Optional[Tensor] = None,
) -> Tensor:
    """y = act((x - center[c]) * scale[c] + shift[c] + residual[n, c, h, w]).

    x: NCHW-logical, channels_last or contiguous, fp32/fp16/bf16; y has x's
    dtype and memory format. scale, shift, center: per channel, computed in
    fp32. center (default none) keeps a large mean out of the rounding: the
    eval BatchNorm passes its running mean. Gradients flow to x, scale, shift,
    center and residual.
    """
    _check_input(x)
    for name, v in (("scale", scale), ("shift", shift), ("center", center)):
        _check_channel_vector(v, x, name)
    _check_residual(residual, x)
    if not backend.use_triton(x):
        return affine_act_reference(x, scale, shift, residual, relu, center)
    center = center.float() if center is not None else None
    return torch.ops.fastresnet.affine_act(
        _as_rows(x), scale.float(), shift.float(), center, _as_rows(residual), relu
    )


def batch_norm_act(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    residual: Optional[Tensor] = None,
    relu: bool = True,
) -> Tensor:
    """act(F.batch_norm(x, running_mean, running_var, weight, bias, training,
    momentum, eps) + residual), with F.batch_norm's semantics: in training the
    batch statistics normalise x and, when given, the running statistics are
    updated in place (running_var with the unbiased variance); otherwise the
    running statistics normalise x. weight/bias None mean 1/0.
    """
    _check_input(x)
    for name, v in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_channel_vector(v, x, name)
    _check_residual(residual, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var must be given when training=False")
    if training and x.numel() // x.shape[1] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    if not backend.use_triton(x):
        return batch_norm_act_reference(
            x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu
        )
    args = (x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu)
    return PATHS[_path_for(*args)](*args)


def _triton_batch_norm_act(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu):
    """The fused kernels: (training) statistics pass + one normalise/add/ReLU pass."""
    channels = x.shape[1]
    weight = weight.float() if weight is not None else x.new_ones(channels, dtype=torch.float32)
    bias = bias.float() if bias is not None else x.new_zeros(channels, dtype=torch.float32)
    if not training:
        scale = weight * torch.rsqrt(running_var.float() + eps)
        return affine_act(x, scale, bias, residual, relu, center=running_mean)
    # torch.compile needs the custom op (opaque, with a fake implementation);
    # eager calls take the cheaper autograd.Function over the same kernels.
    train = torch.ops.fastresnet.batch_norm_act_train if torch.compiler.is_compiling() else _BatchNormActTrain.apply
    y, mean, _, var_unbiased = train(_as_rows(x), weight, bias, _as_rows(residual), eps, relu)
    if running_mean is not None:
        # running = (1 - momentum) * running + momentum * batch, both statistics
        # in one launch (four with mul_/add_: host time on short layers).
        with torch.no_grad():
            torch._foreach_lerp_(
                [running_mean, running_var],
                [mean.to(running_mean.dtype), var_unbiased.to(running_var.dtype)],
                momentum,
            )
    return y


def _eager_batch_norm_act(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu):
    """What plain PyTorch runs for BatchNorm2d -> add -> ReLU (cuDNN's BatchNorm
    on a GPU), in x's dtype, running statistics updated by F.batch_norm itself."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    if relu:
        y = F.relu(y, inplace=True)  # on a fresh tensor; BatchNorm's backward does not need its output
    return y.to(x.dtype)


PATHS = {"triton": _triton_batch_norm_act, "eager": _eager_batch_norm_act}

# ---------------------------------------------------------------------------
# Per-problem dispatch between the paths (CUDA only)
# ---------------------------------------------------------------------------

# Below these many rows (N*H*W) per channel the fused training kernels lost to
# eager cuDNN BatchNorm + add + ReLU on an H200 (bf16, channels_last, batch
# 256; /work/wt/gpu1, git 940f6a4), fused time / eager time:
#   forward + backward  56x56x256 0.73 (fused wins), 28x28x512 1.12, 14x14x1024 1.51, 7x7x2048 3.20
#   forward only        56x56x256 0.60,  28x28x512 0.74,  14x14x1024 0.94,  7x7x2048 1.69
# Rows: 802,816 / 200,704 / 50,176 / 12,544. A fixed ~0.35 ms per call (host time:
# custom-op dispatch, launches; bench/NOTES_bn_act.md) decides the small shapes,
# hence a threshold on rows.
TRAIN_GRAD_MIN_ROWS = 2**19
TRAIN_FORWARD_MIN_ROWS = 2**15


def fixed_path(x: Tensor, training: bool, needs_grad: bool, compiling: bool = False) -> str:
    """The choice when nothing is measured (FASTRESNET_DISPATCH=fixed, inside
    torch.compile before any eager call): the H200 numbers above. Eval is one
    pass over x and the residual (3 tensor passes) against eager's BatchNorm,
    add and ReLU (7), so the kernel is the rule there.

    Inside torch.compile the other path is Inductor's code for the unfused
    ops, which beat the kernels at every stage on the H200, forward (0.60 /
    0.37 / 0.30 / 0.29 ms against 0.87 / 0.56 / 0.43 / 0.41) and forward +
    backward (1.70 / 1.03 / 0.95 / 0.85 against 1.78 / 1.44 / 1.13 / 1.37), and
    can fuse with its neighbours: so "eager" (traced), in training and eval."""
    if compiling:
        return "eager"
    if not training:
        return "triton"
    rows = x.shape[0] * x.shape[2] * x.shape[3]
    return "triton" if rows >= (TRAIN_GRAD_MIN_ROWS if needs_grad else TRAIN_FORWARD_MIN_ROWS) else "eager"


_chosen_paths: dict[tuple, str] = {}  # call signature -> path: no key string is built on the hot path


def _measured_dispatch(x: Tensor) -> bool:
    """Whether this input chooses between paths at all (on a GPU). Elsewhere the
    Triton path is the interpreter (tests): behaviour there is unchanged."""
    return x.is_cuda


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _signature(x, residual, training, relu, needs_grad) -> tuple:
    res = None if residual is None else (residual.stride(), residual.dtype)
    return (dispatch.dispatch_mode(), tuple(x.shape), x.stride(), x.dtype, res, training, relu, needs_grad, x.device)


def problem_key(x, residual, training, relu, needs_grad) -> str:
    """The dispatch cache key of one problem."""
    layout = "cl" if x.is_contiguous(memory_format=torch.channels_last) else (
        "nchw" if x.is_contiguous() else "strided")
    return (f"batch_norm_act:{'train' if training else 'eval'}:{'fwdbwd' if needs_grad else 'fwd'}"
            f":x{'x'.join(map(str, x.shape))}:{str(x.dtype).removeprefix('torch.')}:{layout}"
            f":res{int(residual is not None)}:relu{int(relu)}")


def _path_for(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu) -> str:
    if not _measured_dispatch(x):
        return "triton"
    needs_grad = _needs_grad(x, weight, bias, residual)
    signature = _signature(x, residual, training, relu, needs_grad)
    if torch.compiler.is_compiling():  # no timing while tracing: an eager call's choice, else the rule
        mode = signature[0]
        if mode in PATHS:
            return mode
        return _chosen_paths.get(signature) or fixed_path(x, training, needs_grad, compiling=True)
    path = _chosen_paths.get(signature)
    if path is None:
        candidates = _timing_candidates(x, weight, bias, running_mean, running_var, training, eps, residual,
                                        relu, needs_grad)
        key = problem_key(x, residual, training, relu, needs_grad)
        path = dispatch.choose(key, candidates, fixed_path(x, training, needs_grad), x.device)
        _chosen_paths[signature] = path
    return path


def _timing_candidates(x, weight, bias, running_mean, running_var, training, eps, residual, relu, needs_grad):
    """Zero-argument callables that run each path once on the real shapes and
    dtypes: forward, and backward when the call needs gradients. They work on
    detached inputs and no running statistics (copies in eval), so timing moves
    no statistic and accumulates no .grad."""

    def leaf(t):
        return None if t is None else t.detach().requires_grad_(needs_grad and t.requires_grad)

    x_, w_, b_, r_ = (leaf(t) for t in (x, weight, bias, residual))
    stats = (None, None) if training else (running_mean.clone(), running_var.clone())
    wrt = [t for t in (x_, w_, b_, r_) if t is not None and t.requires_grad]
    grad_y = torch.randn_like(x) if needs_grad else None

    def timed(path):
        def step():
            with torch.enable_grad() if needs_grad else torch.no_grad():
                y = path(x_, w_, b_, *stats, training, 0.0, eps, r_, relu)
                if needs_grad:
                    torch.autograd.grad(y, wrt, grad_y)
        return step

    return {name: timed(path) for name, path in PATHS.items()}


def clear_path_memory() -> None:
    """Forget the per-signature choices of this process (tests)."""
    _chosen_paths.clear()
