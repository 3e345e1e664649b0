"""fastresnet.experimental.cudnn_graph: cuDNN's conv + BatchNorm-statistics graph as a fused-block path.

On the CPU: the pure-Python shape and key logic, the statistics finalisation
and the first-call check that guards it, the custom op's plumbing (forward,
autograd, fallbacks) with a stand-in for the cuDNN graph, the block path with
it, and cuDNN's own validation and heuristics for
the graph this module describes, planned deviceless for an H100 when the
optional package is installed. On a GPU (cuda-marked): the real graph against
eager PyTorch for whole blocks.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck

from fastresnet import convert
from fastresnet.experimental import cudnn_graph
from fastresnet.experimental.common import checked
from fastresnet.experimental.cudnn_graph import GraphKey, channels_last_strides, graph_key, stats_from_sums
from fastresnet.nn import blocks
from fastresnet.ops import tuning
from fastresnet.reference import conv_stats_reference
from fastresnet.testing import assert_as_accurate_as, assert_close

EPS = 1e-5
HAS_PACKAGE = cudnn_graph._cudnn() is not None
needs_package = pytest.mark.skipif(not HAS_PACKAGE, reason=f"{cudnn_graph.PACKAGE} is not installed")


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------
# Without CUDA, without the package
# ---------------------------------------------------------------------------


def test_no_candidate_without_cuda():
    assert "CUDA" in cudnn_graph.unavailable_reason(torch.device("cpu"))
    block = convert(Bottleneck(16, 4), mode="train")
    x = _channels_last(torch.randn(2, 16, 4, 4))
    assert "cudnn_graph" not in blocks.FUSED_BLOCK._applying((block, x), True)
    with pytest.raises(RuntimeError, match="CUDA"):
        cudnn_graph.conv_stats_graph(x, torch.randn(8, 16, 1, 1))


def test_a_path_that_appears_later_is_measured_not_shadowed(fake_gpu_timing, monkeypatch):
    # A path that appears later (the package installed) must not be shadowed by a cached older choice.
    block = convert(BasicBlock(8, 8), mode="train")
    x = _channels_last(torch.randn(2, 8, 4, 4))
    def block_timings():
        return [key for op, key in fake_gpu_timing.timed if op == "fused_block"]

    block(x)
    assert len(block_timings()) == 1
    tuning.clear()  # a new process, with the disk cache
    block(x)
    assert len(block_timings()) == 1  # the same candidates: the disk cache answers
    tuning.clear()
    monkeypatch.setitem(blocks.FUSED_BLOCK.shelf, "cudnn_graph", lambda block, x: True)
    block(x)  # cudnn_graph fails on the CPU (and is left out), but it was timed: not shadowed
    assert len(block_timings()) == 2


def test_imports_cleanly_without_the_package():
    # `cudnn` made unimportable: the fused blocks still import, and the reason names the package.
    code = (
        "import sys; sys.modules['cudnn'] = None\n"
        "import torch\n"
        "from fastresnet.nn import blocks\n"
        "from fastresnet.experimental import cudnn_graph\n"
        "print(cudnn_graph.unavailable_reason(torch.device('cuda')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert cudnn_graph.PACKAGE in result.stdout and "fastresnet[cudnn]" in result.stdout


# ---------------------------------------------------------------------------
# Shapes, keys, precisions (pure Python)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 16, 7, 5), (1, 3, 1, 1), (4, 64, 56, 56)], ids=str)
def test_channels_last_strides_are_torchs(shape):
    # Equal wherever the size is > 1 (a size-1 dim's stride addresses nothing, torch leaves it as it finds it).
    ours, torchs = channels_last_strides(shape), _channels_last(torch.empty(shape)).stride()
    assert all(a == b for a, b, n in zip(ours, torchs, shape) if n > 1), (ours, torchs)
    assert torch.empty_strided(shape, ours).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("x_shape,w_shape,stride,padding", [
    ((2, 8, 7, 7), (12, 8, 3, 3), (1, 1), (1, 1)),
    ((3, 16, 9, 9), (16, 16, 3, 3), (2, 2), (1, 1)),
    ((2, 16, 7, 7), (24, 16, 1, 1), (2, 2), (0, 0)),
    ((1, 4, 5, 8), (4, 4, 3, 1), (1, 2), (1, 0)),
], ids=str)
def test_key_output_shape_matches_conv2d(x_shape, w_shape, stride, padding):
    key = graph_key(x_shape, w_shape, torch.bfloat16, stride, padding, prologue=True)
    expected = F.conv2d(torch.empty(x_shape), torch.empty(w_shape), None, stride, padding).shape
    assert key.y_shape == list(expected)
    same = graph_key(list(x_shape), torch.Size(w_shape), torch.bfloat16, list(stride), list(padding), True)
    assert same == key and hash(same) == hash(key)
    assert graph_key(x_shape, w_shape, torch.bfloat16, stride, padding, prologue=False) != key
    assert graph_key(x_shape, w_shape, torch.float16, stride, padding, prologue=True) != key


def test_key_rejects_bad_shapes():
    with pytest.raises(ValueError, match="8 channels"):
        graph_key((2, 8, 4, 4), (4, 6, 1, 1), torch.float16, (1, 1), (0, 0), False)
    with pytest.raises(ValueError, match="4-D"):
        graph_key((2, 8, 4), (4, 8, 1, 1), torch.float16, (1, 1), (0, 0), False)


def test_precision_variants_most_accurate_first_without_repeats():
    f32, bf16 = torch.float32, torch.bfloat16
    assert cudnn_graph.precision_variants(bf16, True) == [(f32, f32), (bf16, f32), (bf16, bf16)]
    assert cudnn_graph.precision_variants(bf16, False) == [(bf16, f32), (bf16, bf16)]
    assert cudnn_graph.precision_variants(f32, True) == [(f32, f32)]


def test_summarise_error_names_each_engine():
    err = RuntimeError('no engine proposed a plan (the backend declined: No valid engine configs\n'
                       '{"engineId":1,"smVersion":900,"knobChoices":{}}\n'
                       'Warning: CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE; Reason: !isTypeSupported\n'
                       'Warning: CUDNN_STATUS_NOT_SUPPORTED; Reason: finalize_internal()\n'
                       '{"engineId":3,"smVersion":900}\nWarning: CUDNN_STATUS_NOT_SUPPORTED_SHAPE; Reason: c % 8\n)')
    summary = cudnn_graph.summarise_error(err)
    assert summary.startswith("no engine proposed a plan")
    assert "engine 1: CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE; Reason: !isTypeSupported" in summary
    assert "engine 3: CUDNN_STATUS_NOT_SUPPORTED_SHAPE" in summary and "finalize_internal" not in summary
    assert cudnn_graph.summarise_error(ValueError()) == "ValueError"


# ---------------------------------------------------------------------------
# Statistics from sum and sum of squares, and the first-call guard
# ---------------------------------------------------------------------------


def _sums(y):
    y = y.float()
    return y.sum((0, 2, 3)).view(1, -1, 1, 1), y.square().sum((0, 2, 3)).view(1, -1, 1, 1)


def test_stats_from_sums_match_var_mean():
    y = torch.randn(4, 6, 5, 3) * torch.rand(1, 6, 1, 1) * 3 + torch.randn(1, 6, 1, 1)
    mean, invstd, var_unbiased = stats_from_sums(*_sums(y), y.numel() // 6, EPS)
    var, ref_mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    assert_close(mean, ref_mean, atol=1e-5, rtol=1e-5, name="mean")
    assert_close(invstd, torch.rsqrt(var + EPS), atol=1e-4, rtol=1e-4, name="invstd")
    assert_close(var_unbiased, torch.var(y, dim=(0, 2, 3)), atol=1e-4, rtol=1e-4, name="unbiased var")
    assert mean.dtype == invstd.dtype == var_unbiased.dtype == torch.float32
    constant = torch.full((2, 3, 4, 4), 0.1)  # E[y^2] - E[y]^2 rounds below 0 here: clamped
    _, invstd, var_unbiased = stats_from_sums(*_sums(constant), 32, EPS)
    assert (var_unbiased >= 0).all() and torch.isfinite(invstd).all()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        stats_from_sums(*_sums(constant[:1, :, :1, :1]), 1, EPS)


def test_the_first_call_check_rejects_sum_of_squares_cancellation():
    """The statistics' guard is the shelf's first-call check of the path: it compares what the statistics
    do to the normalised output with the main tree's. mean 1e4, std 1: fp32 sums lose the variance
    (rejected); mean 0: they keep it (accepted)."""
    for offset, fine in ((0.0, True), (1e4, False)):
        y = torch.randn(8, 4, 16, 16, dtype=torch.float64).add(offset).float()
        _, invstd, _ = stats_from_sums(*_sums(y.double()), y.numel() // 4, EPS)
        var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
        graph_out = ((y.double() - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)).float()
        eager_out = ((y.double() - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + EPS).view(1, -1, 1, 1)).float()
        check = checked("fused_block", "cudnn_graph", lambda: graph_out, lambda: eager_out)
        if fine:
            check()
        else:
            with pytest.warns(RuntimeWarning, match="candidate cudnn_graph is off"), pytest.raises(RuntimeError):
                check()


# ---------------------------------------------------------------------------
# The custom op with a stand-in for cuDNN (its plumbing, autograd, fallbacks)
# ---------------------------------------------------------------------------


class _StandIn:
    """Executes a graph's variant pack the way cuDNN would, with torch; `corrupt` spoils the sums."""

    def __init__(self, key: GraphKey, corrupt: float = 0.0):
        self.key, self.corrupt, self.runs = key, corrupt, 0

    def execute(self, pack, workspace, handle=None):
        self.runs += 1
        x, w = pack["x"], pack["w"]
        assert x.is_contiguous(memory_format=torch.channels_last) and workspace.dtype == torch.uint8
        a = x
        if self.key.prologue:
            a = torch.relu(x.float() * pack["scale"] + pack["bias"]).to(x.dtype)
        y = F.conv2d(a, w, None, self.key.stride, self.key.padding)
        pack["y"].copy_(y)
        sums, sq_sums = _sums(y)
        pack["sums"].copy_(sums + self.corrupt)
        pack["sq_sums"].copy_(sq_sums)


