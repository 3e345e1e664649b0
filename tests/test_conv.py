"""The fused conv-BN-act kernel against F.conv2d, the op's checks, and the dispatch cache.

On the CPU the kernel runs through Triton's interpreter (conftest sets
TRITON_INTERPRET=1): small shapes, big blocks.
"""

import json
import math
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastresnet.ops import dispatch
from fastresnet.ops.conv import (
    PreparedConvBN,
    _candidates as conv_candidates,
    _triton_tile_names,
    conv_bn_act,
    conv_bn_act_prepared,
    implementation,
    problem_key,
)
from fastresnet.reference import conv_bn_act_reference
from fastresnet.testing import assert_close

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
    out = conv_bn_act(x, weight, scale, shift, stride, pad, residual=res, relu=relu, dilation=dil)
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
    out = conv_bn_act(x, weight, scale, shift, 1, 1, residual=res, relu=True)
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
    got = conv_bn_act(x, weight, scale, shift, 2, 1, residual=res)
    assert torch.equal(got, conv_bn_act_reference(x, weight, scale, shift, 2, 1, res, True))


def test_grouped_conv_falls_back_to_reference():
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    weight, scale, shift = torch.randn(16, 2, 3, 3), torch.rand(16) + 0.5, torch.randn(16)
    got = conv_bn_act(x, weight, scale, shift, 1, 1, groups=4)
    assert_close(got, conv_bn_act_reference(x, weight, scale, shift, 1, 1, None, True, 1, 4))


@pytest.mark.parametrize("name", ["triton", "cudnn_affine"])  # cudnn_fused needs cuDNN: a cuda test
def test_each_cpu_runnable_implementation_matches(name):
    from fastresnet.ops.conv import IMPLEMENTATIONS, _candidates

    x, weight, scale, shift, res = _problem(16, 24, 3, 2, 1, 1, 7, 7, torch.float16, residual=True)
    p = PreparedConvBN(weight, scale, shift, 2, 1)
    assert name in _candidates(x, p, res)
    out = IMPLEMENTATIONS[name](x, p, res, True)
    assert_close(out, _expected(x, weight, scale, shift, 2, 1, res, True, 1), atol=4e-3, rtol=4e-3)


def test_bad_inputs_name_the_problem():
    x, weight, scale, shift, _ = _problem(8, 8, 3, 1, 1, 1, 5, 5, torch.float32)
    with pytest.raises(ValueError, match="channels"):
        conv_bn_act(x[:, :4], weight, scale, shift, 1, 1)
    with pytest.raises(ValueError, match="scale must have shape"):
        conv_bn_act(x, weight, scale[:3], shift, 1, 1)
    with pytest.raises(ValueError, match="residual has shape"):
        conv_bn_act(x, weight, scale, shift, 1, 1, residual=torch.zeros(2, 8, 4, 4))
    with pytest.raises(RuntimeError, match="inference-only"):
        conv_bn_act(x.requires_grad_(), weight, scale, shift, 1, 1)
    with pytest.raises(RuntimeError, match="inference-only"):
        conv_bn_act(x.detach(), weight.requires_grad_(), scale, shift, 1, 1)


