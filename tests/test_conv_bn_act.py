"""The inference conv-BN-act op (fastresnet.ops.conv_bn_act): the kernel against F.conv2d, each
implementation, the op's checks, its measured choice, and the custom op torch.compile holds (the
experimental shelf's tiles and GEMMs: tests/experimental/test_shelf_conv_bn_act.py).

On the CPU the kernel runs through Triton's interpreter (conftest sets TRITON_INTERPRET=1): small
shapes, big blocks; FASTRESNET_FORCE_REFERENCE=1 gives the traced reference path.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import Bottleneck, conv1x1

import fastresnet
from fastresnet.ops import tuning
from fastresnet.ops.conv_bn_act import CONV_BN_ACT, _cpu_path, conv_bn_act
from fastresnet.reference import conv_bn_act_reference
from fastresnet.testing import assert_close, randomize_bn

# (name, in_channels, out_channels, kernel, stride, padding, dilation, height, width)
CONV_KINDS = [
    ("1x1s1", 32, 48, 1, 1, 0, 1, 5, 7),
    ("1x1s2", 24, 40, 1, 2, 0, 1, 9, 7),
    ("3x3s1", 20, 24, 3, 1, 1, 1, 7, 6),
    ("3x3s2", 32, 16, 3, 2, 1, 1, 9, 11),
    ("7x7s2_stem", 3, 16, 7, 2, 3, 1, 13, 11),
    ("3x3d2", 16, 16, 3, 1, 2, 2, 7, 7),
]
EPILOGUES = [(False, False), (False, True), (True, False), (True, True)]  # (residual, relu)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Kernel and reference accumulate in fp32; the outputs differ by the output's rounding.
KERNEL_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2e-2)}


def _problem(cin, cout, k, stride, pad, dil, h, w, dtype, batch=2, residual=False, channels_last=True):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, cin, h, w).to(dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(cout, cin, k, k) / math.sqrt(cin * k * k)).to(dtype)
    scale, shift = torch.rand(cout) + 0.5, torch.randn(cout) * 0.5
    out_h = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
    out_w = (w + 2 * pad - dil * (k - 1) - 1) // stride + 1
    res = torch.randn(batch, cout, out_h, out_w).to(dtype).contiguous(memory_format=fmt) if residual else None
    return x, weight, scale, shift, res


def _expected(x, weight, scale, shift, stride, pad, res, relu, dil):
    r = None if res is None else res.float()
    return conv_bn_act_reference(x.float(), weight.float(), scale, shift, stride, pad, r, relu, dil).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual,relu", EPILOGUES, ids=["plain", "relu", "res", "res_relu"])
@pytest.mark.parametrize("kind", CONV_KINDS, ids=[k[0] for k in CONV_KINDS])
def test_kernel_matches_conv2d(kind, residual, relu, dtype):
    _, cin, cout, k, stride, pad, dil, h, w = kind
    x, weight, scale, shift, res = _problem(cin, cout, k, stride, pad, dil, h, w, dtype, residual=residual)
    out = conv_bn_act(x, weight, None, stride, pad, dil, scale=scale, shift=shift, residual=res, relu=relu)
    atol, rtol = KERNEL_TOL[dtype]
    assert_close(out, _expected(x, weight, scale, shift, stride, pad, res, relu, dil), atol=atol, rtol=rtol)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    if relu:
        assert (out >= 0).all()


@pytest.mark.parametrize(
    "batch,cin,cout,h,w,channels_last",
    [(1, 17, 33, 5, 3, True), (3, 64, 130, 4, 5, True), (1, 16, 16, 1, 1, True), (2, 20, 24, 6, 5, False)],
    ids=["batch1_odd_channels", "cout_over_one_tile", "one_pixel", "nchw_input"],
)
def test_kernel_ragged_shapes(batch, cin, cout, h, w, channels_last):
    x, weight, scale, shift, res = _problem(
        cin, cout, 3, 1, 1, 1, h, w, torch.float16, batch=batch, residual=True, channels_last=channels_last
    )
    out = conv_bn_act(x, weight, None, 1, 1, scale=scale, shift=shift, residual=res, relu=True)
    assert_close(out, _expected(x, weight, scale, shift, 1, 1, res, True, 1), atol=4e-3, rtol=4e-3)


def test_reference_is_eager_conv_bn_relu():
    conv, bn = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    x, res = torch.randn(2, 8, 6, 6), torch.randn(2, 12, 6, 6)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    with torch.no_grad():
        expected = torch.relu(bn(conv(x)) + res)
        got = conv_bn_act_reference(x, conv.weight, scale, shift, 1, 1, res, True)
    assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_forced_reference_is_exact(monkeypatch):
    monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1")
    x, weight, scale, shift, res = _problem(8, 8, 3, 2, 1, 1, 7, 7, torch.float32, residual=True)
    got = conv_bn_act(x, weight, None, 2, 1, scale=scale, shift=shift, residual=res)
    assert torch.equal(got, conv_bn_act_reference(x, weight, scale, shift, 2, 1, res, True))


def test_grouped_conv_falls_back_to_reference():
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    weight, scale, shift = torch.randn(16, 2, 3, 3), torch.rand(16) + 0.5, torch.randn(16)
    got = conv_bn_act(x, weight, None, 1, 1, 1, 4, scale=scale, shift=shift)
    assert_close(got, conv_bn_act_reference(x, weight, scale, shift, 1, 1, None, True, 1, 4))


@pytest.mark.parametrize("name", ["triton", "cudnn_affine"])  # cudnn_fused needs cuDNN: a cuda test
def test_each_cpu_runnable_implementation_matches(name):
    x, weight, scale, shift, res = _problem(16, 24, 3, 2, 1, 1, 7, 7, torch.float16, residual=True)
    assert name in CONV_BN_ACT._applying((x, weight, res, (2, 2), (1, 1), (1, 1), 1), False)
    out = torch.ops.fastresnet.conv_bn_act(x, weight, scale, shift, res, [2, 2], [1, 1], [1, 1], 1, True, name)
    assert_close(out, _expected(x, weight, scale, shift, 2, 1, res, True, 1), atol=4e-3, rtol=4e-3)


def test_conv_bias_folds_into_the_shift():
    x, weight, scale, shift, _ = _problem(8, 12, 3, 1, 1, 1, 5, 5, torch.float32)
    bias = torch.randn(12)
    got = conv_bn_act(x, weight, bias, 1, 1, scale=scale, shift=shift)
    expected = torch.relu(torch.nn.functional.conv2d(x, weight, bias, 1, 1) * scale.view(1, -1, 1, 1)
                          + shift.view(1, -1, 1, 1))
    assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_bad_inputs_name_the_problem():
    x, weight, scale, shift, _ = _problem(8, 8, 3, 1, 1, 1, 5, 5, torch.float32)
    with pytest.raises(ValueError, match="channels"):
        conv_bn_act(x[:, :4], weight, None, 1, 1, scale=scale, shift=shift)
    with pytest.raises(ValueError, match="scale must have shape"):
        conv_bn_act(x, weight, None, 1, 1, scale=scale[:3], shift=shift)
    with pytest.raises(ValueError, match="residual has shape"):
        conv_bn_act(x, weight, None, 1, 1, scale=scale, shift=shift, residual=torch.zeros(2, 8, 4, 4))
    with pytest.raises(RuntimeError, match="inference-only"):
        conv_bn_act(x.requires_grad_(), weight, None, 1, 1, scale=scale, shift=shift)
    with pytest.raises(RuntimeError, match="inference-only"):
        conv_bn_act(x.detach(), weight.requires_grad_(), None, 1, 1, scale=scale, shift=shift)


def test_autocast_computes_in_autocast_dtype():
    x, weight, scale, shift, _ = _problem(16, 16, 1, 1, 0, 1, 4, 4, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_bn_act(x, weight, scale=scale, shift=shift)
    assert out.dtype == torch.bfloat16
    expected = _expected(x.bfloat16(), weight.bfloat16(), scale, shift, 1, 0, None, True, 1)
    assert_close(out, expected, atol=3e-2, rtol=2e-2)


# ---------------------------------------------------------------------------
# The choice between implementations
# ---------------------------------------------------------------------------


def test_problem_key_names_the_shape(fake_gpu_timing):
    """The disk cache's key of a problem: the input's shape and strides, the weight's shape, stride, padding,
    dilation, groups, dtype, residual and ReLU."""
    weight, scale, shift = torch.randn(64, 32, 3, 3), torch.ones(64), torch.zeros(64)
    x = torch.randn(4, 32, 14, 14).contiguous(memory_format=torch.channels_last)
    conv_bn_act(x, weight, None, 2, 1, scale=scale, shift=shift)
    (decision,) = tuning.decisions()
    assert decision["key"] == "conv_bn_act:4x32x14x14:6272x1x448x32:float32:64x32x3x3:2x2:1x1:1x1:1:-:1"
    # every candidate of the main tree tried (cuDNN's fused conv has no CPU kernel: it fails, remembered)
    assert set(decision["times_ms"]) | set(decision.get("failed", [])) == {"cudnn_fused", "cudnn_affine", "triton"}


# ---------------------------------------------------------------------------
# GPU: the compiled kernel and the measured dispatch (bench/gpu_check.sh)
# ---------------------------------------------------------------------------

# ResNet-50's conv kinds at a small batch: (cin, cout, kernel, stride, padding, size)
RESNET50_CONVS = [
    (3, 64, 7, 2, 3, 224),
    (64, 64, 1, 1, 0, 56),
    (64, 64, 3, 1, 1, 56),
    (64, 256, 1, 1, 0, 56),
    (256, 128, 1, 1, 0, 56),
    (128, 128, 3, 2, 1, 56),
    (256, 512, 1, 2, 0, 56),
    (512, 2048, 1, 1, 0, 7),
    (512, 512, 3, 1, 1, 7),
]


# Every conv in bf16; fp16 and fp32 (tf32) on the stem, a 1x1 and a strided 3x3 (each case compiles a kernel).
GPU_CASES = [(c, torch.bfloat16) for c in RESNET50_CONVS] + [
    (RESNET50_CONVS[i], dtype) for i in (0, 3, 5) for dtype in (torch.float16, torch.float32)
]


def _case_id(value):
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else "x".join(map(str, value))


@pytest.mark.cuda
@pytest.mark.parametrize("conv,dtype", GPU_CASES, ids=_case_id)
def test_triton_kernel_on_gpu(conv, dtype):
    cin, cout, k, stride, pad, size = conv
    x, weight, scale, shift, res = _problem(cin, cout, k, stride, pad, 1, size, size, dtype, batch=4, residual=True)
    x, weight, scale, shift, res = (t.cuda() for t in (x, weight, scale, shift, res))
    tuning.override("conv_bn_act=triton")
    out = conv_bn_act(x, weight, None, stride, pad, scale=scale, shift=shift, residual=res, relu=True)
    expected = _expected(x, weight, scale, shift, stride, pad, res, True, 1)
    atol, rtol = {torch.float32: (2e-2, 2e-2)}.get(dtype, KERNEL_TOL[dtype])  # fp32 runs as tf32, like cuDNN
    assert_close(out, expected, atol=atol, rtol=rtol)


@pytest.mark.cuda
@pytest.mark.parametrize("residual", [True, False], ids=["res", "plain"])
def test_dispatch_measures_on_gpu(tmp_path, monkeypatch, residual):
    check_dispatch_measures_on_gpu(tmp_path, monkeypatch, residual)


def check_dispatch_measures_on_gpu(tmp_path, monkeypatch, residual) -> dict:
    """The first call times every candidate, remembers the choice on disk, and every candidate computes the
    same thing in channels_last; returns the candidates' times."""
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    x, weight, scale, shift, res = _problem(64, 256, 1, 1, 0, 1, 28, 28, torch.bfloat16, batch=32, residual=residual)
    x, weight, scale, shift = (t.cuda() for t in (x, weight, scale, shift))
    res = res.cuda() if residual else None
    expected = _expected(x, weight, scale, shift, 1, 0, res, True, 1)
    out = conv_bn_act(x, weight, None, 1, 0, scale=scale, shift=shift, residual=res)
    (decision,) = tuning.decisions()
    times = decision["times_ms"]
    assert decision["source"] == "measured" and {"cudnn_fused", "triton"} <= set(times)
    assert_close(out, expected, atol=3e-2, rtol=2e-2)
    for name in times:  # every candidate computes the same thing
        tuning.override(f"conv_bn_act={name}")
        got = conv_bn_act(x, weight, None, 1, 0, scale=scale, shift=shift, residual=res)
        assert_close(got, expected, atol=6e-2, rtol=3e-2, name=name)
        assert got.is_contiguous(memory_format=torch.channels_last), name
    assert list(tmp_path.glob("dispatch-*.json"))
    return times


