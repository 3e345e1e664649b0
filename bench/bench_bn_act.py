"""BatchNorm + residual add + ReLU (training mode): fastresnet vs eager vs torch.compile.

Groups are `bn_act/<mode>/<N>x<C>x<H>x<W>`, mode in forward / backward / full,
providers:
  fastresnet  BatchNormAct2d(x, residual): the Triton kernels
  eager       relu(nn.BatchNorm2d(x) + residual), cuDNN/ATen (the baseline)
  compile     torch.compile of the eager module (Inductor's fused kernels)
and one `copy` group per shape, torch's device-to-device copy, the measured
bandwidth ceiling.

GPU: ResNet-50 stage shapes at batch 256, bf16 activations, fp32 parameters,
channels_last. CPU: one tiny shape (the kernels run in Triton's interpreter;
compile is skipped: Inductor takes minutes to build these on this CPU).

`bytes` in extra_info is what the two-pass scheme must move, E elements of the
activation dtype each:
  forward   4E: read x for the statistics, read x and residual, write y
  backward  8E: read dy, x, residual to reduce; read them again, write dx, dresidual
  full     12E
so median time gives GB/s, comparable between providers and with `copy` (2E).
"""

from __future__ import annotations

import harness  # bench/harness.py: pytest puts bench/ on sys.path
import pytest
import torch
from torch import nn

from fastresnet.nn import BatchNormAct2d
from fastresnet.reference import batch_norm_act_reference
from fastresnet.testing import assert_close

DEV = harness.device()
ON_GPU = DEV.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
SHAPES = [(256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14), (256, 2048, 7, 7)] if ON_GPU else [(2, 16, 6, 6)]
PROVIDERS = ["fastresnet", "eager", "compile"]
MODES = {"forward": 4, "backward": 8, "full": 12}  # elements moved per activation element


class BnAddRelu(nn.Module):
    """The unfused sequence the fused kernel replaces."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x, residual):
        return torch.relu(self.bn(x) + residual)


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


_MODULES: dict = {}


def module_for(provider: str, channels: int) -> nn.Module:
    """One module per (provider, channels), so torch.compile compiles once per shape."""
    key = (provider, channels)
    if key not in _MODULES:
        module = BatchNormAct2d(channels) if provider == "fastresnet" else BnAddRelu(channels)
        module = module.to(DEV).train()
        _MODULES[key] = torch.compile(module, fullgraph=True) if provider == "compile" else module
    return _MODULES[key]


def activation(shape, requires_grad=False):
    x = torch.randn(shape, device=DEV).to(DTYPE).contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def check_against_reference(module: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> None:
    """Output (training mode) against fastresnet.reference on the benchmark's own inputs."""
    channels = x.shape[1]
    mean, var = torch.zeros(channels, device=DEV), torch.ones(channels, device=DEV)
    with torch.no_grad():
        expected = batch_norm_act_reference(x, None, None, mean, var, True, 0.1, 1e-5, residual, True)
        assert_close(module(x, residual), expected, name="bench output")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bn_act(benchmark, provider, mode, shape):
    if provider == "compile" and not ON_GPU:
        pytest.skip("torch.compile takes minutes to build these kernels on this CPU")
    module = module_for(provider, shape[1])
    x, residual = activation(shape, True), activation(shape, True)
    check_against_reference(module, x, residual)
    grad_y = activation(shape)
    wrt = [x, residual, *module.parameters()]

    if mode == "forward":
        def step():
            with torch.no_grad():
                return module(x, residual)
    elif mode == "backward":
        y = module(x, residual)

        def step():
            return torch.autograd.grad(y, wrt, grad_y, retain_graph=True)
    else:
        def step():
            return torch.autograd.grad(module(x, residual), wrt, grad_y)

    elements = x.numel()
    harness.run(
        benchmark, step, dev=DEV, group=f"bn_act/{mode}/{shape_id(shape)}", provider=provider,
        baseline=provider == "eager", bytes=MODES[mode] * elements * x.element_size(),
        dtype=str(DTYPE), shape=list(shape),
    )


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_copy_bandwidth(benchmark, shape):
    """The ceiling: a device-to-device copy of one activation (read E, write E)."""
    src, dst = activation(shape), activation(shape)
    harness.run(
        benchmark, lambda: dst.copy_(src), dev=DEV, group=f"copy/{shape_id(shape)}", provider="torch-copy",
        baseline=True, bytes=2 * src.numel() * src.element_size(), dtype=str(DTYPE), shape=list(shape),
    )
