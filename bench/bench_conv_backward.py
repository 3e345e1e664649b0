"""The backward of one training conv (conv_stats): cuDNN vs the Triton wgrad/dgrad paths, per shape.

Answers the question "does a Triton wgrad/dgrad with fused BatchNorm backward win on any
shape?". One group per ResNet-50 conv (batch 256, 224x224, bf16, channels_last on a GPU;
batch 2 at 64x64, channels / 8, fp32, through the interpreter on the CPU). Each provider computes
the same gradients (x through its BatchNorm + ReLU with batch statistics, weight, the norm's weight and bias)
for conv(relu(bn(x))) (conv2, conv3 of a bottleneck) or conv(x) (conv1, the downsample):

  cudnn         conv_stats' backward by its default: recompute relu(bn(x)) into memory, cuDNN's
                dgrad + wgrad, the BatchNorm backward's reduction and elementwise passes
                (the baseline);
  triton_wgrad  (the experimental shelf's, FASTRESNET_EXPERIMENTAL=1) Triton wgrad normalising on
                load (nothing written), cuDNN dgrad, both passes;
  triton_dgrad  (the shelf's) cuDNN wgrad on the recomputed input, Triton stride-1 dgrad with the
                ReLU mask and the BatchNorm sums in its epilogue (only the elementwise pass left);
  triton_bwd    (the shelf's) both Triton kernels;
  fastresnet    what conv_stats runs by default: the tuned choice (extra_info `path`; the
                Triton paths compete with FASTRESNET_EXPERIMENTAL=1);
  eager         autograd through F.conv2d(relu(F.batch_norm(x))) with the normalised input
                saved: plain PyTorch's backward for the same conv.

At stride 2 the dgrad is cuDNN's in every path, so triton_dgrad / triton_bwd are skipped there
(the tuner times them there too: each equals the path without the Triton dgrad).
extra_info `flops`: dgrad + wgrad, 2 x 2 * M * Cout * K, for TFLOP/s against the matmul ceiling.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import harness
from fastresnet.ops import tuning
from fastresnet.ops.conv_stats import CONV_STATS_BACKWARD, choose_backward
from fastresnet.testing import assert_close

EPS = 1e-5
PROVIDERS = ["cudnn", "triton_wgrad", "triton_dgrad", "triton_bwd", "fastresnet", "eager"]
SHORT = ("l1.0.conv2", "l1.conv3", "l2.0.conv2", "l3.conv1", "l3.conv2", "l4.conv3")


def resnet50_training_convs(image_size: int, width_divisor: int = 1) -> list[dict]:
    """The distinct convs of ResNet-50's bottlenecks (v1.5: stride on the 3x3) as a training block
    runs them: `norm` when the conv's input is a raw conv output normalised on load (conv2, conv3)."""
    convs = []
    size, cin = image_size // 4, 64 // width_divisor
    for stage, (width, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
        width //= width_divisor
        out = width * 4
        convs += [
            dict(name=f"l{stage}.0.conv2", cin=width, cout=width, k=3, stride=stride, size=size, norm=True),
            dict(name=f"l{stage}.0.downsample", cin=cin, cout=out, k=1, stride=stride, size=size, norm=False),
        ]
        size //= stride
        convs += [
            dict(name=f"l{stage}.conv1", cin=out, cout=width, k=1, stride=1, size=size, norm=False),
            dict(name=f"l{stage}.conv2", cin=width, cout=width, k=3, stride=1, size=size, norm=True),
            dict(name=f"l{stage}.conv3", cin=width, cout=out, k=1, stride=1, size=size, norm=True),
        ]
        if stage == 1:  # layer1.0's conv2 has stride 1: the same shape as layer1's other conv2
            convs = [c for c in convs if c["name"] != "l1.conv2"]
        cin = out
    return convs


def _convs() -> list[dict]:
    on_gpu = harness.device().type == "cuda"
    convs = resnet50_training_convs(harness.sizes().image_size, width_divisor=1 if on_gpu else 8)
    if os.environ.get("FASTRESNET_BENCH_SHORT", "0") == "1" or not on_gpu:
        convs = [c for c in convs if c["name"] in SHORT]
    return convs


def _problem(conv: dict, dev: torch.device):
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    batch = harness.sizes().batch
    cl = torch.channels_last
    x = (torch.randn(batch, conv["cin"], conv["size"], conv["size"], device=dev) * 2 + 1).to(dtype, memory_format=cl)
    weight = (torch.randn(conv["cout"], conv["cin"], conv["k"], conv["k"], device=dev)
              / (conv["cin"] * conv["k"] ** 2) ** 0.5).to(dtype, memory_format=cl)
    out_size = (conv["size"] + 2 * (conv["k"] // 2) - conv["k"]) // conv["stride"] + 1
    grad_y = torch.randn(batch, conv["cout"], out_size, out_size, device=dev).to(dtype, memory_format=cl)
    norm = None
    if conv["norm"]:
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
        norm = (mean, torch.rsqrt(var + EPS), torch.rand(conv["cin"], device=dev) + 0.5,
                torch.randn(conv["cin"], device=dev))
    return x, weight, norm, grad_y


def _fused_backward(conv, x, weight, norm, grad_y, path):
    """The backward op through `path`; "auto": the tuned choice, made at the first call."""
    norm = norm if norm is not None else (None,) * 4
    stride, padding = [conv["stride"]] * 2, [conv["k"] // 2] * 2

    def step():
        chosen = choose_backward(grad_y, x, weight, norm, stride, padding, True) if path == "auto" else path
        return torch.ops.fastresnet.conv_stats_backward(grad_y, x, weight, *norm, stride, padding, True, chosen)

    return step


def _eager_backward(conv, x, weight, norm, grad_y):
    """Autograd through the unfused chain; the graph is built once and kept (retain_graph)."""
    leaves = [x.detach().requires_grad_(), weight.detach().requires_grad_()]
    a = leaves[0]
    if norm is not None:
        leaves += [norm[2].detach().requires_grad_(), norm[3].detach().requires_grad_()]
        a = F.relu(F.batch_norm(a, None, None, leaves[2], leaves[3], True, 0.0, EPS))
    y = F.conv2d(a, leaves[1], None, conv["stride"], conv["k"] // 2)

    def grads():
        found = torch.autograd.grad(y, leaves, grad_y, retain_graph=True)
        if norm is None:
            return found[0], found[1], None, None
        return found[0], found[1], found[2], found[3]

    return grads


def _check(actual, expected, name):
    """Every gradient against the eager one, relative to its size (bf16 on a GPU)."""
    tol = 6e-2 if expected[0].is_cuda else 2e-3
    for label, a, b in zip(("x", "weight", "norm weight", "norm bias"), actual, expected):
        if b is None:
            continue
        scale = b.float().abs().max().item() + 1e-6
        assert_close(a.float() / scale, b.float() / scale, atol=tol, rtol=tol, name=f"{name} grad {label}")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("conv", _convs(), ids=lambda c: c["name"])
def test_conv_backward(benchmark, conv, provider):
    dev = harness.device()
    if provider in ("triton_dgrad", "triton_bwd") and conv["stride"] != 1:
        pytest.skip("stride-2 dgrad is cuDNN's in every path")
    if provider.startswith("triton") and provider not in CONV_STATS_BACKWARD.offered(tuning.settings().experimental):
        pytest.skip(f"{provider}: the experimental shelf's (FASTRESNET_EXPERIMENTAL=1)")
    x, weight, norm, grad_y = _problem(conv, dev)
    eager = _eager_backward(conv, x, weight, norm, grad_y)
    if provider == "eager":
        step = eager
    else:
        step = _fused_backward(conv, x, weight, norm, grad_y, "auto" if provider == "fastresnet" else provider)
        grad_x, grad_w, grad_norm_weight, grad_norm_bias = step()  # the first call measures the choice (fastresnet)
        expected = eager()
        _check((grad_x, grad_w, grad_norm_weight if norm else None, grad_norm_bias if norm else None), expected,
               f"{conv['name']} {provider}")
    m = x.shape[0] * grad_y.shape[2] * grad_y.shape[3]
    flops = 2 * 2 * m * conv["cout"] * conv["cin"] * conv["k"] ** 2
    chosen = [d["choice"] for d in _decisions_for(conv)] if provider == "fastresnet" else [provider]
    harness.run(
        benchmark, step, dev=dev, group=f"resnet50 conv backward {conv['name']}", provider=provider,
        baseline=provider == "cudnn", flops=flops, path=",".join(chosen) or "cudnn",
    )


def _decisions_for(conv: dict) -> list[dict]:
    weight = f":{conv['cout']}x{conv['cin']}x{conv['k']}x{conv['k']}:"
    return [d for d in tuning.decisions() if d["op"] == "conv_stats.backward" and weight in d["key"]]