@pytest.mark.cuda
def test_a_default_gpu_run_times_only_gpu_proven_implementations(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    x, weight, scale, shift, _ = _problem(64, 256, 1, 1, 0, 1, 28, 28, torch.bfloat16, batch=32)
    x, weight, scale, shift = (t.cuda() for t in (x, weight, scale, shift))
    conv_bn_act(x, weight, None, 1, 0, scale=scale, shift=shift)
    (decision,) = tuning.decisions()
    assert set(decision["times_ms"]) == {"cudnn_fused", "cudnn_affine", "triton"}


# ---------------------------------------------------------------------------
# torch.compile of converted models: one graph, the fused op held as a custom op on the kernel path
# ---------------------------------------------------------------------------

OP = torch.ops.fastresnet.conv_bn_act.default
OP_TARGETS = (OP, torch.ops.fastresnet.conv_bn_act)  # dynamo's graphs name the packet


def _bottleneck_net():
    """A stem conv-BN-ReLU chain and a projection Bottleneck: every kind of fused module, small."""
    stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
    block = Bottleneck(32, 16, stride=2, downsample=nn.Sequential(conv1x1(32, 64, 2), nn.BatchNorm2d(64)))
    return randomize_bn(nn.Sequential(stem, block))


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


def test_compiled_op_follows_changed_weights():
    """Nothing folded is kept between calls: the compiled model sees a BatchNorm recalibrated in place, and
    a weight edited through .data (which bypasses the version counter)."""
    model = _bottleneck_net()
    converted = fastresnet.convert(copy.deepcopy(model))
    compiled = torch.compile(converted, fullgraph=True, backend="eager")
    x = torch.randn(1, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4, name="first call")
        for m in (model, converted):
            m[1].bn2.running_var.mul_(3.0)
            m[1].conv3.weight.data.mul_(2.0)
        assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4, name="after the changes")


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_custom_op_passes_opcheck(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 16, 5, 4).contiguous(memory_format=fmt)
    residual = torch.randn(2, 24, 3, 2).contiguous(memory_format=fmt)
    weight = torch.randn(24, 16, 3, 3) / 12
    scale, shift = torch.rand(24) + 0.5, torch.randn(24) * 0.1
    args = (x, weight, scale, shift, residual, [2, 2], [1, 1], [1, 1], 1, True, "triton")
    torch.library.opcheck(OP, args, test_utils=("test_schema", "test_faketensor"))
    out = OP(*args)
    assert out.is_contiguous(memory_format=fmt)  # the layout the fake implementation promises


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])  # reduce-overhead: CUDA graphs capture the op
def test_gpu_compiled_converted_resnet_matches_eager(mode):
    """On the GPU the compiled converted model (inductor, bf16, channels_last) holds one custom op per conv
    and matches the eager converted model, also when CUDA graphs capture and replay it."""
    model = randomize_bn(torchvision.models.resnet18()).cuda().to(torch.bfloat16)
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


