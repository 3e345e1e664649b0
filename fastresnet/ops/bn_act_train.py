"""Training BatchNorm + residual add + ReLU with the forward and the backward
chosen separately (eager calls; torch.compile uses the custom ops of bn_act.py).

Both forward paths leave the same state for the backward, so either backward
can follow either forward:
  x, weight, bias, residual   the inputs, as given
  mean, invstd                per channel, fp32: the batch mean and
                              1 / sqrt(biased var + eps) (what cuDNN and ATen's
                              native kernel save as save_mean / save_var)
  y                           the output, whose sign is the ReLU mask (saved
                              only while an eager backward may run)
  impl, reserve               aten's backend index (0 native, 1 cuDNN) and
                              cuDNN's reserve space (0 and empty after Triton)

Forward paths:
  triton  the statistics pass (bn_stats) and one normalise/add/ReLU pass
  triton_single  one launch: a program per channel block computes the
          statistics, then normalises (small activations only; new, never run
          on a GPU: a candidate the first GPU call times)
  eager   aten._batch_norm_impl_index, exactly what F.batch_norm runs (it also
          updates the running statistics), then add and ReLU
Backward paths:
  triton  one reduction pass and one elementwise pass, the ReLU mask recomputed
          from x and the statistics
  triton_pipelined  the same with the reduction's row loop software-pipelined
          (new, never run on a GPU: a candidate the first GPU call times)
  eager   threshold_backward(dy, y) for the ReLU (what autograd runs after
          F.relu), then aten._batch_norm_impl_index_backward with the forward's
          backend index: cuDNN's backward after the eager forward, ATen's
          native backward after the Triton one

The op layer (bn_act.py) times the forward paths alone and, at the first
backward of a problem, the backward paths alone on the saved tensors and the
real upstream gradient (fastresnet.ops.dispatch), and passes its choices in.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor


_kernels_module = None


def kernels():
    """fastresnet.kernels.bn_act, imported on first use (TRITON_INTERPRET must be
    set before the import), then kept: an import statement per call costs ~1 us."""
    global _kernels_module
    if _kernels_module is None:
        from fastresnet.kernels import bn_act

        _kernels_module = bn_act
    return _kernels_module


def as_rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """t itself when the kernels can address it by strides, else a channels_last copy."""
    if t is None or kernels().has_row_strides(t):
        return t
    return t.contiguous(memory_format=torch.channels_last)


def fp32_affine(weight: Optional[Tensor], bias: Optional[Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """weight and bias as the kernels read them: fp32, ones and zeros for None."""
    channels = x.shape[1]
    weight = weight.float() if weight is not None else x.new_ones(channels, dtype=torch.float32)
    bias = bias.float() if bias is not None else x.new_zeros(channels, dtype=torch.float32)
    return weight, bias


# ---------------------------------------------------------------------------
# The Triton kernels (also the bodies of bn_act.py's custom ops)
# ---------------------------------------------------------------------------


def train_forward(x, weight, bias, residual, eps, relu):
    """(y, mean, invstd, unbiased var); weight and bias fp32."""
    k = kernels()
    mean, invstd, var_unbiased = k.bn_stats(x, eps)
    y = k.affine_act_fwd(x, weight, bias, center=mean, invstd=invstd, residual=residual, relu=relu)
    return y, mean, invstd, var_unbiased


def train_backward(grad_y, x, weight, bias, mean, invstd, residual, relu, pipeline=False):
    """(dx, dweight, dbias, dresidual); weight and bias fp32, dresidual None without a residual.
    pipeline: the software-pipelined reduction (kernels.affine_act_bwd)."""
    dx, sum_g, sum_gx, dres = kernels().affine_act_bwd(
        grad_y, x, weight, bias, center=mean, invstd=invstd, residual=residual, relu=relu,
        param_grads=True, batch_stats=True, pipeline=pipeline,
    )
    return dx, sum_gx * invstd, sum_g, dres


def update_running_stats(running_stats, mean, var_unbiased, momentum):
    """running = (1 - momentum) * running + momentum * batch, both statistics in one
    launch (four with mul_/add_: host time on short layers)."""
    if running_stats is None:
        return
    running_mean, running_var = running_stats
    with torch.no_grad():
        torch._foreach_lerp_(
            [running_mean, running_var], [mean.to(running_mean.dtype), var_unbiased.to(running_var.dtype)], momentum
        )


# ---------------------------------------------------------------------------
# Forward paths: (y, mean, invstd, impl, reserve)
# ---------------------------------------------------------------------------

_NO_RESERVE: dict[torch.device, Tensor] = {}


def _no_reserve(x: Tensor) -> Tensor:
    """The empty reserve space of a non-cuDNN forward (one per device, not one per call)."""
    reserve = _NO_RESERVE.get(x.device)
    if reserve is None:
        reserve = _NO_RESERVE[x.device] = torch.empty(0, dtype=torch.uint8, device=x.device)
    return reserve


def forward_triton(x, weight, bias, residual, running_stats, momentum, eps, relu):
    w, b = fp32_affine(weight, bias, x)
    y, mean, invstd, var_unbiased = train_forward(x, w, b, residual, eps, relu)
    update_running_stats(running_stats, mean, var_unbiased, momentum)
    return y, mean, invstd, 0, _no_reserve(x)


def forward_triton_single(x, weight, bias, residual, running_stats, momentum, eps, relu):
    w, b = fp32_affine(weight, bias, x)
    y, mean, invstd, var_unbiased = kernels().bn_train_fwd_single(x, w, b, eps, residual=residual, relu=relu)
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

# triton_single runs one program per channel block (C / 16 on a GPU), which can
# only pay off while the whole activation is small: offered up to the 14x14 stage
# at batch 256 (50,176 rows), where host time and launches decide.
SINGLE_PASS_MAX_ROWS = 2**16


def forward_paths_for(x: Tensor) -> tuple[str, ...]:
    """The forward paths worth timing for x (triton_single only for few rows)."""
    if x.shape[0] * x.shape[2] * x.shape[3] <= SINGLE_PASS_MAX_ROWS:
        return tuple(FORWARD_PATHS)
    return tuple(name for name in FORWARD_PATHS if name != "triton_single")


def forward_saved(path: str, x, weight, bias, residual, eps, relu) -> "Saved":
    """What a forward path leaves for the backward, run without autograd and
    without running statistics (for timing a backward after it); y is kept
    even without a ReLU, so that the dispatch can check a new forward's output."""
    with torch.no_grad():
        y, mean, invstd, impl, reserve = FORWARD_PATHS[path](x, weight, bias, residual, None, 0.0, eps, relu)
    return Saved(x, weight, bias, residual, mean, invstd, y, impl, reserve, None, eps, relu)


