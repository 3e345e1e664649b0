"""BatchNormAct2d: nn.BatchNorm2d with the residual add and ReLU fused in.

A subclass with exactly nn.BatchNorm2d's parameters and buffers (weight, bias,
running_mean, running_var, num_batches_tracked), so state_dicts load both
ways, and exactly its semantics (momentum including None, the cumulative
average; track_running_stats=False; eval mode; the error for one value per
channel in training). forward(x, residual=None) returns
act(batch_norm(x) + residual) in one pass over memory (two in training: the
statistics, then the normalisation) through fastresnet.ops.batch_norm_act.
"""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from fastresnet.ops.bn_act import batch_norm_act

Activation = Union[str, bool, None]


def _relu_from_act(act: Activation) -> bool:
    """True for ReLU: "relu" or True; False for none: None, "none", "identity" or False."""
    if isinstance(act, bool):
        return act
    if act is None or (isinstance(act, str) and act.lower() in ("none", "identity")):
        return False
    if isinstance(act, str) and act.lower() == "relu":
        return True
    raise ValueError(f"act must be 'relu', None/'identity' or a bool, got {act!r}")


class BatchNormAct2d(nn.BatchNorm2d):
    """act(BatchNorm2d(x) + residual), act in {ReLU, identity}.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype:
            as nn.BatchNorm2d.
        act: "relu" (default) or True for ReLU; None, "identity" or False for none.
        relu: the same as a bool; when given it overrides act.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        act: Activation = "relu",
        relu: Optional[bool] = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.apply_relu = _relu_from_act(act if relu is None else bool(relu))

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, *, act: Activation = "relu") -> "BatchNormAct2d":
        """A BatchNormAct2d that shares bn's parameter and buffer tensors (not copies)."""
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"expected an nn.BatchNorm2d, got {type(bn).__name__}")
        fused = cls(
            bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta", act=act
        )
        for name, param in bn.named_parameters(recurse=False):
            setattr(fused, name, param)
        for name, buffer in bn.named_buffers(recurse=False):
            setattr(fused, name, buffer)
        return fused.train(bn.training)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        # What follows mirrors nn.BatchNorm2d.forward line for line, so the
        # running statistics evolve exactly as PyTorch's do.
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        # Batch statistics in training, and in eval when there are no running ones.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # Running statistics are updated only in training with track_running_stats.
        use_running = not self.training or self.track_running_stats
        return batch_norm_act(
            input,
            self.weight,
            self.bias,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            bn_training,
            exponential_average_factor,
            self.eps,
            residual,
            self.apply_relu,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={'relu' if self.apply_relu else None}"


def is_plain_batchnorm(module: nn.Module) -> bool:
    """True for exactly an nn.BatchNorm2d or a BatchNormAct2d: a subclass with
    its own forward (SyncBatchNorm, a frozen BN) must not be replaced."""
    return type(module) in (nn.BatchNorm2d, BatchNormAct2d)