# ---------------------------------------------------------------------------
# The CPU's own candidates (without Triton's interpreter): timed by the same tuner
# ---------------------------------------------------------------------------

CPU_CANDIDATES = {"eager", "eager_folded", "onednn"}


@pytest.fixture
def cpu_route(tmp_path, monkeypatch):
    """A CPU as users have it: no interpreter standing in for a GPU, a fresh disk cache."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    tuning.clear()
    yield tmp_path
    tuning.clear()


def test_the_cpu_times_its_candidates_once_and_caches_the_choice(cpu_route, monkeypatch):
    x, weight, scale, shift, res = _problem(8, 16, 3, 1, 1, 1, 6, 6, torch.float32, residual=True)
    out = conv_bn_act(x, weight, None, 1, 1, scale=scale, shift=shift, residual=res)
    assert_close(out, _expected(x, weight, scale, shift, 1, 1, res, True, 1), atol=1e-4, rtol=1e-4)
    assert out.is_contiguous(memory_format=torch.channels_last)
    (decision,) = tuning.decisions()
    assert decision["op"] == "conv_bn_act" and decision["source"] == "measured"
    assert set(decision["times_ms"]) == CPU_CANDIDATES and decision["choice"] in CPU_CANDIDATES
    (cache,) = cpu_route.glob("dispatch-*.json")
    assert torch.backends.cpu.get_cpu_capability() in cache.name

    tuning.clear()  # a new process: the choice comes from disk, nothing is timed
    monkeypatch.setattr(tuning, "measure", lambda *a: pytest.fail("timed again"))
    conv_bn_act(x, weight, None, 1, 1, scale=scale, shift=shift, residual=res)
    assert tuning.decisions()[0]["source"] == "disk cache"


@pytest.mark.parametrize("name", sorted(CPU_CANDIDATES))
@pytest.mark.parametrize("residual,relu", EPILOGUES, ids=["plain", "relu", "res", "res_relu"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_each_cpu_candidate_matches_the_reference(cpu_route, name, residual, relu, channels_last):
    """Pinned, each candidate computes the op in either layout, the output in the input's."""
    tuning.override(f"conv_bn_act={name}")
    x, weight, scale, shift, res = _problem(12, 16, 3, 2, 1, 1, 9, 7, torch.float32, residual=residual,
                                            channels_last=channels_last)
    bias = torch.randn(16)
    out = conv_bn_act(x, weight, bias, 2, 1, scale=scale, shift=shift, residual=res, relu=relu)
    expected = conv_bn_act_reference(x, weight, scale, shift + bias * scale, 2, 1, res, relu)  # the bias folded
    assert_close(out, expected, atol=1e-4, rtol=1e-4, name=name)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert list(CONV_BN_ACT.memo.values()) == [name]