@pytest.fixture
def stand_in(monkeypatch):
    """cudnn_graph with every graph served by _StandIn (status per key from `verdicts`)."""
    verdicts: dict[str, object] = {"corrupt": 0.0, "unsupported": False}
    entries: dict[GraphKey, cudnn_graph._Entry] = {}

    def entry(key):
        if key not in entries:
            if verdicts["unsupported"]:
                entries[key] = cudnn_graph._Entry(None, "unsupported: stand-in")
            else:
                graph = _StandIn(key, verdicts["corrupt"])
                built = cudnn_graph._Graph(graph, "x", "w", "scale", "bias", "y", "sums", "sq_sums", torch.float32, 64)
                entries[key] = cudnn_graph._Entry(built, "built (stand-in)")
        return entries[key]

    monkeypatch.setattr(cudnn_graph, "_entry", entry)
    monkeypatch.setattr(cudnn_graph, "_handle", lambda device_index: None)
    monkeypatch.setattr(cudnn_graph, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(cudnn_graph, "_cudnn", lambda: pytest.fail("the stand-in must not reach the package"))
    return verdicts, entries


def _chain(x, w1, w2, g1, b1, g2, b2):
    from fastresnet.ops.bn_act import bn_act_stats

    y1, m1, i1, v1 = cudnn_graph.conv_stats_graph(x, w1, None, 1, 1, eps=EPS)
    y2, m2, i2, v2 = cudnn_graph.conv_stats_graph(y1, w2, None, 2, 0, eps=EPS, input_norm=(m1, i1, g1, b1))
    return bn_act_stats(y2, m2, i2, g2, b2), (m1, v1, m2, v2)


def _eager_chain(x, w1, w2, g1, b1, g2, b2):
    y1 = F.conv2d(x, w1, None, 1, 1)
    a1 = F.relu(F.batch_norm(y1, None, None, g1, b1, True, 0.0, EPS))
    y2 = F.conv2d(a1, w2, None, 2, 0)
    out = F.relu(F.batch_norm(y2, None, None, g2, b2, True, 0.0, EPS))
    return out, (y1.mean((0, 2, 3)), y1.var((0, 2, 3)), y2.mean((0, 2, 3)), y2.var((0, 2, 3)))


@pytest.mark.parametrize("verdict", ["built", "unsupported"])
def test_op_forward_gradients_and_statistics(stand_in, verdict):
    verdicts, entries = stand_in
    verdicts["unsupported"] = verdict == "unsupported"
    args = [_channels_last(torch.randn(2, 8, 7, 7)), torch.randn(12, 8, 3, 3) * 0.3, torch.randn(16, 12, 1, 1) * 0.3,
            torch.rand(12) + 0.5, torch.randn(12), torch.rand(16) + 0.5, torch.randn(16)]
    ours = [t.clone().requires_grad_() for t in args]
    eager = [t.clone().requires_grad_() for t in args]
    out, stats = _chain(*ours)
    ref, ref_stats = _eager_chain(*eager)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert_close(out, ref, atol=2e-4, rtol=2e-4, name="output")
    for name, a, b in zip(("mean1", "var1", "mean2", "var2"), stats, ref_stats):
        assert_close(a, b.detach(), atol=2e-4, rtol=2e-4, name=name)
    for name, a, b in zip(("x", "w1", "w2", "weight1", "bias1", "weight2", "bias2"), ours, eager):
        scale = b.grad.abs().max().item() + 1e-6
        assert_close(a.grad / scale, b.grad / scale, atol=2e-4, rtol=2e-4, name=f"grad {name}")
    statuses = {e.status.split()[0].rstrip(":") for e in entries.values()}
    assert statuses == {verdict}, statuses
    if verdict == "built":  # one run per graph (the backward reruns no conv forward)
        assert all(e.graph.graph.runs == 1 for e in entries.values())


def test_op_first_met_inside_a_cuda_graph_capture_runs_unfused(stand_in, monkeypatch):
    """Building a graph needs a cuDNN handle and host syncs, which a CUDA-graph capture forbids: a key
    first met there runs the unfused path without building; the next eager call builds it."""
    verdicts, entries = stand_in
    real_entry = cudnn_graph._entry
    monkeypatch.setattr(cudnn_graph, "_entries", entries)  # the stand-in's table is what _entries holds
    monkeypatch.setattr(tuning, "capturing", lambda device: True)
    monkeypatch.setattr(cudnn_graph, "_entry", lambda key: pytest.fail("built inside a capture"))
    x, w = _channels_last(torch.randn(2, 8, 5, 5)), torch.randn(4, 8, 3, 3)
    y, mean, _, var = cudnn_graph.conv_stats_graph(x, w, None, 1, 1, eps=EPS)
    ref = F.conv2d(x, w, None, 1, 1)
    assert_close(y, ref, atol=1e-4, rtol=1e-4, name="y")
    assert_close(mean, ref.mean((0, 2, 3)), atol=1e-4, rtol=1e-4, name="mean")
    assert not entries
    monkeypatch.setattr(tuning, "capturing", lambda device: False)
    monkeypatch.setattr(cudnn_graph, "_entry", real_entry)
    cudnn_graph.conv_stats_graph(x, w, None, 1, 1, eps=EPS)
    (entry,) = entries.values()
    assert entry.graph.graph.runs == 1


def test_op_keeps_the_input_layout_and_compiles_opaquely(stand_in, monkeypatch):
    # An NCHW input: the graph runs NHWC, the op returns what its fake promised (x's layout).
    x, w = torch.randn(2, 8, 5, 5), torch.randn(4, 8, 3, 3)
    y, mean, invstd, var = cudnn_graph.conv_stats_graph(x, w, None, 1, 1)
    ref, *_ = conv_stats_reference(x, w, 1, 1)
    assert y.is_contiguous() and y.shape == ref.shape
    assert_close(y, ref, atol=1e-4, rtol=1e-4, name="y")
    compiled = torch.compile(lambda a, b: cudnn_graph.conv_stats_graph(a, b, None, 1, 1)[0], fullgraph=True,
                             backend="eager")
    monkeypatch.setattr(cudnn_graph, "unavailable_reason", lambda device: pytest.fail("probed while compiling"))
    assert_close(compiled(x, w), ref, atol=1e-4, rtol=1e-4, name="compiled y")


def test_block_path_matches_torchvision_with_the_stand_in(stand_in):
    ref = Bottleneck(16, 8, 2, torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1, 2, bias=False), torch.nn.BatchNorm2d(32)))
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.5)
    fused = convert(copy.deepcopy(ref), mode="train")
    x = _channels_last(torch.randn(2, 16, 6, 6))
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_f, out_r = fused.run_path("cudnn_graph", xf), ref(xr)
    grad = torch.randn_like(out_r)
    out_f.backward(grad)
    out_r.backward(grad)
    assert_close(out_f, out_r, atol=1e-3, rtol=1e-3, name="output")
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        scale = q.grad.abs().max().item() + 1e-6
        assert_close(p.grad / scale, q.grad / scale, atol=1e-3, rtol=1e-3, name=f"grad {name}")
    for (name, a), b in zip(fused.named_buffers(), ref.buffers()):
        assert_close(a.float(), b.float(), atol=1e-4, rtol=1e-3, name=name)
    assert len(stand_in[1]) == 4  # conv1, conv2, conv3, downsample: one graph each


