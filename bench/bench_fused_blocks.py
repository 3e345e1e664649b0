"""Training forward + backward of one ResNet block: fused (convert(mode="train")) vs torchvision.

Providers, same run, same device (GPU: batch 256, bf16 autocast, channels_last):
  torchvision   torchvision's Bottleneck / BasicBlock, eager (the baseline)
  compile       torch.compile of torchvision's block
  fused         the converted block, its path chosen per shape by measurement (never slower than eager)
  fused_triton  the converted block forced onto the Triton path (statistics in the conv epilogue,
                normalise-on-load): what the kernels alone achieve
  fused_mixed   forced onto the mixed path (Triton 1x1 convs, cuDNN 3x3 convs, the same ops)
  cudnn_graph   (the experimental shelf's, FASTRESNET_EXPERIMENTAL=1) forced onto the cudnn_graph
                path: cuDNN's own fusion of the same thing (one cuDNN graph per conv: BN + ReLU on
                load, sum / sum of squares in the epilogue), the baseline the Triton kernels must
                beat; needs nvidia-cudnn-frontend (pip install 'fastresnet[cudnn]') and a GPU, else
                skipped with the reason. extra_info
                `cudnn_graphs` says how many of the block's convs cuDNN served (the rest ran unfused).
Every stage shape of ResNet-50 (Bottleneck) and ResNet-18 (BasicBlock); with
FASTRESNET_BENCH_SHORT=1 one strided and one identity block of each kind (compile time).

extra_info: `bytes`, the activation traffic a fully fused step must move (forward: read the
block input, write and read back each raw conv output, write the output; backward: about
twice that), so GB/s compares against the copy bandwidth; `peak_memory_bytes`, the peak
allocation of one step above what was allocated before it (activations saved for backward
plus transients), `path`, what the fused block chose, and `conv_dispatch`, every per-conv
decision of the step (fastresnet.ops.tuning.decisions(): conv_stats' tile, its backward's
path and, on the shelf, the Triton wgrad/dgrad tiles, with each candidate's measured ms), and `conv_choices`,
the same in one line, so a GPU run shows which tiles won.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torchvision.models.resnet import BasicBlock, Bottleneck

import harness
from fastresnet import convert
from fastresnet.nn import blocks
from fastresnet.ops import tuning
from fastresnet.testing import assert_close

# (name, block class, inplanes, planes, stride, input side at batch 256 / 224 px)
SHAPES = [
    ("r50.layer1.0", Bottleneck, 64, 64, 1, 56),
    ("r50.layer1.1", Bottleneck, 256, 64, 1, 56),
    ("r50.layer2.0", Bottleneck, 256, 128, 2, 56),
    ("r50.layer2.1", Bottleneck, 512, 128, 1, 28),
    ("r50.layer3.0", Bottleneck, 512, 256, 2, 28),
    ("r50.layer3.1", Bottleneck, 1024, 256, 1, 14),
    ("r50.layer4.0", Bottleneck, 1024, 512, 2, 14),
    ("r50.layer4.1", Bottleneck, 2048, 512, 1, 7),
    ("r18.layer1.1", BasicBlock, 64, 64, 1, 56),
    ("r18.layer2.0", BasicBlock, 64, 128, 2, 56),
    ("r18.layer2.1", BasicBlock, 128, 128, 1, 28),
    ("r18.layer3.0", BasicBlock, 128, 256, 2, 28),
    ("r18.layer3.1", BasicBlock, 256, 256, 1, 14),
    ("r18.layer4.0", BasicBlock, 256, 512, 2, 14),
    ("r18.layer4.1", BasicBlock, 512, 512, 1, 7),
]
SHORT_SHAPES = ("r50.layer2.0", "r50.layer3.1", "r18.layer2.0", "r18.layer3.1")
PROVIDERS = ["torchvision", "compile", "fused", "fused_triton", "fused_mixed", "cudnn_graph"]


def _shapes():
    if os.environ.get("FASTRESNET_BENCH_SHORT", "0") == "1" or not torch.cuda.is_available():
        return [s for s in SHAPES if s[0] in SHORT_SHAPES]
    return SHAPES


def _make_block(cls, inplanes, planes, stride, dev):
    out = planes * cls.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = torch.nn.Sequential(
            torch.nn.Conv2d(inplanes, out, 1, stride, bias=False), torch.nn.BatchNorm2d(out)
        )
    return cls(inplanes, planes, stride, downsample).to(dev, memory_format=torch.channels_last).train()


def _input(inplanes, side, dev):
    if dev.type == "cuda":
        batch = harness.sizes().batch
    else:  # tiny on the CPU
        batch, side = 2, max(4, side // 8)
    return torch.randn(batch, inplanes, side, side, device=dev).contiguous(memory_format=torch.channels_last)


def _activation_bytes(block, x) -> int:
    """Bytes a fully fused training step must move (see the module docstring), in the compute dtype."""
    itemsize = 2 if x.is_cuda else x.element_size()
    sizes = [x.numel()]
    with torch.no_grad(), harness.autocast(x.device):
        h = x
        convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
        for conv in convs:
            h = conv(h)
            sizes.append(2 * h.numel())  # written by one conv, read back by the next op
        sizes.append(h.numel())  # the block output
        if block.downsample is not None:
            sizes.append(2 * block.downsample[0](x).numel())
    return 3 * sum(sizes) * itemsize  # forward + a backward of about twice its traffic


def _step_fn(model, x, path=None):
    grad_out = []

    def step():
        with harness.autocast(x.device):
            out = model(x) if path is None else model.run_path(path, x)
        if not grad_out:
            grad_out.append(torch.randn_like(out))
        out.backward(grad_out[0])
        return out

    return step


def _peak_memory(step, dev) -> int | None:
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    step()
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - before


CONV_DECISIONS = ("conv_stats.forward", "conv_stats.backward", "conv_wgrad.tile", "conv_dgrad.tile")


def _forget_conv_choices():
    """Clear the in-process choices (the disk cache stays, so nothing is timed twice), so that
    tuning.decisions() after the first step lists this block's conv decisions alone."""
    tuning.clear()