@pytest.mark.parametrize("name", sorted(CPU_CANDIDATES))
def test_each_cpu_candidate_computes_the_op(cpu_route, name):
    for kind in CONV_KINDS:
        _, cin, cout, k, stride, pad, dil, h, w = kind
        x, weight, scale, shift, res = _problem(cin, cout, k, stride, pad, dil, h, w, torch.float32, residual=True)
        out = _cpu_path(name, x, weight, scale, shift, res, (stride,) * 2, (pad,) * 2, (dil,) * 2, 1, True)
        assert_close(out, _expected(x, weight, scale, shift, stride, pad, res, True, dil), atol=1e-4, rtol=1e-4,
                     name=f"{name} {kind[0]}")


def test_bf16_on_the_cpu_route(cpu_route):
    x, weight, scale, shift, res = _problem(16, 16, 1, 1, 0, 1, 4, 4, torch.float32, residual=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_bn_act(x, weight, scale=scale, shift=shift, residual=res)
    assert out.dtype == torch.bfloat16
    expected = _expected(x.bfloat16(), weight.bfloat16(), scale, shift, 1, 0, res.bfloat16(), True, 1)
    assert_close(out, expected, atol=6e-2, rtol=3e-2)
    (decision,) = tuning.decisions()
    # oneDNN's bf16 convolution needs AVX512BW/VL/DQ or AVX-NE-CONVERT; elsewhere it is not offered
    assert ("onednn" in decision["times_ms"]) == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_without_the_private_oneDNN_ops_the_eager_paths_run(cpu_route, monkeypatch):
    from fastresnet.ops import onednn

    monkeypatch.setattr(onednn, "available", lambda: False)
    x, weight, scale, shift, _ = _problem(8, 16, 3, 1, 1, 1, 6, 6, torch.float32)
    out = conv_bn_act(x, weight, None, 1, 1, scale=scale, shift=shift)
    assert_close(out, _expected(x, weight, scale, shift, 1, 1, None, True, 1), atol=1e-4, rtol=1e-4)
    (decision,) = tuning.decisions()
    assert set(decision["times_ms"]) == {"eager", "eager_folded"}


def test_without_a_measurement_the_cpu_runs_the_unconverted_computation(cpu_route, monkeypatch):
    monkeypatch.setenv("FASTRESNET_DISPATCH", "default")
    x, weight, scale, shift, _ = _problem(8, 16, 3, 1, 1, 1, 6, 6, torch.float32)
    conv_bn_act(x, weight, None, 1, 1, scale=scale, shift=shift)
    assert not tuning.decisions() and list(CONV_BN_ACT.memo.values()) == ["eager"]


def test_a_converted_model_on_the_cpu_route_matches_and_compiles(cpu_route):
    model = _bottleneck_net()
    converted = fastresnet.convert(copy.deepcopy(model))
    x = torch.randn(2, 3, 8, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_close(converted(x), model(x), atol=1e-4, rtol=1e-4, name="eager converted model")
    assert {d["op"] for d in tuning.decisions()} == {"conv_bn_act"} and len(tuning.decisions()) == 5
    out, graphs = _graphs_of(converted, x)  # the measured choices, traced as PyTorch's ops in one graph
    assert len(graphs) == 1 and _op_calls(graphs[0]) == 0
    with torch.no_grad():
        assert_close(out, model(x), atol=1e-4, rtol=1e-4, name="compiled converted model")


@pytest.mark.parametrize("onednn_ms,expected", [(0.96, "eager"), (0.5, "onednn")], ids=["no_winner", "onednn_wins"])
def test_never_slower_where_no_cpu_candidate_wins_the_unconverted_computation_runs(cpu_route, monkeypatch, onednn_ms,
                                                                                   expected):
    """A candidate within tuning.MARGIN of plain PyTorch's conv + affine map (a shared CPU's jitter) does not
    replace it; one clearly faster does."""
    from fastresnet.ops import onednn

    times = {"eager": 1.0, "eager_folded": 0.97, "onednn": onednn_ms}
    monkeypatch.setattr(tuning, "measure", lambda candidates, device: {name: times[name] for name in candidates})
    if expected == "eager":
        monkeypatch.setattr(onednn, "conv_bias_act", lambda *a: pytest.fail("oneDNN's conv ran"))
    x, weight, scale, shift, res = _problem(8, 16, 3, 1, 1, 1, 6, 6, torch.float32, residual=True)
    out = conv_bn_act(x, weight, None, 1, 1, scale=scale, shift=shift, residual=res)
    assert_close(out, _expected(x, weight, scale, shift, 1, 1, res, True, 1), atol=1e-4, rtol=1e-4)
    (decision,) = tuning.decisions()
    assert decision["choice"] == expected and list(CONV_BN_ACT.memo.values()) == [expected]
