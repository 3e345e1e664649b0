"""A converted model under bf16 autocast is as close to its fp32 self as torch's own autocast is.

Every fused conv stores its output in bf16 once, rounded to nearest even like the eager ops it
replaces. A store that rounds any other way (truncation, which Triton's interpreter does unless
kernels.conv._to_stored rounds) shrinks every activation by about 2^-9 relative, and that bias
compounds with depth: a converted ResNet-20 then drifts 7x further from fp32 than eager autocast.
"""

import copy

import pytest
import torch
import torch.nn as nn

import triton
import triton.language as tl

import fastresnet
from fastresnet.kernels.conv import _to_stored
from fastresnet.models import Bottleneck, get_model
from fastresnet.ops import tuning

# A converted model may drift at most this much further from fp32 than eager autocast does.
DRIFT_RATIO = 1.5


def _bottleneck_net(width: int = 8, num_classes: int = 10) -> nn.Sequential:
    """ResNet-50's parts at a few channels: a conv-BN-ReLU stem (fused as a chain), bottlenecks with
    projection shortcuts and strides, pool and fc."""

    def projection(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    out = width * Bottleneck.expansion
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        Bottleneck(width, width, 1, projection(width, out, 1)),
        Bottleneck(out, width),
        Bottleneck(out, 2 * width, 2, projection(out, 2 * out, 2)),
        Bottleneck(2 * out, 2 * width),
        Bottleneck(2 * out, 4 * width, 2, projection(2 * out, 4 * out, 2)),
        Bottleneck(4 * out, 4 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * out, num_classes),
    )


def _with_running_statistics(model: nn.Module, shape, device="cpu") -> nn.Module:
    """Eval mode after a few train-mode forwards: BatchNorms with means and variances far from 0 and 1."""
    model.to(device).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(shape, device=device) * 2 + 0.5)
    return model.eval()


def _drifts(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(eager autocast's, the converted copy's) relative distance of the bf16 logits from fp32's."""
    converted = fastresnet.convert(copy.deepcopy(model), mode="inference").eval()
    assert len(converted.fastresnet_report.replaced) >= 6
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the truth in full fp32 on a GPU too
    try:
        with torch.no_grad():
            truth = model(x)
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                eager, fused = model(x), converted(x)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert fused.dtype == eager.dtype == torch.bfloat16
    eager_drift, fused_drift = ((y.float() - truth).norm().item() / truth.norm().item() for y in (eager, fused))
    assert 0 < eager_drift < 0.05, f"eager autocast drifts {eager_drift:.4f}: the check itself is off"
    return eager_drift, fused_drift


def _assert_no_further(eager_drift: float, fused_drift: float) -> None:
    assert fused_drift <= DRIFT_RATIO * eager_drift, (
        f"converted bf16 drifts {fused_drift:.4f} from fp32, eager autocast {eager_drift:.4f} "
        f"({fused_drift / eager_drift:.2f}x, allowed {DRIFT_RATIO}x)"
    )


@triton.jit
def _store_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(out_ptr + offs, _to_stored(tl.load(x_ptr + offs, mask=ok), out_ptr.dtype.element_ty), mask=ok)


def _edge_values() -> torch.Tensor:
    """fp32 values whose bf16 rounding is easy to get wrong: ties (to even, either way), a carry out of
    the mantissa into the exponent, overflow to inf, subnormals, signed zeros, inf and NaN."""
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80C000, 0x3F807FFF, 0x3F808001], dtype=torch.int64)
    carries = torch.tensor([0x3FFFFFFF, 0x3FFF8000, 0x407FFFFF, 0x7F7FFFFF, 0x00FFFFFF, 0x00018000], dtype=torch.int64)
    bits = torch.cat([ties, carries]).to(torch.int32).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3e-39, 3.14159, -2.71828])
    return torch.cat([bits, -bits, special, torch.randn(4000) * 10.0 ** torch.randint(-6, 6, (4000,))])


def test_kernel_store_rounds_bf16_like_torch():
    """kernels.conv's stores give torch's bf16 of each fp32 value, bit for bit (here: the interpreter)."""
    x = _edge_values()
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    _store_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    expected = x.to(torch.bfloat16)
    assert torch.isnan(out).equal(torch.isnan(expected))
    same = out.view(torch.int16) == expected.view(torch.int16)
    wrong = (~same & ~torch.isnan(expected)).nonzero().flatten()
    assert wrong.numel() == 0, f"{wrong.numel()} values rounded otherwise than torch, e.g. {x[wrong[:4]].tolist()}"


NETS = [
    pytest.param(lambda: get_model("resnet20"), (4, 3, 8, 8), id="resnet20"),
    pytest.param(_bottleneck_net, (4, 3, 8, 8), id="bottleneck_net"),
]


@pytest.mark.parametrize("build, shape", NETS)
def test_converted_bf16_drifts_no_further_than_autocast(build, shape):
    """Through the interpreted Triton kernel (or the eager reference under FASTRESNET_FORCE_REFERENCE)."""
    model = _with_running_statistics(build(), shape)
    _assert_no_further(*_drifts(model, torch.randn(shape)))


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["measure", "fixed", "triton"])
@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_converted_bf16_drifts_no_further_than_autocast_on_gpu(name, mode, tmp_path, monkeypatch):
    """cuDNN's and the kernel's real bf16 paths: the measured choices, the fixed rule, the kernel forced."""
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    shape = (8, 3, 32, 32) if name == "resnet20" else (8, 3, 224, 224)
    model = _with_running_statistics(get_model(name), shape, "cuda").to(memory_format=torch.channels_last)
    x = torch.randn(shape, device="cuda").contiguous(memory_format=torch.channels_last)
    tuning.override({"measure": None, "fixed": "fixed", "triton": "conv_bn_act=triton"}[mode])
    _assert_no_further(*_drifts(model, x))
