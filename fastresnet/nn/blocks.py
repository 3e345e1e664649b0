"""Fused ResNet blocks, one family for training and inference: FusedBasicBlock and FusedBottleneck.

convert(model, mode) swaps the BasicBlocks and Bottlenecks of torchvision, timm and fastresnet models
for these, in place. A fused block takes over the original block's children under their names (conv1,
bn1, ..., downsample), so the state_dict is the original's, and owns the forward; `mode` says what it
fuses:

  mode         training                                   eval (no gradient wanted)
  "inference"  the original block's computation            every conv + BN (+ residual) (+ ReLU) one
                                                           conv_bn_act op: 3 passes for a bottleneck, not 11
  "train"      the fastest path for the shape (below)      as "inference"
  "bn_act"     cuDNN's convs, each BN (+ add) + ReLU one    the same
               batch_norm_act pass ("cudnn_bnact")

The training paths of mode "train", timed per shape (op "fused_block" of fastresnet.ops.tuning: the
forward and backward of each, once per GPU, cached on disk; "eager" always competes, so a block is
never slower than the one it replaced):
  "triton"       every conv a conv_stats (its output's BN statistics from its epilogue, the previous
                 BN + ReLU applied as it loads its input), then bn_act_stats(+ shortcut): no normalised
                 activation is ever stored; the backward recomputes it (fastresnet.ops.conv_stats).
  "mixed"        the same, with cuDNN running the KxK convs (the normalised input written transiently).
  "cudnn_graph"  cuDNN's own fusion of the same (fastresnet.ops.cudnn_graph; needs nvidia-cudnn-frontend).
  "cudnn_bnact"  cuDNN's convs, each BN (+ add) + ReLU one fused pass.
  "eager"        exactly the original block's forward.
The first three compute BatchNorm statistics themselves, so they need plain nn.BatchNorm2d layers in
training; any other norm (a SyncBatchNorm reducing across processes, a FrozenBatchNorm2d, one that
torch.nn.SyncBatchNorm.convert_sync_batchnorm swapped in after conversion) leaves "cudnn_bnact" and
"eager", which apply each norm through fastresnet.nn.batchnorm.bn_act. The same goes for eval: a norm
that cannot be folded runs unfolded, and so does an eval call that may want gradients (grad mode on, and
an input or a parameter that requires grad): the folded ops have no backward.

Under torch.compile nothing is timed: a block uses the choice an earlier eager call made for that
input (tune_dispatch makes them), else the fixed rule ("eager").
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastresnet import backend
from fastresnet.nn.batchnorm import batch_norm, bn_act, momentum_factor
from fastresnet.nn.recognise import foldable_reason
from fastresnet.ops import cudnn_graph, tuning
from fastresnet.ops.bn_act import bn_act_stats, update_running_stats
from fastresnet.ops.conv_bn_act import compute_dtype, conv_bn_act_modules
from fastresnet.ops.conv_stats import conv_stats

TUNED = tuning.Tuned("fused_block")
MODES = ("train", "inference", "bn_act")
PATHS = ("triton", "mixed", "cudnn_graph", "cudnn_bnact", "eager")
CONV_STATS_PATHS = ("triton", "mixed", "cudnn_graph")  # the paths that compute BatchNorm statistics themselves
FIXED_PATH = "eager"
_MODE_PATH = {"inference": "eager", "bn_act": "cudnn_bnact"}  # the modes that choose nothing in training


def _statistics_norm(bn: nn.Module) -> bool:
    """A norm whose batch statistics the conv_stats paths may compute: a plain nn.BatchNorm2d in training."""
    return type(bn) is nn.BatchNorm2d and bn.training


def _conv_supported(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.bias is None and conv.padding_mode == "zeros"
            and tuple(conv.dilation) == (1, 1) and not isinstance(conv.padding, str))


class _FusedBlock(nn.Module):
    """What FusedBasicBlock and FusedBottleneck share: (conv{i}, bn{i}) stages, a shortcut, the paths."""

    num_convs: int = 0

    def __init__(self, block: nn.Module, mode: str = "train"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"fused block mode={mode!r}: expected one of {MODES}")
        for i in range(1, self.num_convs + 1):
            self.add_module(f"conv{i}", getattr(block, f"conv{i}"))
            self.add_module(f"bn{i}", getattr(block, f"bn{i}"))
        self.downsample = getattr(block, "downsample", None)
        self.residual = bool(getattr(block, "residual", True))
        self.mode = mode
        self.replaced_class = f"{type(block).__module__}.{type(block).__qualname__}"
        self.train(block.training)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, replaces={self.replaced_class}, residual={self.residual}"

    def _pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(getattr(self, f"conv{i}"), getattr(self, f"bn{i}")) for i in range(1, self.num_convs + 1)]

    def _projection(self):
        """(parameter-free modules to run first, conv, bn) when downsample is such a Sequential, else None
        (option A and other parameter-free shortcuts run as a module)."""
        ds = self.downsample
        if not isinstance(ds, nn.Sequential) or len(ds) < 2:
            return None
        *prefix, conv, bn = list(ds)
        if type(conv) is not nn.Conv2d or not hasattr(bn, "running_mean"):
            return None
        if any(any(True for _ in m.parameters()) or any(True for _ in m.buffers()) for m in prefix):
            return None
        return prefix, conv, bn

    # -- forward -------------------------------------------------------------

    def forward(self, x: Tensor, path: Optional[str] = None) -> Tensor:
        """The block's output. `path` runs one training path by name (benchmarks and tests) instead of
        the mode's choice. The loops over the convs sit here, so that a kernel launch is three calls below
        the module: the op, its body, the kernels' launcher."""
        if path is None and not self.training:
            if self.mode == "bn_act" or self._wants_grad(x) or not self._foldable():
                return self._forward_unfused(x, fused_bn=self.mode == "bn_act")
            shortcut = self._folded_shortcut(x) if self.residual else None
            out = x
            for i, (conv, bn) in enumerate(self._pairs(), 1):
                out = conv_bn_act_modules(conv, bn, out, shortcut if i == self.num_convs else None)
            return out
        path = path or self._path_for(x)
        if path not in CONV_STATS_PATHS:
            if path not in PATHS:
                raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
            return self._forward_unfused(x, fused_bn=path == "cudnn_bnact")
        # Each conv emits its output's statistics, which the next applies on load; the last BN, the
        # shortcut's addition and the ReLU are one bn_act_stats.
        x = x.to(compute_dtype(x))
        shortcut = self._conv_stats_shortcut(x, path) if self.residual else None
        out, stats = x, None
        for conv, bn in self._pairs():
            out, *batch = _stats_conv(path, conv)(out, conv.weight.to(x.dtype), conv.stride, conv.padding, bn.eps,
                                                  stats)
            stats = _batch_statistics(bn, *batch, x)
        return bn_act_stats(out, *stats, residual=shortcut, relu=True)

    def run_path(self, path: str, x: Tensor) -> Tensor:
        """The training forward through one named path."""
        return _FusedBlock.forward(self, x, path)

    def _wants_grad(self, x: Tensor) -> bool:
        """Whether autograd may want gradients of this call (the folded ops have no backward)."""
        return torch.is_grad_enabled() and (x.requires_grad or any(
            conv.weight.requires_grad or (bn.weight is not None and bn.weight.requires_grad)
            for conv, bn in self._pairs()))

    def _foldable(self) -> bool:
        norms = [bn for _, bn in self._pairs()]
        projection = self._projection() if self.residual else None
        return all(foldable_reason(bn) is None for bn in norms + ([projection[2]] if projection else []))

    def _folded_shortcut(self, x: Tensor) -> Tensor:
        projection = self._projection()
        if projection is None:
            return x if self.downsample is None else self.downsample(x)
        prefix, conv, bn = projection
        for module in prefix:  # e.g. timm's avg_down AvgPool2d
            x = module(x)
        return conv_bn_act_modules(conv, bn, x, relu=False)

    def _forward_unfused(self, x: Tensor, fused_bn: bool) -> Tensor:
        """The original composition, each BN (+ add) + ReLU fused into one pass when fused_bn. A projection
        shortcut's BN is applied here too rather than by its Sequential, so that any norm is honoured
        (fastresnet.nn.batchnorm.batch_norm: a SyncBatchNorm across CPU processes)."""
        shortcut = self._unfused_shortcut(x, fused_bn) if self.residual else None
        out = x
        for i, (conv, bn) in enumerate(self._pairs(), 1):
            residual = shortcut if i == self.num_convs else None
            if fused_bn:
                out = bn_act(bn, conv(out), residual)
            else:
                out = batch_norm(bn, conv(out))
                out = F.relu(out if residual is None else out + residual)
        return out

    def _unfused_shortcut(self, x: Tensor, fused_bn: bool) -> Tensor:
        projection = self._projection()
        if projection is None:
            return x if self.downsample is None else self.downsample(x)
        prefix, conv, bn = projection
        for module in prefix:
            x = module(x)
        return bn_act(bn, conv(x), relu=False) if fused_bn else batch_norm(bn, conv(x))

    def _conv_stats_shortcut(self, x: Tensor, path: str) -> Optional[Tensor]:
        projection = self._projection()
        if projection is None:
            return x if self.downsample is None else self.downsample(x).to(x.dtype)
        prefix, conv, bn = projection
        for module in prefix:
            x = module(x)
        y, *batch = _stats_conv(path, conv)(x, conv.weight.to(x.dtype), conv.stride, conv.padding, bn.eps, None)
        return bn_act_stats(y, *_batch_statistics(bn, *batch, x), relu=False)

    # -- choosing the training path ------------------------------------------------------

    def _path_for(self, x: Tensor) -> str:
        if self.mode in _MODE_PATH:
            return _MODE_PATH[self.mode]
        signature = self._signature(x)
        if torch.compiler.is_compiling():  # no timing while tracing: an eager call's choice, else the rule
            return TUNED.known(signature) or FIXED_PATH
        chosen = TUNED.memo.get(signature)
        if chosen is not None:
            return chosen
        paths = self.candidate_paths(x)
        return TUNED.choose(
            signature, x.device, names=paths, fixed=paths[0] if not x.is_cuda else FIXED_PATH,
            key=lambda: self._problem_key(x), runs=lambda names: self._timed_steps(names, x),
            outputs=lambda result: result,
        )

    def candidate_paths(self, x: Tensor) -> list[str]:
        """The paths that can run this block's training forward on x (eager always can). On the CPU the
        first is what runs: the Triton path under the interpreter (tests), else eager."""
        if not backend.use_triton(x):
            return ["eager"]
        paths = ["triton"] if self._triton_supported(x) else []
        if x.is_cuda:
            if paths:  # "mixed" of a block without 1x1 convs: all cuDNN, still nothing normalised saved
                paths.append("mixed")
                if self._cudnn_graph_offered(x):
                    paths.append("cudnn_graph")
            paths.append("cudnn_bnact")
        return paths + ["eager"]

    def _statistics_pairs(self):
        pairs = self._pairs()
        projection = self._projection() if self.residual else None
        return pairs + ([projection[1:]] if projection is not None else [])

    def _triton_supported(self, x: Tensor) -> bool:
        # The kernels index in int32; a bottleneck's widest activation is at most 4x its input.
        return x.dtype.is_floating_point and 4 * x.numel() < 2**31 and all(
            _conv_supported(conv) and _statistics_norm(bn) for conv, bn in self._statistics_pairs())

    def _cudnn_graph_offered(self, x: Tensor) -> bool:
        """The package imports, the device is CUDA, and the input is NHWC (the layout cuDNN's fused engines
        take). Whether cuDNN has an engine for each conv is learnt on its first call
        (fastresnet.ops.cudnn_graph.report()); where it has none, that conv runs unfused."""
        return cudnn_graph.unavailable_reason(x.device) is None and x.is_contiguous(memory_format=torch.channels_last)

    def _signature(self, x: Tensor) -> tuple:
        layout = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        norms = tuple((type(bn), bn.training) for _, bn in self._statistics_pairs())
        geometry = tuple((c.weight.shape, c.stride, c.padding) for c, _ in self._statistics_pairs())
        return (type(self), self.residual, geometry, norms, x.shape, x.dtype, compute_dtype(x), layout,
                x.device.type)

    def _problem_key(self, x: Tensor) -> str:
        convs = ",".join(f"{c.out_channels}x{c.in_channels}k{c.kernel_size[0]}s{c.stride[0]}"
                         for c, _ in self._statistics_pairs())
        layout = "cl" if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else "any"
        return (f"fused_block:{type(self).__name__}:res{int(self.residual)}:{convs}:x{'x'.join(map(str, x.shape))}"
                f":{str(x.dtype).removeprefix('torch.')}:{str(compute_dtype(x)).removeprefix('torch.')}:{layout}")

    def _timed_steps(self, names, x: Tensor) -> dict:
        """One forward + backward per path, returning the output and the gradients (what a new path is
        checked on), never accumulating into .grad; the buffers are put back after each step (timing
        steps must not count as training steps)."""
        saved = [b.detach().clone() for b in self.buffers()]

        def step(path):
            try:
                with torch.enable_grad():
                    x_ = x.detach().requires_grad_(x.requires_grad)
                    out = self.run_path(path, x_)
                    inputs = [p for p in self.parameters() if p.requires_grad] + ([x_] if x_.requires_grad else [])
                    if not inputs:  # a frozen block in training mode has no backward to time
                        return (out,)
                    return (out, *torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True))
            finally:
                with torch.no_grad():
                    for buffer, value in zip(self.buffers(), saved):
                        buffer.copy_(value)

        return {path: (lambda p=path: step(p)) for path in names}