def test_a_graph_whose_statistics_are_off_never_wins_the_block(stand_in, fake_gpu_timing, monkeypatch):
    """The path has not run on a GPU: each conv's first call is compared with conv_stats' own, and with
    spoilt sums (a wrong mean) it warns and is left out of the block's measurement, however fast."""
    verdicts, _ = stand_in
    verdicts["corrupt"] = 50.0
    ref = Bottleneck(16, 4)
    fused = convert(copy.deepcopy(ref), mode="train")
    monkeypatch.setitem(blocks.FUSED_BLOCK.shelf, "cudnn_graph", lambda block, x: True)
    fake_gpu_timing.winners["fused_block"] = "cudnn_graph"
    x = _channels_last(torch.randn(2, 16, 5, 5))
    with pytest.warns(RuntimeWarning, match="candidate cudnn_graph is off"):
        out = fused(x)
    assert_close(out, ref(x), atol=1e-3, rtol=1e-3, name="output")
    (decision,) = [d for d in tuning.decisions() if d["op"] == "fused_block"]
    assert "cudnn_graph" not in decision["times_ms"] and decision["choice"] != "cudnn_graph"


# ---------------------------------------------------------------------------
# cuDNN itself, without a GPU: validation and heuristics for an H100
# ---------------------------------------------------------------------------