def test_autocast_computes_in_autocast_dtype():
    x, weight, scale, shift, _ = _problem(16, 16, 1, 1, 0, 1, 4, 4, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_bn_act(x, weight, scale, shift)
    assert out.dtype == torch.bfloat16
    expected = _expected(x.bfloat16(), weight.bfloat16(), scale, shift, 1, 0, None, True, 1)
    assert_close(out, expected, atol=3e-2, rtol=2e-2)


# ---------------------------------------------------------------------------
# Dispatch candidates: one per Triton tile, and cuBLASLt for 1x1 convs
# ---------------------------------------------------------------------------


@pytest.fixture
def hopper(monkeypatch):
    """Let the tile lists see an H100 (sm_90, 227 KB shared memory per block) on this CPU."""
    props = types.SimpleNamespace(shared_memory_per_block_optin=227 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    return props


def _tiles_for(cin, cout, k, stride, size, residual, itemsize=2, batch=256):
    from fastresnet.kernels.conv import _tile_candidates, _uses_flat_k

    out = (size + 2 * (k // 2) - k) // stride + 1
    m = batch * out * out
    return _tile_candidates(m, cout, cin, _uses_flat_k(cin), residual, itemsize, "cuda")


# ResNet-50 convs of every shape class: (cin, cout, kernel, stride, padding, input size)
TILE_CONVS = [(3, 64, 7, 2, 3, 224), (64, 64, 3, 1, 1, 56), (256, 64, 1, 1, 0, 56), (256, 512, 1, 2, 0, 56),
              (512, 2048, 1, 1, 0, 7), (512, 512, 3, 1, 1, 7), (128, 128, 3, 2, 1, 56)]


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "res"])
@pytest.mark.parametrize("conv", TILE_CONVS, ids=lambda c: "x".join(map(str, c)))
def test_tile_candidates_per_shape_class(hopper, conv, residual):
    from fastresnet.kernels.conv import _HOPPER_TILES, _shape_class, _tile_config, _TileConfig, _uses_flat_k

    cin, cout, k, stride, _, size = conv
    tiles = _tiles_for(cin, cout, k, stride, size, residual)
    out = (size + 2 * (k // 2) - k) // stride + 1
    fixed = _tile_config(256 * out * out, cout, cin, _uses_flat_k(cin), 2, False, "cuda")
    assert tiles[0] == fixed  # the tile that runs without measurement is always timed too
    assert 2 <= len(tiles) <= 5 and len(set(tiles)) == len(tiles)
    listed = {_TileConfig(*t[:3], 8, *t[3:]) for t in _HOPPER_TILES[_shape_class(cout, _uses_flat_k(cin), residual)]}
    assert set(tiles[1:]) <= listed  # the others are the ones compiled for sm_90 by compile_conv_for_hopper.py
    for tile in tiles:
        assert tile.block_n <= max(64, 1 << (cout - 1).bit_length())  # no 256-wide tile over 128 channels
        assert _TileConfig.from_name(tile.name) == tile
        assert tile.shared_bytes(2) <= hopper.shared_memory_per_block_optin


def test_tile_candidates_follow_dtype_and_older_gpus(hopper, monkeypatch):
    bf16 = _tiles_for(512, 2048, 1, 1, 7, False)
    fp32 = _tiles_for(512, 2048, 1, 1, 7, False, itemsize=4)
    assert all(t.block_k == 32 for t in fp32) and all(t.block_k == 64 for t in bf16)  # same bytes per stage
    assert all(t.block_k == 16 for t in _tiles_for(16, 128, 3, 1, 8, False))  # K steps no deeper than C
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    hopper.shared_memory_per_block_optin = 100 * 1024
    ampere = _tiles_for(512, 2048, 1, 1, 7, False)
    assert all(t.num_stages <= 3 for t in ampere)
    assert all(t.shared_bytes(2) <= 100 * 1024 for t in ampere[1:]) and len(ampere) < len(bf16)


def test_tiles_fixed_switch_leaves_the_rule_tile_alone(hopper, monkeypatch):
    """FASTRESNET_TILES=fixed: one Triton candidate per kernel, the tile the fixed rule runs."""
    x, weight, scale, shift, _ = _problem(64, 128, 3, 1, 1, 1, 8, 8, torch.float16)
    p = PreparedConvBN(weight, scale, shift, 1, 1)
    searched = _triton_tile_names(x, p, None)
    monkeypatch.setenv(dispatch.TILES_ENV, "fixed")
    assert len(searched) > 1 and _triton_tile_names(x, p, None) == searched[:1]


def test_tile_names_are_checked():
    from fastresnet.kernels.conv import _TileConfig

    with pytest.raises(ValueError, match="BMxBNxBK"):
        _TileConfig.from_name("128x128w8")
    with pytest.raises(KeyError, match="no implementation 'cudnn'"):
        implementation("cudnn")


# One problem per shape class (flat K, 64 channels, wide, wide with residual), at sizes the interpreter runs fast.
TILE_CLASS_PROBLEMS = [
    ("flat_k", (3, 16, 7, 2, 3, 1, 13, 11), False),
    ("narrow", (16, 24, 3, 1, 1, 1, 7, 6), True),
    ("wide", (32, 80, 1, 1, 0, 1, 5, 7), False),
    ("wide_residual", (32, 80, 3, 2, 1, 1, 9, 7), True),
]


@pytest.mark.parametrize("name,conv,residual", TILE_CLASS_PROBLEMS, ids=[p[0] for p in TILE_CLASS_PROBLEMS])
def test_every_tile_candidate_computes_the_conv(hopper, name, conv, residual):
    """Each "triton:<tile>" candidate, run through the interpreter: the tile sizes change masks and loop
    bounds, never the result (warps and stages are the GPU compiler's; tests/compile_conv_for_hopper.py)."""
    cin, cout, k, stride, pad, dil, h, w = conv
    x, weight, scale, shift, res = _problem(cin, cout, k, stride, pad, dil, h, w, torch.float16, residual=residual)
    p = PreparedConvBN(weight, scale, shift, stride, pad)
    names = _triton_tile_names(x, p, res)
    assert names and all(n.startswith("triton:") for n in names)
    expected = _expected(x, weight, scale, shift, stride, pad, res, True, dil)
    for tile_name in names:
        out = implementation(tile_name)(x, p, res, True)
        assert_close(out, expected, atol=4e-3, rtol=4e-3, name=tile_name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_cublaslt_candidate_is_the_1x1_conv(dtype, relu):
    x, weight, scale, shift, _ = _problem(32, 48, 1, 1, 0, 1, 5, 7, dtype)
    p = PreparedConvBN(weight, scale, shift, dtype=dtype)
    assert "cublaslt_fused" in conv_candidates(x, p, None)
    out = implementation("cublaslt_fused")(x, p, None, relu)
    assert out.shape == (2, 48, 5, 7) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)  # a view of the GEMM's [N*H*W, Cout] rows
    atol, rtol = KERNEL_TOL[dtype]
    assert_close(out, _expected(x, weight, scale, shift, 1, 0, None, relu, 1), atol=atol, rtol=rtol)


def test_cublaslt_candidate_only_where_it_is_a_gemm():
    x, weight, scale, shift, res = _problem(32, 48, 1, 1, 0, 1, 5, 7, torch.float32, residual=True)
    p = PreparedConvBN(weight, scale, shift)
    assert "cublaslt_fused" not in conv_candidates(x, p, res)  # a residual: left to the one-kernel paths
    assert "cublaslt_fused" not in conv_candidates(x.contiguous(), p, None)  # NCHW: no [N*H*W, C] view
    assert "cublaslt_fused" not in conv_candidates(x, PreparedConvBN(weight, scale, shift, stride=2), None)
    x3, w3, *_ = _problem(32, 48, 3, 1, 1, 1, 5, 7, torch.float32)
    assert "cublaslt_fused" not in conv_candidates(x3, PreparedConvBN(w3, scale, shift, padding=1), None)


# ---------------------------------------------------------------------------
# Dispatch: choice, cache file
# ---------------------------------------------------------------------------


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTRESNET_DISPATCH", raising=False)
    dispatch.clear_memory()
    yield tmp_path
    dispatch.clear_memory()
    dispatch.set_dispatch_mode(None)


@pytest.fixture
def fake_timer(monkeypatch):
    """Pretend the CPU can be measured, with made-up times per candidate."""
    calls = []
    times = {"fast": 1.0, "slow": 3.0}

    def fake_time_ms(fn, device, warmup=3, reps=10):
        name = fn()
        calls.append(name)
        return times[name]

    monkeypatch.setattr(dispatch, "_can_measure", lambda device: True)
    monkeypatch.setattr(dispatch, "time_ms", fake_time_ms)
    return calls


def _candidates():
    return {"slow": lambda: "slow", "fast": lambda: "fast", "broken": lambda: 1 / 0}


def test_dispatch_measures_once_and_caches_on_disk(cache_dir, fake_timer, caplog):
    cpu = torch.device("cpu")
    with caplog.at_level("INFO", logger="fastresnet.dispatch"):
        assert dispatch.choose("k1", _candidates(), "slow", cpu) == "fast"
    assert "dispatch k1 -> fast (fast 1.000 ms, slow 3.000 ms)" in caplog.text
    assert sorted(fake_timer) == ["fast", "slow"]  # "broken" raised and was skipped
    assert dispatch.choose("k1", _candidates(), "slow", cpu) == "fast"
    assert len(fake_timer) == 2  # the second call was answered from memory
    (listed,) = dispatch.decisions()
    assert listed["choice"] == "fast" and listed["times_ms"] == {"fast": 1.0, "slow": 3.0}
    (path,) = cache_dir.glob("dispatch-*.json")
    assert json.loads(path.read_text())["decisions"]["k1"]["choice"] == "fast"
    assert not list(cache_dir.glob("*.tmp"))  # the temp file was renamed over, not left behind

    dispatch.clear_memory()  # a new process
    assert dispatch.choose("k1", _candidates(), "slow", cpu) == "fast"
    assert len(fake_timer) == 2 and dispatch.decisions()[0]["source"] == "disk cache"


@pytest.mark.parametrize("content", ["{not json", '{"decisions": 3}', "[]"], ids=["truncated", "bad_table", "list"])
def test_dispatch_ignores_corrupt_cache_with_warning(cache_dir, fake_timer, content):
    path = dispatch.cache_path(dispatch.environment_tag(torch.device("cpu")))
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match="corrupt dispatch cache"):
        assert dispatch.choose("k1", _candidates(), "slow", torch.device("cpu")) == "fast"
    assert json.loads(path.read_text())["decisions"]["k1"]["choice"] == "fast"  # rewritten whole


def test_dispatch_ignores_stale_cache_with_warning(cache_dir, fake_timer):
    tag = dispatch.environment_tag(torch.device("cpu"))
    path = dispatch.cache_path(tag)
    dispatch.save_cache(path, {**tag, "triton": "0.0.1"}, {"k1": {"choice": "slow", "times_ms": {}}})
    with pytest.warns(RuntimeWarning, match="stale dispatch cache"):
        assert dispatch.choose("k1", _candidates(), "slow", torch.device("cpu")) == "fast"


def test_dispatch_switches(cache_dir, fake_timer, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("FASTRESNET_DISPATCH", "fixed")
    assert dispatch.choose("k2", _candidates(), "slow", cpu) == "slow" and not fake_timer
    monkeypatch.setenv("FASTRESNET_DISPATCH", "broken")
    assert dispatch.choose("k2", _candidates(), "slow", cpu) == "broken"
    dispatch.set_dispatch_mode("nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        dispatch.choose("k2", _candidates(), "slow", cpu)
    dispatch.set_dispatch_mode("fixed")
    assert dispatch.choose("k2", _candidates(), "slow", cpu) == "slow"


def test_dispatch_inside_a_cuda_graph_capture_times_nothing(cache_dir, fake_timer, monkeypatch):
    """A first call met inside a CUDA-graph capture (no warm-up before it) cannot time (the event sync
    would fail and spoil the capture): a choice already made is used, else the fixed rule."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(dispatch, "_capturing", lambda device: True)
    assert dispatch.choose("k4", _candidates(), "slow", cpu) == "slow" and not fake_timer
    assert dispatch.decision("k4") is None  # nothing remembered: a later uncaptured call measures
    monkeypatch.setattr(dispatch, "_capturing", lambda device: False)
    assert dispatch.choose("k4", _candidates(), "slow", cpu) == "fast"
    dispatch.clear_memory()  # a new process: the disk cache answers inside a capture too
    monkeypatch.setattr(dispatch, "_capturing", lambda device: True)
    timed = len(fake_timer)
    assert dispatch.choose("k4", _candidates(), "slow", cpu) == "fast" and len(fake_timer) == timed


def test_dispatch_off_gpu_uses_fixed_rule(cache_dir):
    assert dispatch.choose("k3", _candidates(), "slow", torch.device("cpu")) == "slow"
    assert not list(cache_dir.iterdir())


def test_problem_key_names_the_shape():
    p = PreparedConvBN(torch.randn(64, 32, 3, 3), torch.ones(64), torch.zeros(64), stride=2, padding=1)
    x = torch.randn(4, 32, 14, 14).contiguous(memory_format=torch.channels_last)
    key = problem_key(x, p, None, True)
    assert "n4c32h14w14" in key and "k64x3x3" in key and "s2x2" in key and "float32" in key and ":cl:" in key


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
    p = PreparedConvBN(weight, scale, shift, stride, pad)
    dispatch.set_dispatch_mode("triton")
    try:
        out = conv_bn_act_prepared(x, p, res, relu=True)
    finally:
        dispatch.set_dispatch_mode(None)
    expected = _expected(x, weight, scale, shift, stride, pad, res, True, 1)
    atol, rtol = {torch.float32: (2e-2, 2e-2)}.get(dtype, KERNEL_TOL[dtype])  # fp32 runs as tf32, like cuDNN
    assert_close(out, expected, atol=atol, rtol=rtol)


@pytest.mark.cuda
@pytest.mark.parametrize("residual", [True, False], ids=["res", "plain"])
def test_dispatch_measures_on_gpu(cache_dir, residual):
    x, weight, scale, shift, res = _problem(64, 256, 1, 1, 0, 1, 28, 28, torch.bfloat16, batch=32, residual=residual)
    x, weight, scale, shift = (t.cuda() for t in (x, weight, scale, shift))
    res = res.cuda() if residual else None
    expected = _expected(x, weight, scale, shift, 1, 0, res, True, 1)
    out = conv_bn_act(x, weight, scale, shift, 1, 0, residual=res)
    (decision,) = dispatch.decisions()
    times = decision["times_ms"]
    assert decision["source"] == "measured" and "cudnn_fused" in times
    assert sum(name.startswith("triton:") for name in times) >= 2  # every tile timed as its own candidate
    assert ("cublaslt_fused" in times) == (not residual)  # a 1x1 GEMM on channels_last, without residual
    assert_close(out, expected, atol=3e-2, rtol=2e-2)
    for name in times:  # every candidate computes the same thing
        dispatch.set_dispatch_mode(name)
        got = conv_bn_act(x, weight, scale, shift, 1, 0, residual=res)
        assert_close(got, expected, atol=6e-2, rtol=3e-2, name=name)
        assert got.is_contiguous(memory_format=torch.channels_last), name
    assert list(cache_dir.glob("dispatch-*.json"))


# One ResNet-like problem per shape class on the GPU: (cin, cout, kernel, stride, padding, dilation, h, w), residual
GPU_TILE_CLASS_PROBLEMS = [
    ("flat_k", (3, 64, 7, 2, 3, 1, 45, 38), False),
    ("narrow", (64, 64, 3, 1, 1, 1, 21, 19), True),
    ("wide", (64, 256, 1, 1, 0, 1, 14, 15), False),
    ("wide_residual", (128, 256, 3, 2, 1, 1, 15, 14), True),
]


@pytest.mark.cuda
@pytest.mark.parametrize("name,conv,residual", GPU_TILE_CLASS_PROBLEMS, ids=[p[0] for p in GPU_TILE_CLASS_PROBLEMS])
def test_every_tile_candidate_on_gpu(name, conv, residual):
    """Each tile the dispatch may time for this GPU compiles, launches and computes the conv (bf16, batch 8)."""
    from fastresnet.kernels.conv import _shape_class, _uses_flat_k

    cin, cout, k, stride, pad, dil, h, w = conv
    assert _shape_class(cout, _uses_flat_k(cin), residual) == name
    x, weight, scale, shift, res = _problem(cin, cout, k, stride, pad, dil, h, w, torch.bfloat16, batch=8,
                                            residual=residual)
    x, weight, scale, shift = (t.cuda() for t in (x, weight, scale, shift))
    res = res.cuda() if residual else None
    p = PreparedConvBN(weight, scale, shift, stride, pad)
    expected = _expected(x, weight, scale, shift, stride, pad, res, True, dil)
    for tile_name in _triton_tile_names(x, p, res):
        assert_close(implementation(tile_name)(x, p, res, True), expected, atol=3e-2, rtol=2e-2, name=tile_name)
