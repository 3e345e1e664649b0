"""conv_stats' per-shape tile choice (kernels/conv_train.py _STATS_TILES, fastresnet/ops/conv_train_tiles.py).

Every offered tile must compute the same raw output and statistics as the
reference (through Triton's interpreter on the CPU: tiny shapes that still span
several row and column blocks); the choice among them (key, candidates, fixed
rule, caches) is tested on the CPU with a fake H100 and a fake timer; on a GPU
the tiles are timed for real and the measured choice is recorded.
"""

from __future__ import annotations

import types

import pytest
import torch
import triton

from fastresnet.kernels.bn_stats import finalize_stats
from fastresnet.kernels.conv import _TileConfig
from fastresnet.kernels.conv_train import _STATS_TILES, MAX_STATS_TILES, _stats_tile_candidates, conv_stats_fwd
from fastresnet.kernels.conv_train_bwd import (
    _DGRAD_TILES,
    _WGRAD_TILES,
    _dgrad_tile_candidates,
    _wgrad_tile_candidates,
    conv_dgrad_bn,
    conv_wgrad,
)
from fastresnet.ops import conv_train_tiles, dispatch
from fastresnet.ops.conv_train import conv_stats
from fastresnet.reference import conv_stats_reference
from fastresnet.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
CONV_TOL = {torch.float32: (1e-3, 1e-3), torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)}


def _names(table):
    return sorted({_TileConfig(bm, bn, bk, 8, w, s).name for tiles in table.values() for bm, bn, bk, w, s in tiles})


OFFERED = _names(_STATS_TILES)

# (N, Cin, H, W, Cout, kernel, stride): M = 162 rows (3 blocks of 64, the last short) and 72
# channels (two 64-wide column blocks, one masked 128/256-wide one); a strided 1x1 with odd sizes
SHAPES = [(2, 20, 9, 9, 72, 3, 1), (3, 16, 11, 11, 40, 1, 2)]


@pytest.fixture(autouse=True)
def _fresh_choices():
    dispatch.clear_memory()
    conv_train_tiles.clear_choices()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield
    dispatch.set_dispatch_mode(None)
    dispatch.clear_memory()
    conv_train_tiles.clear_choices()


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def _problem(shape, dtype, normalise_input=True):
    n, c, h, w, out_c, k, stride = shape
    x = _channels_last(torch.randn(n, c, h, w, device=DEVICE).mul(2).add(1).to(dtype))
    weight = (torch.randn(out_c, c, k, k, device=DEVICE) / (c * k * k) ** 0.5).to(dtype)
    norm_input = None
    if normalise_input:  # beta < 0 for some channels: the ReLU and the padding after normalisation matter
        norm_input = (torch.randn(c, device=DEVICE) + 2.0, torch.rand(c, device=DEVICE) + 0.5,
                      torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE))
    return x, weight, norm_input


def _check_against_reference(x, weight, stride, padding, norm_input, out, stats):
    mean, invstd, var_unbiased = stats
    ref, ref_mean, _ = conv_stats_reference(x, weight, stride, padding, norm_input)
    atol, rtol = CONV_TOL[x.dtype]
    assert_close(out.float(), ref.float(), atol=atol, rtol=rtol, name="raw output")
    # The statistics describe the stored output exactly: compare with its own statistics.
    own_var, own_mean = torch.var_mean(out.float(), dim=(0, 2, 3), unbiased=False)
    m = out.numel() // out.shape[1]
    assert_close(mean, own_mean, atol=1e-5, rtol=1e-5, name="mean")
    assert_close(invstd, torch.rsqrt(own_var + EPS), atol=1e-4, rtol=1e-4, name="invstd")
    assert_close(var_unbiased, own_var * m / (m - 1), atol=1e-4, rtol=1e-4, name="unbiased var")
    assert_close(mean, ref_mean, atol=atol, rtol=rtol, name="mean vs reference")