def _conv_decisions() -> list[dict]:
    return [d for d in tuning.decisions() if d["op"] in CONV_DECISIONS]


def _conv_choices_line(decisions: list[dict]) -> str:
    """'conv_stats.forward:256x64x56x56:...:bfloat16:64x64x3x3:1x1:1x1:1 -> triton:128x64x64w8s4; ...'"""
    return "; ".join(f"{d['key']} -> {d['choice']}" for d in decisions)


def _build(provider, reference, x):
    dev = x.device
    if provider == "torchvision":
        return reference, None
    if provider == "compile":
        if dev.type != "cuda":
            pytest.skip("torch.compile of a block's training step takes too long on this CPU")
        return torch.compile(reference), None
    fused = convert(copy.deepcopy(reference), mode="train")
    if provider == "cudnn_graph":
        if not tuning.settings().experimental:
            pytest.skip("cudnn_graph: the experimental shelf's (FASTRESNET_EXPERIMENTAL=1)")
        from fastresnet.experimental import cudnn_graph

        reason = cudnn_graph.unavailable_reason(dev)
        if reason is not None:
            pytest.skip(reason)
        if not blocks.statistics_applies(fused, x):  # its statistics and backward run the Triton kernels
            pytest.skip("the block is outside the Triton kernels' range (int32 indexing)")
        cudnn_graph.clear_cache()  # so that report() lists this block's graphs only
        return fused, "cudnn_graph"
    if provider in ("fused_triton", "fused_mixed"):
        if dev.type != "cuda" or not blocks.statistics_applies(fused, x):
            pytest.skip("the Triton path needs a GPU (the interpreter's is correct but meaningless to time)")
        return fused, provider.removeprefix("fused_")
    return fused, None


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", _shapes(), ids=lambda s: s[0])
def test_block_train_step(benchmark, shape, provider, monkeypatch):
    name, cls, inplanes, planes, stride, side = shape
    dev = harness.device()
    if dev.type == "cpu":  # what a CPU runs: the eager reference path (not the Triton interpreter)
        monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1")
    reference = _make_block(cls, inplanes, planes, stride, dev)
    x = _input(inplanes, side, dev)
    model, path = _build(provider, reference, x)
    if provider.startswith("fused") or provider == "cudnn_graph":  # correctness against torchvision's block first
        with harness.autocast(dev):
            expected = copy.deepcopy(reference)(x)
            actual = model(x) if path is None else model.run_path(path, x)
        tol = 6e-2 if dev.type == "cuda" else 1e-3
        assert_close(actual.float(), expected.float(), atol=tol, rtol=tol, name=f"{name} {provider}")
    step = _step_fn(model, x, path)
    _forget_conv_choices()
    step()  # the first call measures the fused block's paths and its convs' tiles / compiles
    conv_dispatch = _conv_decisions()
    peak = _peak_memory(step, dev)
    chosen = ",".join(blocks.chosen_paths()) if provider == "fused" else provider
    extra = {"conv_dispatch": conv_dispatch, "conv_choices": _conv_choices_line(conv_dispatch)} if conv_dispatch else {}
    if provider == "cudnn_graph":  # the graphs of this block's shapes: built or unsupported
        from fastresnet.experimental import cudnn_graph

        statuses = [r["status"] for r in cudnn_graph.report()]
        extra["cudnn_graphs"] = f"{sum(s.startswith('built') for s in statuses)} of {len(statuses)} built"
    harness.run(
        benchmark, step, dev=dev, group=f"{name} fwd+bwd", provider=provider, baseline=provider == "torchvision",
        images=x.shape[0], bytes=_activation_bytes(reference, x), peak_memory_bytes=peak, path=chosen, **extra,
    )
