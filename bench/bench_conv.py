"""Every conv of ResNet-50 with its BN/ReLU/residual epilogue: fused Triton vs cuDNN.

One group per conv shape (batch 256, 224x224 input, bf16, channels_last on a
GPU; batch 2 at 64x64, channels / 8, fp32, through the interpreter on the CPU).
Providers:

  cudnn_bn_act   F.conv2d, then eager inference F.batch_norm, (+ add), ReLU:
                 what torchvision runs in eval mode (the baseline);
  cudnn_conv     F.conv2d alone: the floor for any cuDNN-based path;
  triton         the fused implicit-GEMM kernel alone (kernels/conv.py), with
                 its default tile;
  triton_gemm    with FASTRESNET_EXPERIMENTAL=1, 1x1 stride-1 convs only
                 (skipped elsewhere, and before sm_90): the experimental shelf's
                 persistent TMA GEMM with the fused epilogue
                 (kernels/experimental/conv_gemm.py) with its shape class's first
                 tile (on the CPU: the interpreter's tile);
  fastresnet     conv_bn_act as the library runs it: the tuned choice among
                 cuDNN's fused conv, cuDNN + the epilogue kernel, the Triton
                 kernel with its default tile and, with FASTRESNET_EXPERIMENTAL=1,
                 every other tile of the shape class ("triton:<tile>"), for 1x1
                 stride-1 convs every tile of the TMA GEMM ("triton_gemm:<tile>",
                 sm_90+, fp16/bf16) and, without a residual, the cuBLASLt GEMM.

extra_info carries the conv's FLOPs (2 * M * N * K), so the report gives
TFLOP/s and the fraction of the measured bf16 matrix rate; the fastresnet row
also carries the dispatch decision for its shape ("dispatch": the choice, the
time of every candidate in ms, measured or from the disk cache), which
bench/report.py prints as a table of its own.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import harness
from fastresnet.ops import tuning
from fastresnet.ops.conv_bn_act import CONV_BN_ACT, conv_bn_act, problem
from fastresnet.reference import conv_bn_act_reference
from fastresnet.testing import assert_close

PROVIDERS = ["cudnn_bn_act", "cudnn_conv", "triton", "triton_gemm", "fastresnet"]


def resnet50_convs(image_size: int, width_divisor: int = 1) -> list[dict]:
    """The distinct convs of a torchvision ResNet-50 (v1.5: stride on the 3x3) and their epilogues.

    `width_divisor` thins every layer (the CPU run goes through Triton's interpreter).
    """
    stem = 64 // width_divisor
    convs = [dict(name="stem7x7", cin=3, cout=stem, k=7, stride=2, size=image_size, res=False, relu=True)]
    size, cin = image_size // 4, stem
    for stage, (width, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
        width //= width_divisor
        out = width * 4
        convs += [
            dict(name=f"l{stage}.0.conv1", cin=cin, cout=width, k=1, stride=1, size=size, res=False, relu=True),
            dict(name=f"l{stage}.0.conv2", cin=width, cout=width, k=3, stride=stride, size=size, res=False, relu=True),
            dict(name=f"l{stage}.0.downsample", cin=cin, cout=out, k=1, stride=stride, size=size, res=False, relu=False),
        ]
        size //= stride
        convs += [
            dict(name=f"l{stage}.conv3", cin=width, cout=out, k=1, stride=1, size=size, res=True, relu=True),
            dict(name=f"l{stage}.conv1", cin=out, cout=width, k=1, stride=1, size=size, res=False, relu=True),
        ]
        if stride != 1:
            convs.append(dict(name=f"l{stage}.conv2", cin=width, cout=width, k=3, stride=1, size=size, res=False, relu=True))
        cin = out
    return convs


CONVS = resnet50_convs(harness.sizes().image_size, width_divisor=1 if harness.device().type == "cuda" else 8)


def _dtype(dev) -> torch.dtype:
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def _problem(conv: dict, dev):
    batch, dtype = harness.sizes().batch, _dtype(dev)
    cl = torch.channels_last
    x = torch.randn(batch, conv["cin"], conv["size"], conv["size"], device=dev, dtype=dtype).contiguous(memory_format=cl)
    weight = torch.randn(conv["cout"], conv["cin"], conv["k"], conv["k"], device=dev) / (conv["cin"] * conv["k"] ** 2) ** 0.5
    bn = dict(
        running_mean=torch.randn(conv["cout"], device=dev) * 0.1,
        running_var=torch.rand(conv["cout"], device=dev) + 0.5,
        weight=torch.rand(conv["cout"], device=dev) + 0.5,
        bias=torch.randn(conv["cout"], device=dev) * 0.1,
    )
    scale = bn["weight"] * torch.rsqrt(bn["running_var"] + 1e-5)
    shift = bn["bias"] - bn["running_mean"] * scale
    conv_args = dict(weight=weight.to(dtype).contiguous(memory_format=cl), scale=scale, shift=shift,
                     stride=(conv["stride"],) * 2, padding=(conv["k"] // 2,) * 2)
    out_size = conv["size"] // conv["stride"]
    res = None
    if conv["res"]:
        res = torch.randn(batch, conv["cout"], out_size, out_size, device=dev, dtype=dtype).contiguous(memory_format=cl)
    return x, conv_args, bn, res


def _gemm_applies(x, c, res) -> bool:
    if not tuning.settings().experimental:
        return False
    from fastresnet.experimental.conv_bn_act import _gemm_applies as applies

    return applies(x, c["weight"], res, c["stride"], c["padding"], (1, 1), 1)


def _provider_fn(provider, x, c: dict, bn, res, relu):
    def cudnn_conv():
        return F.conv2d(x, c["weight"], None, c["stride"], c["padding"])

    def cudnn_bn_act():
        y = F.batch_norm(cudnn_conv(), bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], False, 0.0, 1e-5)
        if res is not None:
            y = y + res
        return torch.relu_(y) if relu else y

    body_args = (x, c["weight"], c["scale"], c["shift"], res, list(c["stride"]), list(c["padding"]), [1, 1], 1, relu)

    def triton():
        return torch.ops.fastresnet.conv_bn_act(*body_args, "triton")

    def triton_gemm():
        from fastresnet.experimental.conv_bn_act import _triton_gemm, implementation, triton_gemm_names

        if x.is_cuda:
            return implementation(triton_gemm_names(x, c["weight"], res, c["stride"], c["padding"], (1, 1), 1)[0])(
                *body_args)
        return _triton_gemm(None, *body_args)

    def fastresnet():
        return conv_bn_act(x, c["weight"], None, c["stride"], c["padding"], scale=c["scale"], shift=c["shift"],
                           residual=res, relu=relu)

    providers = dict(cudnn_conv=cudnn_conv, cudnn_bn_act=cudnn_bn_act, triton=triton, triton_gemm=triton_gemm,
                     fastresnet=fastresnet)
    return providers[provider]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("conv", CONVS, ids=[c["name"] for c in CONVS])
def test_conv_bn_act(benchmark, conv, provider):
    dev = harness.device()
    x, c, bn, res = _problem(conv, dev)
    if provider == "triton_gemm" and not _gemm_applies(x, c, res):
        pytest.skip("triton_gemm: FASTRESNET_EXPERIMENTAL=1, 1x1 stride-1 convs, C and Cout multiples of 16, "
                    "fp16/bf16 on sm_90+")
    fn = _provider_fn(provider, x, c, bn, res, conv["relu"])
    with torch.inference_mode():
        if provider != "cudnn_conv":  # correctness first, on these inputs
            expected = conv_bn_act_reference(x.float(), c["weight"].float(), c["scale"], c["shift"], c["stride"],
                                             c["padding"], None if res is None else res.float(), conv["relu"])
            tol = (5e-2, 5e-2) if dev.type == "cuda" else (1e-3, 1e-3)
            assert_close(fn().float(), expected, atol=tol[0], rtol=tol[1], name=f"{conv['name']} {provider}")
        out_size = conv["size"] // conv["stride"]
        m = x.shape[0] * out_size * out_size
        flops = 2 * m * conv["cout"] * conv["cin"] * conv["k"] ** 2
        harness.run(
            benchmark, fn, dev=dev, group=f"resnet50 conv {conv['name']}", provider=provider,
            baseline=provider == "cudnn_bn_act", flops=flops, dtype=str(x.dtype),
            shape=f"n{x.shape[0]} {conv['cin']}->{conv['cout']} k{conv['k']} s{conv['stride']} @{conv['size']}",
            epilogue=("+res" if conv["res"] else "") + ("+relu" if conv["relu"] else ""),
        )
        if provider == "fastresnet":
            benchmark.extra_info["dispatch"] = dispatch_decision(x, c, res, conv["relu"], dev)


def dispatch_decision(x, c: dict, res, relu: bool, dev) -> dict:
    """The tuned decision for this conv's problem: choice, each candidate's ms, and where it came from."""
    key = CONV_BN_ACT.key(problem(x, c["weight"], res, c["stride"], c["padding"], (1, 1), 1, relu))
    found = [d for d in tuning.decisions() if d["key"] == key]
    if found:
        return found[-1]
    why = "no GPU: the interpreter runs the one Triton tile" if dev.type != "cuda" else "not measured"
    return {"key": key, "choice": None, "times_ms": {}, "source": why}