def _stats_conv(path: str, conv: nn.Conv2d):
    """The op that runs `conv` on a statistics path: f(x, weight, stride, padding, eps, norm_input) ->
    (y, mean, invstd, unbiased var)."""
    if path == "cudnn_graph":
        return cudnn_graph.conv_stats_graph
    return functools.partial(conv_stats, use_cudnn=path == "mixed" and tuple(conv.kernel_size) != (1, 1))


def _batch_statistics(bn: nn.BatchNorm2d, mean: Tensor, invstd: Tensor, var_unbiased: Tensor, like: Tensor):
    """(mean, invstd, gamma, beta) of bn for the next op, bn's running statistics updated from the batch."""
    factor = momentum_factor(bn)
    if bn.track_running_stats and bn.running_mean is not None:
        update_running_stats((bn.running_mean, bn.running_var), mean, var_unbiased, factor)
    gamma = bn.weight if bn.weight is not None else like.new_ones(bn.num_features, dtype=torch.float32)
    beta = bn.bias if bn.bias is not None else like.new_zeros(bn.num_features, dtype=torch.float32)
    return mean, invstd, gamma, beta


class FusedBasicBlock(_FusedBlock):
    """BasicBlock: relu(bn1(conv1 x)) -> relu(bn2(conv2 .) + shortcut(x)).

    Triton path: conv_stats(x, w1), conv_stats(y1, w2, bn1 + ReLU on load), bn_act_stats(y2, + shortcut).
    """

    expansion = 1
    num_convs = 2


class FusedBottleneck(_FusedBlock):
    """Bottleneck (1x1, 3x3, 1x1; the stride wherever the original put it).

    Triton path: three conv_stats (bn1 and bn2 + ReLU applied on load), bn_act_stats(y3, + shortcut).
    """

    expansion = 4
    num_convs = 3


def chosen_paths() -> list[str]:
    """The training paths the fused blocks of this process have chosen (for logs and reports)."""
    return sorted(set(TUNED.memo.values()))


def tune_dispatch(model: nn.Module, *example_inputs: Tensor) -> list[dict]:
    """Make every choice a training step of `model` on these inputs makes, by one eager training step,
    before torch.compile or CUDA-graph capture (which cannot time). Parameters, gradients and buffers
    are left as they were. Returns fastresnet.ops.tuning.decisions()."""
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
    return tuning.decisions()