# What cuDNN's device-properties descriptor needs to plan for an H100 (SXM) without one.
H100_PROPERTIES = {
    "cudaDeviceId": 0, "deviceName": "NVIDIA H100 80GB HBM3", "deviceVer": 900, "driverVer": 13000,
    "isTccDriver": 0, "l2CacheSize": 52428800, "maxCtasPerSM": 32, "maxRegistersPerSM": 65536,
    "maxSharedMemoryPerBlock": 49152, "maxSharedMemoryPerBlockOptin": 232448, "maxThreadsPerBlock": 1024,
    "maxThreadsPerSM": 2048, "memClockRateKHz": 2619000, "multiProcessorCount": 132, "pciDeviceId": 0,
    "regsPerBlock": 65536, "reservedSharedMemoryPerBlock": 1024, "smClockRateKHz": 1980000, "smCountOrigin": 0,
    "supportCoopLaunch": 1, "totalGlobalMem": 85029158912, "warpSize": 32,
    "maxBlockSize": [1024, 1024, 64], "maxGridSize": [2147483647, 65535, 65535],
}


@needs_package
def test_cudnn_validates_the_graphs_and_plans_fp16_for_an_h100():
    """cuDNN checks every graph this module describes; its heuristics (queried deviceless for sm_90)
    propose a plan for the fp16 one. bf16 and fp32 rest on the runtime-compiled engine, which needs
    a GPU to answer (the cuda tests)."""
    cudnn = cudnn_graph._cudnn()
    try:
        props = cudnn.create_device_properties(json.dumps(H100_PROPERTIES))
    except Exception as err:
        pytest.skip(f"this cuDNN does not take the device-properties description: {err}")
    planned = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for prologue in (True, False):
            key = graph_key((32, 64, 56, 56), (64, 64, 3, 3), dtype, (1, 1), (1, 1), prologue)
            for scale_dtype, inter_dtype in cudnn_graph.precision_variants(dtype, prologue):
                described = cudnn_graph.describe_graph(key, scale_dtype, inter_dtype, device_property=props)
                described.graph.validate()
                described.graph.build_operation_graph()
                try:
                    cudnn_graph.plan_graph(described)
                except Exception:  # no engine for this precision deviceless
                    continue
                planned.append((dtype, prologue, scale_dtype))
                assert described.graph.get_execution_plan_count() >= 1
    assert (torch.float16, True, torch.float16) in planned, planned
    assert (torch.float16, False, torch.float16) in planned, planned


