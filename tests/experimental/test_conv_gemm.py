"""The 1x1 TMA GEMM conv (kernels/experimental/conv_gemm.py) against the reference, its tiles and when the
dispatch offers it.

On the CPU the kernel itself runs through Triton's interpreter, which executes
tensor descriptors (loads zero-filled past the edges, stores clipped): small
shapes with ragged M, Cout and C, every epilogue, fp32/fp16/bf16, and a
persistent grid of fewer programs than tiles. Whether it compiles to TMA +
wgmma for sm_90 is tests/compile_conv_gemm_for_hopper.py's (test_hopper_compile).
"""

import functools
import math
import types

import pytest
import torch

from fastresnet.experimental import conv_bn_act as shelf
from fastresnet.experimental.conv_bn_act import _gemm_applies, _pixel_rows, _triton_gemm, implementation
from fastresnet.ops import conv_bn_act as conv_ops
from fastresnet.ops import tuning
from fastresnet.reference import conv_bn_act_reference
from fastresnet.testing import assert_close

# Kernel and reference accumulate in fp32; the outputs differ by the output's rounding.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2e-2)}
CL = torch.channels_last


def _problem(batch, cin, cout, h, w, dtype, residual, device="cpu"):
    x = torch.randn(batch, cin, h, w).to(dtype).contiguous(memory_format=CL)
    weight = (torch.randn(cout, cin, 1, 1) / math.sqrt(cin)).to(dtype)
    scale, shift = torch.rand(cout) + 0.5, torch.randn(cout) * 0.5
    res = torch.randn(batch, cout, h, w).to(dtype).contiguous(memory_format=CL) if residual else None
    moved = [t if t is None else t.to(device) for t in (x, weight, scale, shift, res)]
    return moved


def _expected(x, weight, scale, shift, res, relu):
    r = None if res is None else res.float()
    return conv_bn_act_reference(x.float(), weight.float(), scale, shift, 1, 0, r, relu).to(x.dtype)


def _supports(x, weight, res, stride=1, padding=0, groups=1) -> bool:
    return _gemm_applies(x, weight, res, (stride, stride), (padding, padding), (1, 1), groups)


def _gemm(x, weight, scale, shift, res, relu, tile=None):
    """The TMA GEMM candidate as the op's body calls it (tile None: the interpreter's)."""
    return _triton_gemm(tile, x, weight, scale, shift, res, [1, 1], [0, 0], [1, 1], 1, relu)


def _names(x, weight, res) -> list[str]:
    return shelf.triton_gemm_names(x, weight, res, (1, 1), (0, 0), (1, 1), 1)


def _candidates(x, weight, res) -> list[str]:
    """Every candidate the tuner would offer conv_bn_act for this 1x1 conv, the shelf's included."""
    return conv_ops.CONV_BN_ACT._applying((x, weight, res, (1, 1), (0, 0), (1, 1), 1), True)


def _choose(x, weight, scale, shift, res):
    """conv_bn_act's choice for this problem (the op then runs it)."""
    with torch.no_grad():
        conv_ops.conv_bn_act(x, weight, None, 1, 0, scale=scale, shift=shift, residual=res)


