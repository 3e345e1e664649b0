"""Fused ResNet blocks for training: statistics in the conv epilogue, normalise-on-load in the next conv.

In training a bottleneck runs, per shape, the fastest of five paths (the
choice measured once on the GPU, forward + backward, and cached on disk by
fastresnet.ops.dispatch; the eager path is always a candidate, so a block is
never slower than the unfused one by construction):

  "triton"       conv_stats(x, w1) -> conv_stats(y1, w2, bn1 on load) -> conv_stats(y2, w3, bn2 on load)
                 -> bn_act_stats(y3, bn3, + shortcut): every conv writes its raw output and its
                 BatchNorm statistics at once; no normalised activation is ever stored, and the
                 backward recomputes it (fastresnet.ops.conv_train).
  "mixed"        the same ops, with cuDNN running the KxK convs (the normalised input written
                 transiently for it, its statistics in a separate pass) and Triton the 1x1 ones.
  "cudnn_graph"  cuDNN's own fusion of the same thing: every conv one cuDNN graph (the previous
                 BatchNorm + ReLU applied on load, sum and sum of squares of the output in its
                 epilogue; fastresnet.ops.cudnn_graph), then bn_act_stats; the backward as "triton".
                 Offered only on CUDA with the optional nvidia-cudnn-frontend package: the
                 baseline the Triton kernels must beat.
  "cudnn_bnact"  cuDNN convs, each BatchNorm (+ add) + ReLU as one fused Triton op
                 (fastresnet.ops.batch_norm_act).
  "eager"        exactly torchvision's forward.

On the CPU the eager path runs (Triton's interpreter runs the "triton" path
when TRITON_INTERPRET=1, for tests). In eval mode the block is the inference
block of fastresnet.nn.inference_blocks (BatchNorm folded into the conv).

Parameters and buffers are the original block's children under the original
names (conv1, bn1, ..., downsample), so state_dicts are unchanged; the
running statistics evolve exactly as nn.BatchNorm2d's (momentum, momentum=None,
num_batches_tracked, unbiased running_var).

Under torch.compile the path cannot be measured while tracing: a block uses
the choice made by an earlier eager call for that input (see tune_dispatch),
else the fixed rule ("eager").
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastresnet import backend
from fastresnet.nn import inference_blocks
from fastresnet.ops import cudnn_graph, dispatch
from fastresnet.ops.conv import compute_dtype
from fastresnet.ops.conv_train import bn_act_stats, conv_stats

PATHS = ("triton", "mixed", "cudnn_graph", "cudnn_bnact", "eager")
CONV_STATS_PATHS = ("triton", "mixed", "cudnn_graph")  # paths through conv_stats-like ops
FIXED_PATH = "eager"


# ---------------------------------------------------------------------------
# BatchNorm bookkeeping, exactly as nn.BatchNorm2d.forward does it
# ---------------------------------------------------------------------------


def _momentum_step(bn: nn.BatchNorm2d) -> float:
    """Count the batch (num_batches_tracked) and return the running-average factor."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    return factor


def _uses_batch_stats(bn: nn.Module) -> bool:
    return type(bn) is nn.BatchNorm2d and (bn.training or bn.running_mean is None)


def _update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var_unbiased: Tensor) -> None:
    factor = _momentum_step(bn)
    if not (bn.training and bn.track_running_stats) or bn.running_mean is None:
        return
    with torch.no_grad():
        bn.running_mean.mul_(1.0 - factor).add_(mean.detach().to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1.0 - factor).add_(var_unbiased.detach().to(bn.running_var.dtype), alpha=factor)


def _affine(bn: nn.BatchNorm2d, like: Tensor) -> tuple[Tensor, Tensor]:
    gamma = bn.weight if bn.weight is not None else like.new_ones(bn.num_features, dtype=torch.float32)
    beta = bn.bias if bn.bias is not None else like.new_zeros(bn.num_features, dtype=torch.float32)
    return gamma, beta


def _conv_supported(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d and conv.groups == 1 and conv.bias is None and conv.padding_mode == "zeros"
        and tuple(conv.dilation) == (1, 1) and not isinstance(conv.padding, str)
    )


# ---------------------------------------------------------------------------
# The blocks
# ---------------------------------------------------------------------------


