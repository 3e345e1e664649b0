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
  "cudnn_bnact"  cuDNN's convs, each BN (+ add) + ReLU one fused pass.
  "eager"        exactly the original block's forward.
The first two compute BatchNorm statistics themselves, so they need plain nn.BatchNorm2d layers in
training; any other norm (a SyncBatchNorm reducing across processes, a FrozenBatchNorm2d, one that
torch.nn.SyncBatchNorm.convert_sync_batchnorm swapped in after conversion) leaves "cudnn_bnact" and
"eager", which apply each norm as its module does (fastresnet.nn.batchnorm). The same goes for eval: a
norm that cannot be folded runs unfolded, and so does an eval call that may want gradients (grad mode on,
and an input or a parameter that requires grad): the folded ops have no backward.

Under torch.compile nothing is timed: a block uses the choice an earlier eager call made for that input
(tune_dispatch makes them), else the default ("eager").
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from fastresnet import backend
from fastresnet.nn.batchnorm import batch_norm_args, folded_affine, fusable, momentum_factor, norm_act
from fastresnet.nn.recognise import foldable_reason
from fastresnet.ops import tuning
from fastresnet.ops.bn_act import batch_norm_act, bn_act_stats, update_running_stats
from fastresnet.ops.conv_bn_act import compute_dtype, conv_bn_act
from fastresnet.ops.conv_stats import conv_stats
from fastresnet.ops.layout import fits_int32

MODES = ("train", "inference", "bn_act")
PATHS = ("triton", "mixed", "cudnn_bnact", "eager")
DEFAULT_PATH = "eager"
_MODE_PATH = {"inference": "eager", "bn_act": "cudnn_bnact"}  # the modes that choose nothing in training
# The experimental shelf's statistics paths (fastresnet.experimental.blocks fills it): name -> the op that
# runs each conv, with conv_stats' signature.
EXPERIMENTAL: dict[str, Callable] = {}


def _statistics_norm(bn: nn.Module) -> bool:
    """A norm whose batch statistics the conv_stats paths may compute: a plain nn.BatchNorm2d in training."""
    return type(bn) is nn.BatchNorm2d and bn.training


def _conv_supported(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.bias is None and conv.padding_mode == "zeros"
            and tuple(conv.dilation) == (1, 1) and not isinstance(conv.padding, str))


def statistics_applies(block: "_FusedBlock", x: Tensor) -> bool:
    """The conv_stats paths can run this block on x: the kernels run there, every conv and norm is one they
    take, and a bottleneck's widest activation (at most 4x its input) fits their 32-bit indexing."""
    return backend.use_triton(x) and x.dtype.is_floating_point and fits_int32((4 * x.numel(),)) and all(
        _conv_supported(conv) and _statistics_norm(bn) for conv, bn in block.statistics_pairs())