@needs_package
@pytest.mark.parametrize("prologue", [True, False])
def test_variant_pack_fills_every_operand_cuDNN_wants(prologue):
    # The frontend's own variant-pack check (before any GPU work) on the buffers execute() passes.
    try:
        props = cudnn_graph._cudnn().create_device_properties(json.dumps(H100_PROPERTIES))
    except Exception as err:
        pytest.skip(f"this cuDNN does not take the device-properties description: {err}")
    key = graph_key((4, 16, 8, 8), (32, 16, 3, 3), torch.float16, (2, 2), (1, 1), prologue)
    built = cudnn_graph.plan_graph(cudnn_graph.describe_graph(key, torch.float16, torch.float32, device_property=props))
    if not hasattr(built.graph, "_normalize"):
        pytest.skip("this nvidia-cudnn-frontend has no variant-pack normalisation to ask")
    x, w = torch.randn(key.x_shape, dtype=torch.float16), torch.randn(key.w_shape, dtype=torch.float16)
    scale, bias = (torch.rand(16), torch.randn(16)) if prologue else (None, None)
    pack, y, sums, _ = cudnn_graph.variant_pack(built, key, x, w, scale, bias)
    assert y.shape == (4, 32, 4, 4) and y.is_contiguous(memory_format=torch.channels_last) and sums.shape == (1, 32, 1, 1)
    workspace = torch.empty(16, dtype=torch.uint8)
    assert built.graph._normalize(built.graph._uid_to_data(pack), workspace) is not None
    del pack[built.y]
    with pytest.raises(ValueError, match="missing a buffer"):
        built.graph._normalize(built.graph._uid_to_data(pack), workspace)


