"""The experimental shelf's conv_bn_act candidates (fastresnet.experimental.conv_bn_act): the Triton kernel's
other tiles and cuBLASLt's 1x1 GEMM (the TMA GEMM: test_conv_gemm.py), each against the reference."""

import types

import pytest
import torch
from test_conv_bn_act import DTYPES, KERNEL_TOL, _expected, _problem, check_dispatch_measures_on_gpu

from fastresnet.experimental.conv_bn_act import _cublaslt_applies, implementation, triton_tile_names
from fastresnet.kernels.conv import _tile_config, _TileConfig, _uses_flat_k
from fastresnet.kernels.experimental.tiles import _HOPPER_TILES, _shape_class, _tile_candidates
from fastresnet.testing import assert_close


@pytest.fixture
def hopper(monkeypatch):
    """Let the tile lists see an H100 (sm_90, 227 KB shared memory per block) on this CPU."""
    props = types.SimpleNamespace(shared_memory_per_block_optin=227 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    return props


def _tiles_for(cin, cout, k, stride, size, residual, itemsize=2, batch=256):
    out = (size + 2 * (k // 2) - k) // stride + 1
    m = batch * out * out
    return _tile_candidates(m, cout, cin, _uses_flat_k(cin), residual, itemsize, "cuda")


def _args(x, weight, res, stride=1, pad=0, dil=1, groups=1):
    """What the op's body and the candidate lists take, after the conv's arguments."""
    return x, weight, res, (stride, stride), (pad, pad), (dil, dil), groups


def _run(name, x, weight, scale, shift, res, stride=1, pad=0, dil=1, relu=True):
    return implementation(name)(x, weight, scale, shift, res, [stride] * 2, [pad] * 2, [dil] * 2, 1, relu)


# ResNet-50 convs of every shape class: (cin, cout, kernel, stride, padding, input size)
TILE_CONVS = [(3, 64, 7, 2, 3, 224), (64, 64, 3, 1, 1, 56), (256, 64, 1, 1, 0, 56), (256, 512, 1, 2, 0, 56),
              (512, 2048, 1, 1, 0, 7), (512, 512, 3, 1, 1, 7), (128, 128, 3, 2, 1, 56)]


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "res"])
@pytest.mark.parametrize("conv", TILE_CONVS, ids=lambda c: "x".join(map(str, c)))
def test_tile_candidates_per_shape_class(hopper, conv, residual):
    cin, cout, k, stride, _, size = conv
    tiles = _tiles_for(cin, cout, k, stride, size, residual)
    out = (size + 2 * (k // 2) - k) // stride + 1
    default = _tile_config(256 * out * out, cout, cin, _uses_flat_k(cin), 2, False, "cuda")
    assert tiles[0] == default  # the tile that runs without measurement is always timed too
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


def test_tiles_default_switch_leaves_the_default_tile_alone(hopper, monkeypatch):
    """"triton" is the default tile (the main tree's), "triton:<tile>" each other one; FASTRESNET_TILES=default
    lets only the default compete."""
    x, weight, scale, shift, _ = _problem(64, 128, 3, 1, 1, 1, 8, 8, torch.float16)
    searched = triton_tile_names(*_args(x, weight, None, 1, 1))
    assert len(searched) > 0 and all(n.startswith("triton:") for n in searched)
    monkeypatch.setenv("FASTRESNET_TILES", "default")
    assert triton_tile_names(*_args(x, weight, None, 1, 1)) == []
    monkeypatch.setenv("FASTRESNET_TILES", "fixed")  # what the README first called it
    assert triton_tile_names(*_args(x, weight, None, 1, 1)) == []
    monkeypatch.setenv("FASTRESNET_TILES", "some")
    with pytest.raises(ValueError, match="FASTRESNET_TILES='some'"):
        triton_tile_names(*_args(x, weight, None, 1, 1))


def test_tile_names_are_checked():
    with pytest.raises(ValueError, match="BMxBNxBK"):
        _TileConfig.from_name("128x128w8")
    with pytest.raises(KeyError, match="no experimental implementation 'cudnn'"):
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
    names = triton_tile_names(*_args(x, weight, res, stride, pad, dil))
    assert names and all(n.startswith("triton:") for n in names)
    expected = _expected(x, weight, scale, shift, stride, pad, res, True, dil)
    for tile_name in names:
        out = _run(tile_name, x, weight, scale, shift, res, stride, pad, dil)
        assert_close(out, expected, atol=4e-3, rtol=4e-3, name=tile_name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_cublaslt_candidate_is_the_1x1_conv(dtype, relu):
    x, weight, scale, shift, _ = _problem(32, 48, 1, 1, 0, 1, 5, 7, dtype)
    assert _cublaslt_applies(*_args(x, weight, None))
    out = _run("cublaslt_fused", x, weight, scale, shift, None, relu=relu)
    assert out.shape == (2, 48, 5, 7) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)  # a view of the GEMM's [N*H*W, Cout] rows
    atol, rtol = KERNEL_TOL[dtype]
    assert_close(out, _expected(x, weight, scale, shift, 1, 0, None, relu, 1), atol=atol, rtol=rtol)


def test_cublaslt_candidate_only_where_it_is_a_gemm():
    x, weight, scale, shift, res = _problem(32, 48, 1, 1, 0, 1, 5, 7, torch.float32, residual=True)
    assert not _cublaslt_applies(*_args(x, weight, res))  # a residual: left to the one-kernel paths
    assert not _cublaslt_applies(*_args(x.contiguous(), weight, None))  # NCHW: no [N*H*W, C] view
    assert not _cublaslt_applies(*_args(x, weight, None, stride=2))
    x3, w3, *_ = _problem(32, 48, 3, 1, 1, 1, 5, 7, torch.float32)
    assert not _cublaslt_applies(*_args(x3, w3, None, pad=1))


@pytest.mark.cuda
@pytest.mark.parametrize("residual", [True, False], ids=["res", "plain"])
def test_dispatch_measures_every_candidate_on_gpu(tmp_path, monkeypatch, residual):
    """With the shelf's candidates: every other tile timed as its own candidate, and cuBLASLt's 1x1 GEMM
    where it applies (channels_last, no residual); each computes the same thing."""
    times = check_dispatch_measures_on_gpu(tmp_path, monkeypatch, residual)
    assert sum(name.startswith("triton:") for name in times) >= 1
    assert ("cublaslt_fused" in times) == (not residual)


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
    cin, cout, k, stride, pad, dil, h, w = conv
    assert _shape_class(cout, _uses_flat_k(cin), residual) == name
    x, weight, scale, shift, res = _problem(cin, cout, k, stride, pad, dil, h, w, torch.bfloat16, batch=8,
                                            residual=residual)
    x, weight, scale, shift = (t.cuda() for t in (x, weight, scale, shift))
    res = res.cuda() if residual else None
    expected = _expected(x, weight, scale, shift, stride, pad, res, True, dil)
    for tile_name in triton_tile_names(*_args(x, weight, res, stride, pad, dil)):
        out = _run(tile_name, x, weight, scale, shift, res, stride, pad, dil)
        assert_close(out, expected, atol=3e-2, rtol=2e-2, name=tile_name)