FUSED_BLOCK = tuning.Op("fused_block", {  # run 2
    "triton": statistics_applies,
    "mixed": lambda block, x: x.is_cuda and statistics_applies(block, x),
    "cudnn_bnact": lambda block, x: x.is_cuda and backend.use_triton(x),
    "eager": None,
})


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

    def _shortcut_input(self, x: Tensor) -> tuple[Optional[Tensor], Optional[tuple[nn.Module, nn.Module]]]:
        """(what the projection conv reads, (conv, bn)) for a conv + BN projection, after its parameter-free
        modules (timm's avg_down pool); else (the shortcut itself, None); (None, None) without one."""
        if not self.residual:
            return None, None
        projection = self._projection()
        if projection is None:
            return (x if self.downsample is None else self.downsample(x)), None
        prefix, conv, bn = projection
        for module in prefix:
            x = module(x)
        return x, (conv, bn)

    # -- forward -------------------------------------------------------------

    def forward(self, x: Tensor, path: Optional[str] = None) -> Tensor:
        """The block's output. `path` runs one training path by name (benchmarks, tests, timing) instead of
        the mode's choice. Every path is written out here, so that a kernel launch is three calls below
        the module: the op, its custom op's body, the kernels' launcher."""
        path = path or self._path_for(x)
        pairs, last = self._pairs(), self.num_convs - 1
        if path == "folded":  # eval: each conv + BN (+ residual) (+ ReLU) one op, folded at this call
            shortcut, projection = self._shortcut_input(x)
            if projection is not None:
                (conv, bn), (scale, shift) = projection, folded_affine(projection[1])
                shortcut = conv_bn_act(shortcut, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                       conv.groups, scale=scale, shift=shift, relu=False)
            out = x
            for i, (conv, bn) in enumerate(pairs):
                scale, shift = folded_affine(bn)
                out = conv_bn_act(out, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                                  scale=scale, shift=shift, residual=shortcut if i == last else None)
            return out
        if path in ("eager", "cudnn_bnact"):  # cuDNN's convs, each norm as its module computes it or fused
            fused_bn, out = path == "cudnn_bnact", x
            shortcut, projection = self._shortcut_input(x)
            if projection is not None:
                conv, bn = projection
                y = conv(shortcut)
                shortcut = (batch_norm_act(y, *batch_norm_args(bn, y), None, False) if fused_bn and fusable(bn)
                            else norm_act(bn, y, None, False))
            for i, (conv, bn) in enumerate(pairs):
                y, residual = conv(out), shortcut if i == last else None
                out = (batch_norm_act(y, *batch_norm_args(bn, y), residual, True) if fused_bn and fusable(bn)
                       else norm_act(bn, y, residual, True))
            return out
        if path not in PATHS and path not in EXPERIMENTAL:
            raise ValueError(f"unknown path {path!r}; expected one of {PATHS + tuple(EXPERIMENTAL)}")
        # Each conv emits its output's statistics, which the next applies on load; the last BN, the
        # shortcut's addition and the ReLU are one bn_act_stats.
        x = x.to(compute_dtype(x))
        stats_conv = EXPERIMENTAL.get(path, conv_stats)
        shortcut, projection = self._shortcut_input(x)
        if projection is not None:
            conv, bn = projection
            y, *batch = stats_conv(shortcut, conv.weight.to(x.dtype), None, conv.stride, conv.padding, eps=bn.eps)
            shortcut = bn_act_stats(y, *_batch_statistics(bn, *batch, x), relu=False)
        elif shortcut is not None:
            shortcut = shortcut.to(x.dtype)
        out, norm = x, None
        for conv, bn in pairs:
            out, *batch = stats_conv(out, conv.weight.to(x.dtype), None, conv.stride, conv.padding, eps=bn.eps,
                                     input_norm=norm, use_cudnn=path == "mixed" and tuple(conv.kernel_size) != (1, 1))
            norm = _batch_statistics(bn, *batch, x)
        return bn_act_stats(out, *norm, residual=shortcut, relu=True)

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

    # -- choosing the path ---------------------------------------------------------

    def _path_for(self, x: Tensor) -> str:
        if not self.training:
            if self.mode == "bn_act":
                return "cudnn_bnact"
            return "eager" if self._wants_grad(x) or not self._foldable() else "folded"
        if self.mode in _MODE_PATH:
            return _MODE_PATH[self.mode]
        return FUSED_BLOCK.choose(self._problem(x), x.device, self._default(x), args=(self, x),
                                  timed=lambda name: self._timed_step(name, x))

    def _default(self, x: Tensor) -> str:
        """Where nothing is timed: "eager", but on the CPU the kernels where they apply (Triton's
        interpreter: the tests)."""
        if x.is_cuda or torch.compiler.is_compiling() or not statistics_applies(self, x):
            return DEFAULT_PATH
        return "triton"

    def statistics_pairs(self):
        """Every (conv, norm) of the block, the projection shortcut's included."""
        projection = self._projection() if self.residual else None
        return self._pairs() + ([projection[1:]] if projection is not None else [])

    def _problem(self, x: Tensor) -> tuple:
        layout = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        pairs = self.statistics_pairs()
        norms = tuple((f"{type(bn).__module__}.{type(bn).__qualname__}", bn.training) for _, bn in pairs)
        geometry = tuple((c.weight.shape, c.stride, c.padding) for c, _ in pairs)
        return (type(self).__name__, self.residual, geometry, norms, x.shape, x.dtype, compute_dtype(x),
                "cl" if layout else "any")

    def _timed_step(self, path: str, x: Tensor) -> Callable[[], tuple]:
        """One forward + backward through `path`, returning the output and the gradients, never
        accumulating into .grad; the buffers are put back after each step (timing steps must not count as
        training steps)."""
        saved = [b.detach().clone() for b in self.buffers()]

        def step():
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

        return step


def _batch_statistics(bn: nn.BatchNorm2d, mean: Tensor, invstd: Tensor, var_unbiased: Tensor, like: Tensor):
    """(mean, invstd, weight, bias) of bn for the next op, bn's running statistics updated from the batch."""
    factor = momentum_factor(bn)
    if bn.track_running_stats and bn.running_mean is not None:
        update_running_stats(bn.running_mean, bn.running_var, mean, var_unbiased, factor)
    weight = bn.weight if bn.weight is not None else like.new_ones(bn.num_features, dtype=torch.float32)
    bias = bn.bias if bn.bias is not None else like.new_zeros(bn.num_features, dtype=torch.float32)
    return mean, invstd, weight, bias


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
    return sorted(set(FUSED_BLOCK.memo.values()))


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