# ---------------------------------------------------------------------------
# GPU: the real graphs through whole blocks
# ---------------------------------------------------------------------------


def _gpu_block(kind):
    if kind == "bottleneck":
        down = torch.nn.Sequential(torch.nn.Conv2d(64, 128, 1, 2, bias=False), torch.nn.BatchNorm2d(128))
        block, inplanes = Bottleneck(64, 32, 2, down), 64
    else:
        block, inplanes = BasicBlock(64, 64), 64
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.5)
    return block.cuda().to(memory_format=torch.channels_last), inplanes


def _built_statuses(dtype=None):
    return [r["status"] for r in cudnn_graph.report() if dtype is None or r["key"].dtype == dtype]


@pytest.mark.cuda
@needs_package
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_gpu_cudnn_graph_path_matches_eager(kind, dtype):
    """Forward, every gradient and the running statistics of the cudnn_graph path against eager
    (low precision: as accurate as eager autocast, both judged against fp32 with TF32 off)."""
    ref, inplanes = _gpu_block(kind)
    fused = convert(copy.deepcopy(ref), mode="train")
    exact = copy.deepcopy(ref)
    x = _channels_last(torch.randn(16, inplanes, 28, 28, device="cuda"))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 means fp32, backward included
        out_e = exact(x.clone().requires_grad_())
        out_e.sum().backward()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out_f = fused.run_path("cudnn_graph", x.clone().requires_grad_())
            out_r = ref(x.clone().requires_grad_())
        out_f.float().sum().backward()
        out_r.float().sum().backward()
    assert out_f.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        assert_close(out_f, out_e, atol=5e-3, rtol=5e-3, name="output")  # cuDNN's fp32 graph may use TF32
        for (name, p), e in zip(fused.named_parameters(), exact.parameters()):
            scale = e.grad.abs().max().item() + 1e-6
            assert_close(p.grad / scale, e.grad / scale, atol=2e-3, rtol=2e-3, name=f"grad {name}")
    else:
        assert_as_accurate_as(out_f.float(), out_r.float(), out_e, name="output")
        for (name, p), q, e in zip(fused.named_parameters(), ref.parameters(), exact.parameters()):
            assert_as_accurate_as(p.grad, q.grad, e.grad, name=f"grad {name}")
    for (name, a), b in zip(fused.named_buffers(), ref.buffers()):
        assert_close(a.float(), b.float(), atol=1e-3, rtol=1e-2, name=name)
    statuses = _built_statuses(dtype)
    if not any(s.startswith("built") for s in statuses):
        pytest.skip(f"results right, but through the unfused fallback: cuDNN built no graph for {dtype}: {statuses}")