# ---------------------------------------------------------------------------
# Backward paths: (dx, dweight, dbias, dresidual), None where not needed
# ---------------------------------------------------------------------------


class Saved(NamedTuple):
    """What the backward reads; see the module docstring."""

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


def backward_triton(s: Saved, grad_y: Tensor, needs: tuple, pipeline: bool = False) -> tuple:
    w, b = fp32_affine(s.weight, s.bias, s.x)
    dx, dweight, dbias, dres = train_backward(
        as_rows(grad_y), s.x, w, b, s.mean, s.invstd, s.residual, s.relu, pipeline
    )
    return tuple(g if need else None for need, g in zip(needs, (dx, dweight, dbias, dres)))


def backward_triton_pipelined(s: Saved, grad_y: Tensor, needs: tuple) -> tuple:
    """The kernels with the software-pipelined reduction: a candidate that has
    not run on a GPU yet, so the dispatch times it against the plain one."""
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


def backward_candidates(saved: Saved, grad_y: Tensor, needs: tuple) -> dict[str, Callable[[], tuple]]:
    """Zero-argument callables running each backward path on the saved tensors
    (for timing: they return new tensors and change nothing)."""
    return {name: (lambda path=path: path(saved, grad_y, needs)) for name, path in BACKWARD_PATHS.items()}


class BackwardPlan(NamedTuple):
    """The op layer's choice for one call: the forward path, and `choose(saved,
    grad_y)` which names the backward path (timing both the first time). `known`
    is the backward path when already decided (None otherwise): with a Triton
    one the output need not be kept for the ReLU mask."""

    forward: str
    choose: Callable[[Saved, Tensor], str]
    known: Optional[str]


class BatchNormActTrain(torch.autograd.Function):
    """act(BatchNorm_train(x) + residual) with the forward path given by the plan
    and the backward path chosen when the backward runs. Running statistics are
    updated in the forward (in place, passed in a tuple so that autograd does
    not treat them as inputs)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_stats, momentum, eps, relu, plan: BackwardPlan):
        y, mean, invstd, impl, reserve = FORWARD_PATHS[plan.forward](
            x, weight, bias, residual, running_stats, momentum, eps, relu
        )
        keep_output = relu and plan.known in (None, "eager")  # the kernels recompute the mask
        ctx.save_for_backward(x, weight, bias, residual, mean, invstd, y if keep_output else None, reserve)
        ctx.impl, ctx.running_stats, ctx.eps, ctx.relu, ctx.plan = impl, running_stats, eps, relu, plan
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, residual, mean, invstd, y, reserve = ctx.saved_tensors
        saved = Saved(x, weight, bias, residual, mean, invstd, y, ctx.impl, reserve, ctx.running_stats,
                      ctx.eps, ctx.relu)
        path = ctx.plan.choose(saved, grad_y)
        if path == "eager" and ctx.relu and y is None:  # the choice changed since the forward (a forced mode)
            path = "triton"
        grads = BACKWARD_PATHS[path](saved, grad_y, ctx.needs_input_grad[:4])
        return (*grads, None, None, None, None, None)