# (batch, cin, cout, h, w): M = 70 and 45 are ragged for the interpreter's 64-row tile, Cout = 80 and
# 48 for its 64-wide one, C = 48 for its 32-deep K step; one problem fits a single tile
SHAPES = [(2, 48, 80, 5, 7), (1, 32, 48, 5, 9), (1, 16, 16, 2, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual,relu", [(False, False), (False, True), (True, False), (True, True)],
                         ids=["plain", "relu", "res", "res_relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_kernel_matches_reference(shape, residual, relu, dtype):
    x, weight, scale, shift, res = _problem(*shape, dtype, residual)
    assert _supports(x, weight, res)
    out = _gemm(x, weight, scale, shift, res, relu)
    atol, rtol = TOL[dtype]
    assert_close(out, _expected(x, weight, scale, shift, res, relu), atol=atol, rtol=rtol)
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("num_programs", [1, 3, 64], ids=["one", "three", "more_than_tiles"])
def test_persistent_loop_covers_every_tile(num_programs):
    """Fewer programs than tiles walk the tile list in strides; more are clamped to the tile count."""
    from fastresnet.kernels.conv import _TileConfig
    from fastresnet.kernels.experimental.conv_gemm import _launch_conv1x1_gemm

    x, weight, scale, shift, res = _problem(2, 32, 48, 6, 5, torch.float16, True)
    out = torch.full((2, 48, 6, 5), float("nan"), dtype=torch.float16).contiguous(memory_format=CL)
    tile = _TileConfig(16, 16, 16, 2, 4, 1)  # 4 x 3 tiles in grouped order, 2 K steps each
    _launch_conv1x1_gemm(_pixel_rows(x), weight.view(48, 32), scale, shift, _pixel_rows(res), _pixel_rows(out),
                         True, tile, num_programs)
    assert_close(out, _expected(x, weight, scale, shift, res, True), atol=4e-3, rtol=4e-3)


def test_gemm_applies_only_to_tma_ready_pointwise_convs():
    x, weight, scale, shift, res = _problem(2, 32, 48, 4, 5, torch.float16, True)
    assert _supports(x, weight, res) and _supports(x, weight, None)
    assert not _supports(x.contiguous(), weight, None)  # NCHW: no [N*H*W, C] view
    assert not _supports(x, weight, res.contiguous())  # an NCHW residual
    assert not _supports(x, weight, None, stride=2)
    assert not _supports(x, weight, None, padding=1)
    w3 = torch.randn(48, 32, 3, 3).half()
    assert not _supports(x, w3, None, padding=1)
    wg = torch.randn(48, 16, 1, 1).half()
    assert not _supports(x, wg, None, groups=2)
    x24, w24, s24, b24, _ = _problem(2, 24, 48, 4, 5, torch.float16, False)  # C = 24: rows not 16-aligned
    assert not _supports(x24, w24, None)
    x40, w40, s40, b40, _ = _problem(2, 32, 40, 4, 5, torch.float16, False)  # Cout = 40
    assert not _supports(x40, w40, None)
    shifted = torch.empty(2 * 32 * 4 * 5 + 4, dtype=torch.float16)[4:].view(2, 4, 5, 32).permute(0, 3, 1, 2)
    assert shifted.is_contiguous(memory_format=CL) and not _supports(shifted, weight, None)  # base 8 B off
    assert not _supports(x.double(), weight.double(), None)


# ---------------------------------------------------------------------------
# The dispatch's candidates on an (emulated) Hopper GPU
# ---------------------------------------------------------------------------


@pytest.fixture
def hopper(monkeypatch):
    """Let the tile lists see an H100 (sm_90, 227 KB shared memory per block, 132 SMs) on this CPU."""
    props = types.SimpleNamespace(shared_memory_per_block_optin=227 * 1024, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    return props


# ResNet-50's 1x1 stride-1 convs at 224x224: (cin, cout, residual, size); (64, 256) without a residual is
# layer1's downsample, the others are conv1s (no residual) and conv3s (residual)
RESNET50_POINTWISE = [(64, 64, False, 56), (64, 256, True, 56), (64, 256, False, 56), (256, 64, False, 56),
                      (256, 128, False, 56), (128, 512, True, 28), (512, 128, False, 28), (512, 256, False, 28),
                      (256, 1024, True, 14), (1024, 256, False, 14), (1024, 512, False, 14), (512, 2048, True, 7),
                      (2048, 512, False, 7)]


def _conv_id(conv) -> str:
    return f"{conv[0]}to{conv[1]}{'_res' if conv[2] else ''}@{conv[3]}"


@pytest.mark.parametrize("conv", RESNET50_POINTWISE, ids=_conv_id)
def test_gemm_tile_candidates_for_resnet50(hopper, conv):
    from fastresnet.kernels.conv import _TileConfig
    from fastresnet.kernels.experimental.conv_gemm import (
        _GEMM_TILES, _gemm_shape_class, _gemm_shared_bytes, _gemm_tile_candidates,
    )

    cin, cout, residual, _ = conv
    tiles = _gemm_tile_candidates(cout, cin, residual, 2, "cuda")
    assert 2 <= len(tiles) <= 4 and len(set(tiles)) == len(tiles)
    listed = {(t.block_m, t.block_n, t.block_k, t.num_warps, t.num_stages) for t in tiles}
    assert listed <= set(_GEMM_TILES[_gemm_shape_class(cout, residual)])  # compiled by compile_conv_gemm_for_hopper
    for tile in tiles:
        assert tile.block_n <= max(64, cout) and tile.block_k <= cin
        assert _gemm_shared_bytes(tile, 2, residual) <= hopper.shared_memory_per_block_optin
        assert _TileConfig.from_name(tile.name, group_m=tile.group_m) == tile


def test_gemm_tiles_follow_the_device(hopper):
    from fastresnet.kernels.experimental.conv_gemm import _gemm_shared_bytes, _gemm_tile_candidates

    assert all(t.block_k == 32 for t in _gemm_tile_candidates(128, 32, False, 2, "cuda"))  # K steps no deeper than C
    full = _gemm_tile_candidates(1024, 256, True, 2, "cuda")
    hopper.shared_memory_per_block_optin = 160 * 1024  # a smaller part: the deep or wide tiles drop out
    small = _gemm_tile_candidates(1024, 256, True, 2, "cuda")
    assert small and all(_gemm_shared_bytes(t, 2, True) <= 160 * 1024 for t in small) and len(small) < len(full)


@pytest.fixture
def posing_as_hopper(hopper, monkeypatch):
    """CPU tensors that say they are on CUDA, an H100's properties and Triton present: what the candidate
    lists read (shapes, layout, dtype, the device), not a GPU to run on."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr("fastresnet.backend.triton_available", lambda: True)


REAL_MEASURE = tuning.measure


@pytest.fixture
def captured(posing_as_hopper, monkeypatch):
    """The candidates the conv_bn_act tuner would time, wrapped as on a GPU: tuning.measure records them
    (in the dict returned) and times none (the first wins)."""
    candidates = {}

    def record(named, device):
        candidates.update(named)
        return {"cudnn_affine" if "cudnn_affine" in named else next(iter(named)): 1.0}  # one the CPU can run

    monkeypatch.setattr(tuning, "can_measure", lambda device: True)
    monkeypatch.setattr(tuning, "measure", record)
    monkeypatch.setattr(tuning, "_remember_on_disk", lambda *args: None)  # after tuning.clear(), times anew
    return candidates


def test_dispatch_offers_gemm_tiles_only_where_they_apply(posing_as_hopper, monkeypatch):
    """On a CUDA tensor (emulated: the candidate list reads only shapes, layout, dtype and the device), the
    1x1 channels_last bf16 conv gets "triton_gemm:<tile>" candidates beside the others; fp32 and a
    pre-Hopper GPU do not."""
    x, weight, scale, shift, res = _problem(2, 64, 256, 4, 4, torch.bfloat16, True)
    names = _candidates(x, weight, res)
    gemm = [n for n in names if n.startswith("triton_gemm:")]
    assert gemm == _names(x, weight, res) and 2 <= len(gemm) <= 4
    assert "cudnn_fused" in names and any(n.startswith("triton:") for n in names)
    assert all(callable(conv_ops.EXPERIMENTAL[n]) for n in gemm)
    x32, w32, s32, b32, _ = _problem(2, 64, 256, 4, 4, torch.float32, False)
    assert not any(n.startswith("triton_gemm:") for n in _candidates(x32, w32, None))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not any(n.startswith("triton_gemm:") for n in _candidates(x, weight, res))


def _wrong_reference(monkeypatch, wrong):
    """A reference no candidate can match, for the checks made from now on (fresh checked candidates, which
    the test's end forgets)."""
    monkeypatch.setattr(shelf, "_reference", lambda *args: wrong)
    monkeypatch.setattr(conv_ops, "EXPERIMENTAL", {})
    monkeypatch.setattr(shelf, "implementation", functools.lru_cache(maxsize=None)(shelf.implementation.__wrapped__))
    monkeypatch.setitem(conv_ops.EXPERIMENTAL, "cublaslt_fused", shelf.implementation("cublaslt_fused"))


def test_dispatch_leaves_out_a_gemm_candidate_that_computes_wrong(captured, monkeypatch):
    """The TMA GEMM's candidates have never run on a GPU: the first (untimed) call of each is compared with
    the reference conv, and one that is off warns and raises, which the dispatch's measurement skips."""
    x, weight, scale, shift, res = _problem(1, 32, 128, 3, 5, torch.float16, True)
    _choose(x, weight, scale, shift, res)
    name = next(n for n in captured if n.startswith("triton_gemm:"))
    cpu = torch.device("cpu")
    monkeypatch.setattr(tuning, "time_ms", lambda fn, device: [fn() for _ in range(2)] and 1.0)
    assert list(REAL_MEASURE({name: captured[name]}, cpu)) == [name]  # the kernel matches the reference
    _wrong_reference(monkeypatch, _expected(x, weight, scale, shift, res, True) * 1.1)
    tuning.clear()
    captured.clear()
    _choose(x, weight, scale, shift, res)  # fresh candidates, checked against that
    with pytest.warns(RuntimeWarning, match=f"candidate {name} is off the reference"):
        assert REAL_MEASURE({name: captured[name]}, cpu) == {}


def test_gemm_candidate_keeps_a_residual_it_cannot_view_as_rows():
    """The dispatch's choice is kept per problem; a later call with an NCHW residual (no [M, Cout] view)
    or an x that starts off 16-byte alignment must still compute the conv with its residual: the
    implicit-GEMM kernel takes over (the residual is never dropped, and TMA is never handed such a pointer)."""
    x, weight, scale, shift, res = _problem(1, 32, 48, 5, 9, torch.float16, True)
    nchw_res = res.contiguous()
    out = _gemm(x, weight, scale, shift, nchw_res, True)
    assert_close(out, _expected(x, weight, scale, shift, res, True), atol=4e-3, rtol=4e-3, name="nchw residual")
    storage = torch.empty(x.numel() + 1, dtype=x.dtype)
    shifted = storage[1:].view(1, 5, 9, 32).permute(0, 3, 1, 2)  # channels_last, 2 bytes off alignment
    shifted.copy_(x)
    assert shifted.data_ptr() % 16 != 0
    out = _gemm(shifted, weight, scale, shift, res, True)
    assert_close(out, _expected(x, weight, scale, shift, res, True), atol=4e-3, rtol=4e-3, name="unaligned x")


def test_every_unverified_candidate_is_checked_against_the_reference(captured, monkeypatch):
    """The per-tile Triton kernels and cuBLASLt's path have not run on a GPU either: their first call is
    compared with the reference like the TMA GEMM's; cuDNN's candidates and the default tile, which have,
    are the op's own (no check)."""
    x, weight, scale, shift, _ = _problem(1, 32, 128, 3, 5, torch.float16, False)
    _choose(x, weight, scale, shift, None)
    unverified = [n for n in captured if n.startswith(("triton:", "triton_gemm:")) or n == "cublaslt_fused"]
    assert "cublaslt_fused" in unverified and any(n.startswith("triton:") for n in unverified)
    checked = {n for n, fn in conv_ops.EXPERIMENTAL.items() if fn.__name__ == "call"}  # common.checked's
    assert set(unverified) <= checked and not checked & {"triton", "cudnn_fused", "cudnn_affine"}
    assert "triton" in captured
    _wrong_reference(monkeypatch, _expected(x, weight, scale, shift, None, True) * 1.1)
    captured.clear()
    tuning.clear()
    _choose(x, weight, scale, shift, None)
    monkeypatch.setattr(tuning, "time_ms", lambda fn, device: [fn() for _ in range(2)] and 1.0)
    with pytest.warns(RuntimeWarning, match="candidate cublaslt_fused is off the reference"):
        assert REAL_MEASURE({"cublaslt_fused": captured["cublaslt_fused"]}, torch.device("cpu")) == {}


def test_gemm_tile_names_are_checked():
    with pytest.raises(ValueError, match="BMxBNxBK"):
        implementation("triton_gemm:128x128")


@pytest.mark.parametrize("name", ["triton_gemm:64x64x32w4s4", "triton_gemm:16x16x16w4s3"])
def test_gemm_candidate_by_name_computes_the_conv(name):
    """A named tile (what the dispatch times) runs through the interpreter too: tiles change only loop bounds."""
    x, weight, scale, shift, res = _problem(1, 32, 48, 5, 9, torch.float16, True)
    out = implementation(name)(x, weight, scale, shift, res, [1, 1], [0, 0], [1, 1], 1, True)
    assert_close(out, _expected(x, weight, scale, shift, res, True), atol=4e-3, rtol=4e-3, name=name)


# ---------------------------------------------------------------------------
# GPU (bench/gpu_check.sh): every tile on ResNet-50's 1x1 shapes at a small batch
# ---------------------------------------------------------------------------


def _hopper_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.cuda
@pytest.mark.skipif(not _hopper_gpu(), reason="TMA needs sm_90+")
@pytest.mark.parametrize("conv", RESNET50_POINTWISE, ids=_conv_id)
def test_every_gemm_tile_on_gpu(conv):
    """Every "triton_gemm:<tile>" the dispatch may time compiles, launches and matches the reference
    (bf16, batch 4 at the conv's ResNet-50 resolution; fp16 once on the first tile)."""
    cin, cout, residual, size = conv
    for dtype in (torch.bfloat16, torch.float16):
        x, weight, scale, shift, res = _problem(4, cin, cout, size, size, dtype, residual, device="cuda")
        assert _supports(x, weight, res)
        names = _names(x, weight, res)
        assert 2 <= len(names) <= 4
        with torch.no_grad():
            expected = _expected(x, weight, scale, shift, res, True)
            for name in names if dtype == torch.bfloat16 else names[:1]:
                out = implementation(name)(x, weight, scale, shift, res, [1, 1], [0, 0], [1, 1], 1, True)
                assert_close(out, expected, atol=6e-2, rtol=3e-2, name=f"{name} {dtype}")
                assert out.is_contiguous(memory_format=CL)


@pytest.mark.cuda
@pytest.mark.skipif(not _hopper_gpu(), reason="TMA needs sm_90+")
@pytest.mark.parametrize("residual", [True, False], ids=["conv3_res", "conv1"])
def test_dispatch_times_every_gemm_tile_on_gpu(tmp_path, monkeypatch, residual):
    """The measured dispatch times each "triton_gemm:<tile>" beside cuDNN and the implicit GEMM; none is
    left out by the first-call check against the reference (its warning would say which) or a failure."""
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTRESNET_DISPATCH", raising=False)
    tuning.clear()
    x, weight, scale, shift, res = _problem(8, 128, 512, 28, 28, torch.bfloat16, residual, device="cuda")
    with torch.no_grad():
        out = conv_ops.conv_bn_act(x, weight, None, 1, 0, scale=scale, shift=shift, residual=res)
    (decision,) = tuning.decisions()
    timed = [name for name in decision["times_ms"] if name.startswith("triton_gemm:")]
    assert sorted(timed) == sorted(_names(x, weight, res)), decision
    assert_close(out, _expected(x, weight, scale, shift, res, True), atol=6e-2, rtol=3e-2, name=decision["choice"])
