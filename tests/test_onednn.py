"""fastresnet.ops.onednn: the private ATen ops it isolates are still there as it calls them, its fused
convolution computes what F.conv2d + add + ReLU compute, and the CPU's description keys the cache."""

import pytest
import torch
import torch.nn.functional as F

from fastresnet.ops import onednn
from fastresnet.testing import assert_close

# The private ATen schemas fastresnet.ops.onednn calls. A torch that changes one must fail here, by name,
# not as a wrong number or a silent fall back to the slower eager path.
SCHEMAS = {
    ("_convolution_pointwise", "default"): "mkldnn::_convolution_pointwise(Tensor X, Tensor W, Tensor? B, int[] padding, "
    "int[] stride, int[] dilation, int groups, str attr, Scalar?[] scalars, str? algorithm) -> Tensor Y",
    ("_convolution_pointwise", "binary"): "mkldnn::_convolution_pointwise.binary(Tensor X, Tensor other, Tensor W, "
    "Tensor? B, int[] padding, int[] stride, int[] dilation, int groups, str binary_attr, Scalar? alpha, "
    "str? unary_attr, Scalar?[] unary_scalars, str? unary_algorithm) -> Tensor Y",
}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch is built without oneDNN")
@pytest.mark.parametrize("op,overload", list(SCHEMAS), ids=lambda v: v)
def test_the_private_oneDNN_ops_keep_their_schemas(op, overload):
    packet = getattr(torch.ops.mkldnn, op, None)
    assert packet is not None, (f"torch {torch.__version__} has no torch.ops.mkldnn.{op}: fastresnet.ops.onednn must "
                                "move to its replacement (until then the CPU's conv_bn_act runs without 'onednn')")
    schema = str(getattr(packet, overload)._schema)
    assert schema == SCHEMAS[op, overload], (
        f"torch {torch.__version__} changed torch.ops.mkldnn.{op}.{overload}: fastresnet.ops.onednn calls it as\n"
        f"  {SCHEMAS[op, overload]}\nbut it is now\n  {schema}")
    assert onednn.available()


def test_the_private_cpu_probes_exist():
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        assert callable(getattr(torch.cpu, name, None)), (
            f"torch {torch.__version__} has no torch.cpu.{name}: fastresnet.ops.onednn.bf16_units would report no "
            "bf16 units on every CPU (and --amp auto would never time bf16)")
    assert callable(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None))


def _case(nchw: bool, groups=1, dilation=1):
    x = torch.randn(2, 8, 9, 9)
    weight = torch.randn(16, 8 // groups, 3, 3)
    if not nchw:
        x, weight = (t.contiguous(memory_format=torch.channels_last) for t in (x, weight))
    return x, weight, torch.randn(16), torch.randn(2, 16, 9, 9)


@pytest.mark.parametrize("nchw", [False, True], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "res"])
@pytest.mark.parametrize("relu", [False, True], ids=["none", "relu"])
def test_the_fused_convolution_matches_conv_add_relu(nchw, residual, relu):
    x, weight, bias, res = _case(nchw)
    res = res if residual else None
    got = onednn.conv_bias_act(x, weight, bias, (1, 1), (1, 1), (1, 1), 1, res, relu)
    expected = F.conv2d(x, weight, bias, 1, 1) + (res if residual else 0)
    assert_close(got, expected.relu() if relu else expected, atol=1e-4, rtol=1e-4)


def test_groups_dilation_and_no_bias():
    x, weight, _, res = _case(False, groups=4)
    got = onednn.conv_bias_act(x, weight, None, (1, 1), (2, 2), (2, 2), 4, res[..., :9, :9], True)
    assert_close(got, (F.conv2d(x, weight, None, 1, 2, 2, 4) + res).relu(), atol=1e-4, rtol=1e-4)


def test_what_it_supports():
    x, weight, _, res = _case(False)
    assert onednn.supports(x, weight, res)
    assert not onednn.supports(x.double(), weight.double(), None)  # oneDNN has no fp64 convolution
    assert not onednn.supports(x, weight, res.bfloat16())
    assert onednn.supports(x.bfloat16(), weight.bfloat16(), None) == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_an_isa_limit_hides_the_bf16_units(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # a CPU with AMX tiles
    assert onednn.bf16_units()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not onednn.bf16_units()
    assert "oneDNN<=AVX2" in onednn.describe_cpu()


def test_the_cpu_is_named_by_model_isa_and_threads():
    text = onednn.describe_cpu()
    assert onednn.cpu_model() in text and torch.backends.cpu.get_cpu_capability() in text
    assert f"{torch.get_num_threads()} threads" in text