@pytest.mark.parametrize("shape, dtype", [(SHAPES[0], torch.float32), (SHAPES[1], torch.float16)], ids=str)
@pytest.mark.parametrize("tile", OFFERED)
def test_every_offered_tile_matches_the_reference(tile, shape, dtype):
    n, c, h, w, out_c, k, stride = shape
    x, weight, norm_input = _problem(shape, dtype, normalise_input=k == 3)
    cfg = _TileConfig.from_name(tile)
    ref_shape = conv_stats_reference(x, weight, stride, k // 2, norm_input)[0].shape
    out = _channels_last(torch.empty(ref_shape, device=DEVICE, dtype=dtype))
    mean_part, m2_part, rows = conv_stats_fwd(
        x, weight.permute(0, 2, 3, 1).contiguous(), out, (stride, stride), (k // 2, k // 2), norm_input,
        interpreted=DEVICE == "cpu", tile=cfg,
    )
    m = out.numel() // out_c
    # One partial per row block of the chosen tile: the merge must use its BLOCK_M.
    assert rows == cfg.block_m and mean_part.shape == (triton.cdiv(m, cfg.block_m), out_c)
    stats = finalize_stats(mean_part, m2_part, m, rows, EPS)
    _check_against_reference(x, weight, stride, k // 2, norm_input, out, stats)


def _backward_problem(shape, dtype):
    """x (raw), weight, norm_input (x's own batch statistics and an affine), grad_y; and eager's
    grad_w and grad_a = dgrad(grad_y) * relu mask, in fp64 from the same values."""
    n, c, h, w, out_c, k, stride = shape
    x, weight, norm = _problem(shape, dtype)
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
    norm = (mean, torch.rsqrt(var + EPS), norm[2], norm[3])
    scale, shift = (norm[1] * norm[2]).double(), (norm[3] - norm[0] * norm[1] * norm[2]).double()
    a = torch.relu(x.double() * scale[:, None, None] + shift[:, None, None]).requires_grad_()
    w = weight.double().requires_grad_()
    y = torch.nn.functional.conv2d(a, w, None, stride, k // 2)
    grad_y = _channels_last(torch.randn(y.shape, device=DEVICE).to(dtype))
    grad_a, grad_w = torch.autograd.grad(y, [a, w], grad_y.double())
    return x, weight, norm, grad_y, grad_w, grad_a * (a > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tile", _names(_WGRAD_TILES))
def test_every_offered_wgrad_tile_matches_eager(tile, dtype):
    shape = (2, 20, 7, 7, 24, 3, 2)  # strided 3x3, odd sizes, channels not multiples of 16
    x, weight, norm, grad_y, grad_w, _ = _backward_problem(shape, dtype)
    packed = conv_wgrad(grad_y, x, 24, (3, 3), (2, 2), (1, 1), norm, DEVICE == "cpu",
                        tile=_TileConfig.from_name(tile))
    atol, rtol = CONV_TOL[dtype]
    scale = grad_w.abs().max().item()
    assert_close(packed.permute(0, 3, 1, 2).double() / scale, grad_w / scale, atol=atol, rtol=rtol, name="grad_w")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tile", _names(_DGRAD_TILES))
def test_every_offered_dgrad_tile_matches_eager(tile, dtype):
    shape = (2, 20, 9, 9, 24, 3, 1)  # 162 input pixels: 3 row blocks of 64, the last short
    x, weight, norm, grad_y, _, grad_a = _backward_problem(shape, dtype)
    cfg = _TileConfig.from_name(tile)
    g, sum_g_part, sum_gx_part = conv_dgrad_bn(grad_y, weight, x, (1, 1), norm, DEVICE == "cpu", tile=cfg)
    assert sum_g_part.shape == (triton.cdiv(162, cfg.block_m), 20)  # partials per row block of the tile
    atol, rtol = CONV_TOL[dtype]
    scale = grad_a.abs().max().item()
    assert_close(g.double() / scale, grad_a / scale, atol=atol, rtol=rtol, name="g")
    xc = x.double() - norm[0].double()[:, None, None]
    # The sums describe g as stored: compare with the sums of the stored g.
    assert_close(sum_g_part.sum(0).double(), g.double().sum((0, 2, 3)), atol=1e-3, rtol=1e-4, name="sum g")
    assert_close(sum_gx_part.sum(0).double(), (g.double() * xc).sum((0, 2, 3)), atol=1e-3, rtol=1e-4,
                 name="sum g (x - mean)")


# ---------------------------------------------------------------------------
# The candidates and the choice, on a fake H100
# ---------------------------------------------------------------------------


def _fake_gpu(monkeypatch, major=9, shared=227 * 1024):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    props = types.SimpleNamespace(shared_memory_per_block_optin=shared, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


def test_candidates_per_shape_class(monkeypatch):
    _fake_gpu(monkeypatch)
    # ResNet-50 layer1 3x3 at batch 256: the fixed rule's 128x64x64w4s4 first, then the narrow list.
    narrow = [t.name for t in _stats_tile_candidates(256 * 56 * 56, 64, 64, 2, "cuda")]
    assert narrow == ["128x64x64w4s4", "128x64x64w8s4", "64x64x64w4s4", "128x64x32w4s4"]
    wide = [t.name for t in _stats_tile_candidates(256 * 14 * 14, 1024, 256, 2, "cuda")]
    assert wide == ["128x128x64w8s4", "64x128x64w4s4", "64x256x64w8s4", "128x128x64w8s3"]
    # 128 channels: no 256-wide tile (half of it masked); a small problem's fixed rule is 64 tall.
    small = [t.name for t in _stats_tile_candidates(64 * 64, 128, 128, 2, "cuda")]
    assert small == ["64x128x64w4s4", "128x128x64w8s4", "128x128x64w8s3"]
    # fp32 operands: half the K step (the same bytes); 20 input channels: K steps of 32.
    assert all(t.block_k == 32 for t in _stats_tile_candidates(256 * 196, 1024, 256, 4, "cuda"))
    assert all(t.block_k <= 32 for t in _stats_tile_candidates(4096, 64, 20, 2, "cuda"))
    for m, out_c, in_c in ((10**6, 64, 64), (10**6, 512, 2048), (500, 72, 20)):
        tiles = _stats_tile_candidates(m, out_c, in_c, 2, "cuda")
        assert 1 <= len(tiles) <= MAX_STATS_TILES and len(set(tiles)) == len(tiles)


def test_backward_candidates_per_shape(monkeypatch):
    _fake_gpu(monkeypatch)
    # ResNet-50 layer3 3x3 (256 -> 256) at batch 256: the fixed rules first, at most three each.
    wgrad = [t.name for t in _wgrad_tile_candidates(256 * 14 * 14, 256, 256, 2, "cuda")]
    assert wgrad == ["128x128x64w8s4", "128x128x128w8s3", "64x128x64w4s4"]
    dgrad = [t.name for t in _dgrad_tile_candidates(256 * 14 * 14, 256, 256, 2, True, "cuda")]
    assert dgrad == ["128x64x64w8s4", "128x64x64w4s4", "64x128x64w4s4"]
    plain = [t.name for t in _dgrad_tile_candidates(256 * 14 * 14, 256, 256, 2, False, "cuda")]
    assert plain == ["128x128x64w8s4", "64x128x64w4s4", "128x128x64w8s3"]
    # 64 channels (layer1): nothing wider than 64 columns; fp32 halves the K steps.
    assert [t.name for t in _wgrad_tile_candidates(256 * 56 * 56, 64, 64, 4, "cuda")] == [
        "64x64x32w4s4", "64x64x64w4s3"]
    narrow = _dgrad_tile_candidates(256 * 56 * 56, 64, 64, 2, True, "cuda")
    assert all(t.block_n == 64 for t in narrow) and len(narrow) <= 3
    assert [t.name for t in _dgrad_tile_candidates(256 * 56 * 56, 64, 256, 2, False, "cuda")] == [
        "128x64x64w4s4", "64x64x64w4s4"]


def test_candidates_before_hopper_fit_its_pipeline_and_shared_memory(monkeypatch):
    _fake_gpu(monkeypatch, major=8, shared=99 * 1024)
    tiles = _stats_tile_candidates(256 * 14 * 14, 1024, 256, 2, "cuda")
    assert tiles and all(t.num_stages <= 3 and t.shared_bytes(2) <= 99 * 1024 for t in tiles)


class _FakeTimer:
    """dispatch.measure with made-up times (the second candidate wins); runs every candidate once."""

    def __init__(self):
        self.calls = []

    def __call__(self, candidates, device):
        self.calls.append(list(candidates))
        times = {}
        for i, (name, fn) in enumerate(candidates.items()):
            fn()
            times[name] = 1.0 if i == 1 else 2.0 + i
        return times


@pytest.fixture
def fake_measurement(monkeypatch, tmp_path):
    """A CPU that conv_train_tiles believes it can measure on: fake H100 properties, a fake timer,
    a private disk cache."""
    _fake_gpu(monkeypatch)
    monkeypatch.setattr(conv_train_tiles, "_measurable", lambda x: True)
    monkeypatch.setenv(dispatch.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(dispatch.DISPATCH_ENV, raising=False)
    timer = _FakeTimer()
    monkeypatch.setattr(dispatch, "measure", timer)
    return timer


def _conv_stats(x, weight, norm_input, stride=1, padding=1):
    return conv_stats(x, weight, stride, padding, EPS, norm_input)


@pytest.mark.skipif(DEVICE == "cuda", reason="the fake timer stands in for a GPU")
def test_the_measured_tile_is_chosen_cached_and_runs(fake_measurement):
    shape = (2, 20, 9, 9, 72, 1, 1)
    x, weight, norm_input = _problem(shape, torch.float32)
    y, *stats = _conv_stats(x, weight, norm_input, padding=0)
    # 162 rows: the small-problem rule first; fp32 and 20 channels: K steps of 32
    names = ["triton:" + n for n in ("64x128x32w4s4", "128x128x32w8s4", "128x128x32w8s3")]
    assert fake_measurement.calls == [names]
    key = conv_train_tiles.stats_problem_key(x, weight.permute(0, 2, 3, 1), (1, 1), (0, 0), True)
    assert key == "conv_stats_tile:72x20k1x1s1x1p0x0:x2x20x9x9:float32:norm1:cl"
    entry = dispatch.decision(key)
    assert entry["choice"] == names[1] and entry["source"] == "measured" and set(entry["times_ms"]) == set(names)
    _check_against_reference(x, weight, 1, 0, norm_input, y, stats)  # the op ran the chosen tile
    _conv_stats(x, weight, norm_input, padding=0)  # the same problem again: the in-process choice, no timing
    assert len(fake_measurement.calls) == 1
    conv_train_tiles.clear_choices()
    dispatch.clear_memory()
    _conv_stats(x, weight, norm_input, padding=0)  # a new process: the disk cache, no timing
    assert len(fake_measurement.calls) == 1 and dispatch.decision(key)["source"] == "disk cache"
    _conv_stats(x, weight, None, padding=0)  # without the prologue: another problem
    assert len(fake_measurement.calls) == 2


@pytest.mark.skipif(DEVICE == "cuda", reason="the fake timer stands in for a GPU")
def test_the_switches_override_measurement(fake_measurement, monkeypatch):
    x, weight, norm_input = _problem((2, 20, 9, 9, 72, 3, 1), torch.float32)
    packed = weight.permute(0, 2, 3, 1).contiguous()
    out = _channels_last(torch.empty(2, 72, 9, 9))
    choose = lambda: conv_train_tiles.choose_stats_tile(x, packed, out, (1, 1), (1, 1), norm_input, EPS)  # noqa: E731
    for mode in ("fixed", "triton", "eager", "triton_bwd"):  # fixed, or other ops' candidates: the fixed rule
        dispatch.set_dispatch_mode(mode)
        assert choose() is None
    dispatch.set_dispatch_mode("triton:128x128x32w8s3")  # a tile this problem offers
    assert choose() == "triton:128x128x32w8s3"
    dispatch.set_dispatch_mode("triton:64x256x32w8s4")  # one it does not (72 channels): the fixed rule
    assert choose() is None
    assert fake_measurement.calls == []
    monkeypatch.setattr(conv_train_tiles, "_measurable", lambda x: False)  # the CPU as it is
    dispatch.set_dispatch_mode(None)
    assert choose() is None and fake_measurement.calls == []


@pytest.mark.skipif(DEVICE == "cuda", reason="the fake timer stands in for a GPU")
def test_the_backward_tiles_are_measured_in_a_second_step(fake_measurement):
    """conv_stats' Triton backward chooses its wgrad and dgrad tiles (two more keys), runs them, and
    gives eager's gradients."""
    shape = (2, 20, 9, 9, 72, 1, 1)
    x, weight, norm, grad_y, grad_w, grad_a = _backward_problem(shape, torch.float32)
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    y, *_ = conv_stats(leaves[0], leaves[1], 1, 0, EPS, norm, backward="triton_bwd")
    y.backward(grad_y)
    keys = sorted(d["key"].split(":")[0] for d in dispatch.decisions())
    assert keys == ["conv_dgrad_tile", "conv_stats_tile", "conv_wgrad_tile"], keys
    wgrad = next(d for d in dispatch.decisions() if d["key"].startswith("conv_wgrad_tile"))
    assert wgrad["key"] == "conv_wgrad_tile:72x20k1x1s1x1p0x0:x2x20x9x9:float32:norm1:cl"
    assert wgrad["choice"] == list(wgrad["times_ms"])[1] and wgrad["choice"].startswith("wgrad:")
    scale = grad_w.abs().max().item()
    assert_close(leaves[1].grad.double() / scale, grad_w / scale, atol=1e-3, rtol=1e-3, name="grad_w")
    calls = len(fake_measurement.calls)
    y, *_ = conv_stats(leaves[0], leaves[1], 1, 0, EPS, norm, backward="triton_bwd")
    y.backward(grad_y)
    assert len(fake_measurement.calls) == calls  # chosen once per problem


# ---------------------------------------------------------------------------
# GPU: the tiles timed for real
# ---------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(32, 64, 56, 56, 64, 3, 1), (32, 256, 28, 28, 512, 1, 1)], ids=str)
def test_gpu_tiles_are_measured_and_the_choice_recorded(shape, monkeypatch, tmp_path):
    monkeypatch.setenv(dispatch.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(dispatch.DISPATCH_ENV, raising=False)
    n, c, h, w, out_c, k, stride = shape
    x, weight, norm_input = _problem(shape, torch.bfloat16)
    y, *stats = _conv_stats(x, weight, norm_input, stride, k // 2)
    key = conv_train_tiles.stats_problem_key(x, weight.permute(0, 2, 3, 1), (stride, stride), (k // 2, k // 2), True)
    entry = dispatch.decision(key)
    out = torch.empty_like(y)
    names = conv_train_tiles.stats_tile_names(x, weight.permute(0, 2, 3, 1), out)
    assert entry is not None and entry["source"] == "measured", dispatch.decisions()
    assert set(entry["times_ms"]) == set(names) and entry["choice"] in names, entry  # every tile ran
    own_var, own_mean = torch.var_mean(y.float(), dim=(0, 2, 3), unbiased=False)
    assert_close(stats[0], own_mean, atol=1e-3, rtol=1e-3, name="mean")
    assert_close(stats[1], torch.rsqrt(own_var + EPS), atol=1e-3, rtol=1e-3, name="invstd")
    ref = conv_stats_reference(x.float(), weight.float(), stride, k // 2, norm_input)[0]
    assert_close(y.float(), ref, atol=6e-2, rtol=6e-2, name="raw output")


@pytest.mark.cuda
def test_gpu_backward_tiles_are_measured_and_recorded(monkeypatch, tmp_path):
    """conv_stats' Triton backward at a ResNet-50 layer2 3x3 (bf16): the wgrad and dgrad tiles timed
    (every candidate ran) and the gradients as eager's within bf16's tolerance."""
    monkeypatch.setenv(dispatch.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(dispatch.DISPATCH_ENV, raising=False)
    shape = (16, 128, 28, 28, 128, 3, 1)
    x, weight, norm, grad_y, grad_w, grad_a = _backward_problem(shape, torch.bfloat16)
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    y, *_ = conv_stats(leaves[0], leaves[1], 1, 1, EPS, norm, backward="triton_bwd")
    y.backward(grad_y)
    for kind, names in (("wgrad", conv_train_tiles.wgrad_tile_names(grad_y, x, 128)),
                        ("dgrad", conv_train_tiles.dgrad_tile_names(x, weight, True))):
        entries = [d for d in dispatch.decisions() if d["key"].startswith(f"conv_{kind}_tile:")]
        assert len(entries) == 1 and entries[0]["source"] == "measured", dispatch.decisions()
        assert set(entries[0]["times_ms"]) == set(names) and entries[0]["choice"] in names, entries
    scale = grad_w.abs().max().item()
    assert_close(leaves[1].grad.double() / scale, grad_w / scale, atol=6e-2, rtol=6e-2, name="grad_w")


@pytest.mark.skipif(DEVICE == "cuda", reason="the fake timer stands in for a GPU")
def test_tiles_fixed_switch_times_no_tile_and_runs_the_rule(fake_measurement, monkeypatch):
    monkeypatch.setenv(dispatch.TILES_ENV, "fixed")
    x, weight, norm_input = _problem((2, 20, 9, 9, 72, 1, 1), torch.float32)
    y, *stats = _conv_stats(x, weight, norm_input, padding=0)
    assert fake_measurement.calls == []  # no tile was timed
    _check_against_reference(x, weight, 1, 0, norm_input, y, stats)


def test_tiles_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv(dispatch.TILES_ENV, "fast")
    with pytest.raises(ValueError, match="FASTRESNET_TILES='fast'"):
        dispatch.tile_search()
    monkeypatch.setenv(dispatch.TILES_ENV, "search")
    assert dispatch.tile_search()
