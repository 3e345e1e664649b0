"""BatchNormAct2d and SyncBatchNormAct2d: torch's BatchNorm modules with the residual add and ReLU fused in.

Subclasses with exactly their parent's parameters and buffers (weight, bias, running_mean,
running_var, num_batches_tracked), so state_dicts load both ways, and exactly its semantics (momentum
including None, the cumulative average; track_running_stats=False; eval mode; the error for one value
per channel in training). forward(x, residual=None) returns act(batch_norm(x) + residual) through
fastresnet.ops.batch_norm_act: one pass over memory (two in training: the statistics, then the
normalisation). SyncBatchNormAct2d reduces its training statistics across the process group, as
nn.SyncBatchNorm does; in eval, and in training without a group of several processes, it is
BatchNormAct2d.

The fused blocks apply whichever BatchNorm module a model holds now (one swapped in later by
torch.nn.SyncBatchNorm.convert_sync_batchnorm is honoured at the next call): batch_norm_act with
batch_norm_args(bn, x) where fusable(bn), else norm_act(bn, x, ...), the module's own computation.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastresnet.ops.bn_act import batch_norm_act, update_running_stats
from fastresnet.ops.conv_bn_act import bn_scale_shift
from fastresnet.reference import affine_act_reference

Activation = Union[str, bool, None]


def momentum_factor(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The running-average factor of this forward, counting the batch in num_batches_tracked in training,
    exactly as nn.BatchNorm2d.forward does (momentum=None: the cumulative average). Every module of the
    library that updates BatchNorm statistics itself counts through this one function."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    return factor


def reduces_across_processes(bn: nn.Module) -> bool:
    """Whether bn's training forward reduces its statistics across several processes (as
    nn.SyncBatchNorm.forward decides)."""
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return False
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    return torch.distributed.get_world_size(bn.process_group or torch.distributed.group.WORLD) > 1


_FUSABLE = (nn.BatchNorm2d, nn.SyncBatchNorm)


def fusable(bn: nn.Module) -> bool:
    """Whether batch_norm_act computes bn exactly: a BatchNorm2d, or a SyncBatchNorm that needs no
    reduction across processes (or one of this module's classes)."""
    return (isinstance(bn, (BatchNormAct2d, SyncBatchNormAct2d)) or type(bn) in _FUSABLE) and \
        not reduces_across_processes(bn)


def norm_act(bn: nn.Module, x: Tensor, residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """act(bn(x) + residual) as bn's own forward computes it, for any BatchNorm module (a FrozenBatchNorm2d,
    a SyncBatchNorm reducing across processes, another subclass); where fusable(bn), batch_norm_act with
    batch_norm_args(bn, x) computes the same in one pass."""
    if reduces_across_processes(bn) and not x.is_cuda:
        return synced_on_cpu(bn, x, residual, relu)
    y = batch_norm(bn, x)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def folded_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """(scale, shift) of bn in eval mode from its statistics as they are now: what conv_bn_act applies."""
    return bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, getattr(bn, "eps", 1e-5))


def batch_norm(bn: nn.Module, x: Tensor) -> Tensor:
    """bn's BatchNorm alone (without the act of this module's classes). A SyncBatchNorm reducing across
    CPU processes, which torch's supports on GPUs only, reduces through fastresnet's implementation."""
    if reduces_across_processes(bn) and not x.is_cuda:
        return synced_on_cpu(bn, x, None, False)
    if isinstance(bn, SyncBatchNormAct2d):
        return nn.SyncBatchNorm.forward(bn, x)
    if isinstance(bn, BatchNormAct2d):
        return nn.BatchNorm2d.forward(bn, x)
    return bn(x)


def _running_stats(bn):
    """(running_mean, running_var) as this forward reads or updates them, or (None, None)."""
    if bn.training and not bn.track_running_stats:
        return None, None
    return bn.running_mean, bn.running_var


def batch_norm_args(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> tuple:
    """(running_mean, running_var, weight, bias, training, momentum, eps) of F.batch_norm for this forward
    of bn, the batch counted: nn.BatchNorm2d.forward's reading of its options, line for line (batch
    statistics in training, and in eval when there are no running ones)."""
    bn._check_input_dim(x)
    factor = momentum_factor(bn)
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    return (*_running_stats(bn), bn.weight, bn.bias, batch_stats, factor, bn.eps)


def synced_on_cpu(bn: nn.SyncBatchNorm, x: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    bn._check_input_dim(x)
    factor = momentum_factor(bn)
    group = bn.process_group or torch.distributed.group.WORLD
    return sync_batch_norm_act(x, *_running_stats(bn), bn.weight, bn.bias, factor, bn.eps, group, residual, relu)


def _relu_from_act(act: Activation) -> bool:
    """True for ReLU: "relu" or True; False for none: None, "none", "identity" or False."""
    if isinstance(act, bool):
        return act
    if act is None or (isinstance(act, str) and act.lower() in ("none", "identity")):
        return False
    if isinstance(act, str) and act.lower() == "relu":
        return True
    raise ValueError(f"act must be 'relu', None/'identity' or a bool, got {act!r}")


class _ActMixin:
    """act=/relu= arguments, forward(x, residual), and a constructor that shares another BatchNorm's tensors."""

    apply_relu: bool

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, *, act: Activation = "relu"):
        """An instance that shares bn's parameter and buffer tensors (not copies)."""
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"expected a BatchNorm module, got {type(bn).__name__}")
        fused = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta", act=act)
        if isinstance(fused, nn.SyncBatchNorm):
            fused.process_group = getattr(bn, "process_group", None)
        for name, param in bn.named_parameters(recurse=False):
            setattr(fused, name, param)
        for name, buffer in bn.named_buffers(recurse=False):
            setattr(fused, name, buffer)
        return fused.train(bn.training)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if reduces_across_processes(self):
            return norm_act(self, input, residual, self.apply_relu)
        return batch_norm_act(input, *batch_norm_args(self, input), residual, self.apply_relu)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={'relu' if self.apply_relu else None}"


class BatchNormAct2d(_ActMixin, nn.BatchNorm2d):
    """act(BatchNorm2d(x) + residual), act in {ReLU, identity}.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as nn.BatchNorm2d.
        act: "relu" (default) or True for ReLU; None, "identity" or False for none.
        relu: the same as a bool; when given it overrides act.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, act: Activation = "relu",
                 relu: Optional[bool] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.apply_relu = _relu_from_act(act if relu is None else bool(relu))


class SyncBatchNormAct2d(_ActMixin, nn.SyncBatchNorm):
    """act(SyncBatchNorm(x) + residual): BatchNormAct2d whose training statistics are those of the whole
    process group (torch's SyncBatchNorm on GPUs, fastresnet's on CPUs). Same arguments as
    BatchNormAct2d, plus nn.SyncBatchNorm's process_group."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 act: Activation = "relu", relu: Optional[bool] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype)
        self.apply_relu = _relu_from_act(act if relu is None else bool(relu))

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """nn.SyncBatchNorm.convert_sync_batchnorm for models that hold BatchNormAct2d: those become
        SyncBatchNormAct2d (keeping their act), other BatchNorms nn.SyncBatchNorm; the tensors are shared."""
        if type(module) is BatchNormAct2d:
            sync = cls.from_batchnorm(module, act="relu" if module.apply_relu else None)
            sync.process_group = process_group
            return sync
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
            return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
        for name, child in list(module.named_children()):
            converted = cls.convert_sync_batchnorm(child, process_group)
            if converted is not child:
                setattr(module, name, converted)
        return module


# ---------------------------------------------------------------------------
# SyncBatchNorm across CPU processes (gloo), which torch's SyncBatchNorm does not run
# ---------------------------------------------------------------------------


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


def sync_batch_norm_act(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        weight: Optional[Tensor], bias: Optional[Tensor], momentum: float, eps: float, group,
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
    update_running_stats(running_mean, running_var, mean.float(), (var * counts / (counts - 1)).float(), momentum)
    scale = torch.rsqrt(var + eps).float()
    scale = scale * weight if weight is not None else scale
    shift = bias if bias is not None else torch.zeros_like(scale)
    return affine_act_reference(x, scale, shift, residual, relu, center=mean.float())