class _TrainingFusedBlock(inference_blocks._FusedResNetBlock):
    """Shared machinery: the training paths, their per-shape choice, eval via the inference block."""

    def __init__(self, block: nn.Module):
        super().__init__(block)
        self._paths: dict[tuple, str] = {}  # input signature -> chosen path (plain dict: torch.compile reads it)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        return self.run_path(self._path_for(x), x)

    def run_path(self, path: str, x: Tensor) -> Tensor:
        """The training forward through one named path (benchmarks and tests call it directly)."""
        if path in CONV_STATS_PATHS:
            return self._forward_conv_stats(x, path)
        if path in ("cudnn_bnact", "eager"):
            return self._forward_unfused(x, fused_bn=path == "cudnn_bnact")
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")

    # -- the unfused paths -------------------------------------------------

    def _bn_act(self, bn, y, residual, relu: bool, fused_bn: bool) -> Tensor:
        if fused_bn and type(bn) is nn.BatchNorm2d:
            from fastresnet.ops.bn_act import batch_norm_act

            factor = _momentum_step(bn)
            use_running = not bn.training or bn.track_running_stats
            return batch_norm_act(
                y, bn.weight, bn.bias, bn.running_mean if use_running else None,
                bn.running_var if use_running else None, _uses_batch_stats(bn), factor, bn.eps, residual, relu,
            )
        out = bn(y)
        if residual is not None:
            out = out + residual
        return F.relu(out) if relu else out

    def _forward_unfused(self, x: Tensor, fused_bn: bool) -> Tensor:
        shortcut = self._shortcut(x, fused=False) if self.residual else None
        out = x
        for i in range(1, self.num_convs + 1):
            conv, bn = getattr(self, f"conv{i}"), getattr(self, f"bn{i}")
            residual = shortcut if i == self.num_convs else None
            out = self._bn_act(bn, conv(out), residual, relu=True, fused_bn=fused_bn)
        return out

    # -- the fused path ----------------------------------------------------

    def _conv_bn_stats(self, conv, bn, x, norm_input=None, path="triton"):
        """The raw conv output and its BatchNorm's (mean, invstd, gamma, beta), running stats updated."""
        weight = conv.weight.to(x.dtype)
        if path == "cudnn_graph":
            y, mean, invstd, var_unbiased = cudnn_graph.conv_stats_graph(
                x, weight, conv.stride, conv.padding, bn.eps, norm_input
            )
        else:
            use_cudnn = path == "mixed" and tuple(conv.kernel_size) != (1, 1)
            y, mean, invstd, var_unbiased = conv_stats(
                x, weight, conv.stride, conv.padding, bn.eps, norm_input, use_cudnn
            )
        _update_running_stats(bn, mean, var_unbiased)
        return y, (mean, invstd, *_affine(bn, x))

    def _fused_shortcut(self, x: Tensor, path: str) -> Optional[Tensor]:
        if not self.residual:
            return None
        if self.downsample is None:
            return x
        projection = self._projection()
        if projection is None:  # option A and other parameter-free shortcuts: run as a module
            return self.downsample(x).to(x.dtype)
        prefix, conv, bn = projection
        for module in prefix:
            x = module(x)
        y, stats = self._conv_bn_stats(conv, bn, x, path=path)
        return bn_act_stats(y, *stats, relu=False)

    def _forward_conv_stats(self, x: Tensor, path: str = "triton") -> Tensor:
        x = x.to(compute_dtype(x))
        shortcut = self._fused_shortcut(x, path)
        out, stats = x, None
        for i in range(1, self.num_convs + 1):
            conv, bn = getattr(self, f"conv{i}"), getattr(self, f"bn{i}")
            out, stats = self._conv_bn_stats(conv, bn, out, stats, path)
        return bn_act_stats(out, *stats, residual=shortcut, relu=True)

    # -- choosing the path -------------------------------------------------

    def _conv_bn_pairs(self):
        pairs = [(getattr(self, f"conv{i}"), getattr(self, f"bn{i}")) for i in range(1, self.num_convs + 1)]
        projection = self._projection() if self.residual else None
        if projection is not None:
            pairs.append(projection[1:])
        return pairs

    def _triton_supported(self, x: Tensor) -> bool:
        # The kernels index in int32; a bottleneck's widest activation is at most 4x its input.
        return x.dtype.is_floating_point and 4 * x.numel() < 2**31 and all(
            _conv_supported(conv) and _uses_batch_stats(bn) for conv, bn in self._conv_bn_pairs()
        )

    def candidate_paths(self, x: Tensor) -> list[str]:
        """The paths that can run this block's training forward on x (eager always can)."""
        if not backend.use_triton(x):
            return ["eager"]
        paths = ["triton"] if self._triton_supported(x) else []
        if x.is_cuda:
            if paths:  # "mixed" of a block without 1x1 convs: all cuDNN, still nothing normalised saved
                paths.append("mixed")
                if self._cudnn_graph_offered(x):  # its statistics and backward use the Triton kernels
                    paths.append("cudnn_graph")
            paths.append("cudnn_bnact")
        return paths + ["eager"]

    def _cudnn_graph_offered(self, x: Tensor) -> bool:
        """The package imports, the device is CUDA, and the input is NHWC (the layout cuDNN's fused
        engines take). Whether cuDNN has an engine for each conv is learnt on its first call
        (fastresnet.ops.cudnn_graph.report()); where it has none, that conv runs unfused."""
        return cudnn_graph.unavailable_reason(x.device) is None and x.is_contiguous(memory_format=torch.channels_last)

    def _signature(self, x: Tensor) -> tuple:
        layout = "cl" if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else "any"
        return (tuple(x.shape), x.dtype, compute_dtype(x), layout, x.device.type)

    def _problem_key(self, x: Tensor, paths: Optional[list[str]] = None) -> str:
        """The dispatch cache's key; it names the candidate paths, so that a path that becomes
        available later (nvidia-cudnn-frontend installed) is measured rather than shadowed by an
        older choice made without it."""
        convs = ",".join(
            f"{c.out_channels}x{c.in_channels}k{c.kernel_size[0]}s{c.stride[0]}" for c, _ in self._conv_bn_pairs()
        )
        shape, dtype, cdtype, layout, _ = self._signature(x)
        key = (f"fused_train_block:{type(self).__name__}:res{int(self.residual)}:{convs}:x{'x'.join(map(str, shape))}"
               f":{str(dtype).removeprefix('torch.')}:{str(cdtype).removeprefix('torch.')}:{layout}")
        return key if paths is None else f"{key}:{'|'.join(paths)}"

    def _path_for(self, x: Tensor) -> str:
        signature = self._signature(x)
        if torch.compiler.is_compiling():  # no timing while tracing: an eager call's choice, else the rule
            return self._paths.get(signature, FIXED_PATH)
        chosen = self._paths.get(signature)
        if chosen is None:
            chosen = self._choose(x)
            self._paths[signature] = chosen
        return chosen

    def _choose(self, x: Tensor) -> str:
        paths = self.candidate_paths(x)
        mode = dispatch.dispatch_mode()
        if mode in paths:
            return mode
        if not x.is_cuda:  # the reference on the CPU; under the interpreter (tests) the Triton path
            return paths[0]
        if len(paths) == 1 or mode != "measure":
            return FIXED_PATH
        saved = [b.detach().clone() for b in self.buffers()]
        try:
            candidates = {path: (lambda p=path: self._timed_step(p, x)) for path in paths}
            return dispatch.choose(self._problem_key(x, paths), candidates, FIXED_PATH, x.device)
        finally:  # timing steps must not count as training steps
            with torch.no_grad():
                for buffer, value in zip(self.buffers(), saved):
                    buffer.copy_(value)

    def _timed_step(self, path: str, x: Tensor) -> None:
        """One forward + backward through `path`; gradients returned, never accumulated into .grad."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(x.requires_grad)
            out = self.run_path(path, x)
            inputs = [p for p in self.parameters() if p.requires_grad] + ([x] if x.requires_grad else [])
            if inputs:  # a frozen block in training mode has no backward to time
                torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)


class FusedBasicBlock(_TrainingFusedBlock):
    """BasicBlock for training: relu(bn1(conv1 x)) -> relu(bn2(conv2 .) + shortcut(x)).

    Triton path: conv_stats(x, w1), conv_stats(y1, w2, bn1 + ReLU on load), bn_act_stats(y2, + shortcut).
    """

    expansion = 1
    num_convs = 2


class FusedBottleneck(_TrainingFusedBlock):
    """Bottleneck for training (1x1, 3x3, 1x1; the stride wherever the original put it).

    Triton path: three conv_stats (bn1 and bn2 + ReLU applied on load), bn_act_stats(y3, + shortcut).
    """

    expansion = 4
    num_convs = 3


def tune_dispatch(model: nn.Module, *example_inputs: Tensor) -> list[dict]:
    """Choose every fused block's path for these inputs by one eager training step, before
    torch.compile or CUDA-graph capture (which cannot measure). Parameters, gradients and
    buffers are left as they were. Returns fastresnet.ops.dispatch.decisions()."""
    was_training = model.training
    saved = [b.detach().clone() for b in model.buffers()]
    model.train()
    try:
        out = model(*example_inputs)
        params = [p for p in model.parameters() if p.requires_grad]
        loss = out.float().sum() if isinstance(out, Tensor) else sum(o.float().sum() for o in out)
        torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved):
                buffer.copy_(value)
    return dispatch.decisions()