@pytest.mark.cuda
@needs_package
def test_gpu_cudnn_graph_builds_for_resnet50_convs():
    """The candidate is only worth its place if cuDNN serves it in 16-bit: a ResNet-50 stage-1 3x3
    (prologue) and 1x1 (no prologue) must build in fp16 or bf16 and compute the reference's output and mean."""
    cudnn_graph.clear_cache()
    built = {}
    for dtype in (torch.float16, torch.bfloat16):
        x = _channels_last(torch.randn(32, 64, 56, 56, device="cuda", dtype=dtype))
        norm = (torch.randn(64, device="cuda"), torch.rand(64, device="cuda") + 0.5,
                torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda"))
        w3 = _channels_last(torch.randn(64, 64, 3, 3, device="cuda", dtype=dtype) / 24)
        w1 = _channels_last(torch.randn(64, 64, 1, 1, device="cuda", dtype=dtype) / 8)
        y, mean, invstd, _ = cudnn_graph.conv_stats_graph(x, w3, None, 1, 1, eps=EPS, input_norm=norm)
        ref, ref_mean, _, _ = conv_stats_reference(x, w3, 1, 1, norm)
        assert_close(y.float(), ref.float(), atol=5e-2, rtol=5e-2, name=f"{dtype} y")
        assert_close(mean, ref_mean, atol=2e-2, rtol=2e-2, name=f"{dtype} mean")
        cudnn_graph.conv_stats_graph(x, w1, None, 1, 0, eps=EPS)
        built[str(dtype)] = [r["status"] for r in cudnn_graph.report() if r["key"].dtype == dtype]
    print(json.dumps(built, indent=1))
    assert any(all(s.startswith("built") for s in statuses) for statuses in built.values()), built


@pytest.mark.cuda
@needs_package
def test_gpu_measured_dispatch_times_the_cudnn_graph_path(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    tuning.clear()
    ref, inplanes = _gpu_block("basic")
    fused = convert(copy.deepcopy(ref), mode="train")
    x = _channels_last(torch.randn(16, inplanes, 28, 28, device="cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused(x)
    (decision,) = [d for d in tuning.decisions() if d["op"] == "fused_block"]
    print(json.dumps({**decision, "cudnn_graphs": [str(s) for s in _built_statuses()]}, indent=1))
    assert "cudnn_graph" in decision["times_ms"], decision  # timed, not failed or left out by its check
