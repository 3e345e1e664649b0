"""torch.compile of converted models: one graph, no breaks, the fused op held as a custom op on the kernel path.

On the CPU the kernel path is Triton's interpreter (conftest sets
TRITON_INTERPRET=1): tiny shapes; FASTRESNET_FORCE_REFERENCE=1 gives the
traced reference path.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import Bottleneck, conv1x1

import fastresnet
from fastresnet.ops import conv_compiled
from fastresnet.testing import assert_close

OP = torch.ops.fastresnet.conv_bn_act_inference.default
OP_TARGETS = (OP, torch.ops.fastresnet.conv_bn_act_inference)  # dynamo's graphs name the packet


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


def _bottleneck_net():
    """A stem conv-BN-ReLU chain and a projection Bottleneck: every kind of fused module, small."""
    stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
    block = Bottleneck(32, 16, stride=2, downsample=nn.Sequential(conv1x1(32, 64, 2), nn.BatchNorm2d(64)))
    return _randomize_bn(nn.Sequential(stem, block))


def _graphs_of(model, x):
    """Compile with fullgraph=True through a backend that keeps each captured FX graph; return (output, graphs)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        out = torch.compile(model, fullgraph=True, backend=keep)(x)
    return out, graphs


def _op_calls(graph_module) -> int:
    return sum(node.target in OP_TARGETS for node in graph_module.graph.nodes)


def test_converted_model_is_one_graph_on_the_reference_path(monkeypatch):
    monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1")
    model = _bottleneck_net()
    converted = fastresnet.convert(copy.deepcopy(model))
    x = torch.randn(1, 3, 8, 7).contiguous(memory_format=torch.channels_last)
    out, graphs = _graphs_of(converted, x)
    assert len(graphs) == 1 and _op_calls(graphs[0]) == 0  # the reference, traced like any PyTorch code
    with torch.no_grad():
        assert_close(out, model(x), atol=1e-4, rtol=1e-4, name="compiled reference path")


def test_kernel_path_is_one_graph_holding_the_custom_op():
    model = _bottleneck_net()
    converted = fastresnet.convert(copy.deepcopy(model))
    x = torch.randn(2, 3, 6, 5).contiguous(memory_format=torch.channels_last)
    out, graphs = _graphs_of(converted, x)
    assert len(graphs) == 1
    assert _op_calls(graphs[0]) == 5  # stem, conv1, conv2, conv3 (+ add + ReLU), downsample
    with torch.no_grad():
        assert_close(out, model(x), atol=1e-4, rtol=1e-4, name="compiled kernel path")
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_compiled_op_follows_changed_weights_and_reuses_its_folding(monkeypatch):
    model = _bottleneck_net()
    converted = fastresnet.convert(copy.deepcopy(model))
    built = []
    real = conv_compiled.PreparedConvBN
    monkeypatch.setattr(conv_compiled, "PreparedConvBN", lambda *a, **k: built.append(1) or real(*a, **k))
    compiled = torch.compile(converted, fullgraph=True, backend="eager")
    x = torch.randn(1, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        compiled(x)
        compiled(x)
        assert len(built) == 5  # folded once per conv, reused by the second call
        for m in (model, converted):
            m[1].bn2.running_var.mul_(3.0)
        assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4, name="after a BN statistics change")
    assert len(built) == 6  # only conv2's folding was rebuilt


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_custom_op_passes_opcheck(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 16, 5, 4).contiguous(memory_format=fmt)
    residual = torch.randn(2, 24, 3, 2).contiguous(memory_format=fmt)
    weight = torch.randn(24, 16, 3, 3) / 12
    stats = (torch.rand(24) + 0.5, torch.randn(24) * 0.1, torch.randn(24) * 0.1, torch.rand(24) + 0.5)
    args = (x, residual, weight, None, *stats, 1e-5, [2, 2], [1, 1], [1, 1], 1, True)
    torch.library.opcheck(OP, args, test_utils=("test_schema", "test_faketensor"))
    out = OP(*args)
    assert out.is_contiguous(memory_format=fmt)  # the layout the fake implementation promises


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])  # reduce-overhead: CUDA graphs capture the op
def test_gpu_compiled_converted_resnet_matches_eager(mode):
    """On the GPU the compiled converted model (inductor, bf16, channels_last) holds one custom op per conv
    and matches the eager converted model, also when CUDA graphs capture and replay it."""
    model = _randomize_bn(torchvision.models.resnet18()).cuda().to(torch.bfloat16)
    model = model.to(memory_format=torch.channels_last)
    converted = fastresnet.convert(copy.deepcopy(model))
    x = torch.randn(8, 3, 64, 64, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    _, graphs = _graphs_of(converted, x)
    assert len(graphs) == 1 and _op_calls(graphs[0]) == 20  # resnet18: the stem, 16 block convs, 3 projections
    compiled = torch.compile(converted, fullgraph=True, mode=mode)
    with torch.inference_mode():
        expected = converted(x).float()
        for call in range(3):  # CUDA graphs: warm-up, record, replay
            got = compiled(x).float()
            assert_close(got, expected, atol=5e-2, rtol=5e-2, name=f"compiled ({mode}) converted resnet18, call {call}")
