"""The experimental shelf's conv_stats candidates (fastresnet.experimental.conv_stats): the Triton backward
paths (kernels/experimental/conv_train_bwd.py) against eager autograd, the kernels' other tiles, and how
each is chosen: with a fake H100 and a fake timer on the CPU, for real on a GPU."""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
import triton
from test_bn_act import PathsRun
from test_conv_stats import (
    BWD_SHAPES, CONV_TOL, DEVICE, EPS, _bwd_problem, _channels_last, _compare, _eager_grads, _fused_grads,
)

from fastresnet.experimental import conv_stats as shelf
from fastresnet.experimental.common import tiles_searched
from fastresnet.kernels.bn_stats import finalize_stats
from fastresnet.kernels.conv import _TileConfig
from fastresnet.kernels.conv_train import conv_stats_fwd
from fastresnet.kernels.experimental.conv_train_bwd import (
    _DGRAD_TILES, _WGRAD_TILES, _dgrad_tile_candidates, _wgrad_tile_candidates, conv_dgrad_bn, conv_wgrad,
)
from fastresnet.kernels.experimental.tiles import _STATS_TILES, MAX_STATS_TILES, _stats_tile_candidates
from fastresnet.ops import tuning
from fastresnet.ops.conv_stats import conv_stats
from fastresnet.reference import conv_stats_reference
from fastresnet.testing import assert_as_accurate_as, assert_close

PATHS = ("cudnn", *shelf.BACKWARD_PATHS)


@pytest.fixture(autouse=True)
def _full_fp32_convs():
    """fp32 convs in full precision on a GPU (tf32 would round the large-mean test's inputs)."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield


def paths_run(x, weight, norm, grad_y, stride, padding, input_grad=True) -> PathsRun:
    """conv_stats forward and backward on these tensors (leaves made here), with the paths each op was given."""
    leaves = [x.detach().clone().requires_grad_(input_grad), weight.detach().clone().requires_grad_()]
    with PathsRun() as run:
        y, *_ = conv_stats(leaves[0], leaves[1], None, stride, padding, eps=EPS, input_norm=norm)
        y.backward(grad_y)
    return run


def backward_path(*args, **kwargs) -> str:
    """The path the backward op ran with (its last call: the ones before it, if any, were timed)."""
    return [call.partition(":")[2] for call in paths_run(*args, **kwargs).calls
            if call.startswith("conv_stats_backward:")][-1]


def _norm(x, affine):
    return (x.mean((0, 2, 3)), torch.rsqrt(x.var((0, 2, 3)) + EPS), *affine)


# ---------------------------------------------------------------------------
# The backward paths against eager autograd through conv(relu(batch_norm(x)))
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", shelf.BACKWARD_PATHS)
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=str)
def test_every_backward_path_matches_eager(shape, path, dtype):
    k, stride = shape[5], shape[6]
    x, weight, affine, grad_y = _bwd_problem(shape, normalise_input=True)
    expected = _eager_grads(x, weight, affine, grad_y, stride, k // 2)
    actual = _fused_grads(x, weight, affine, grad_y, stride, k // 2, dtype, path)
    _compare(actual, expected, dtype, ["x", "weight", "norm weight", "norm bias"])
    assert actual[1].stride() == weight.stride(), "grad_w must have the weight's strides"


@pytest.mark.parametrize("path", ["triton_bwd", "triton_wgrad"])
@pytest.mark.parametrize("shape", [BWD_SHAPES[0], BWD_SHAPES[2]], ids=str)
def test_backward_without_an_input_batchnorm(shape, path):
    """The block's first conv: a = x, grad_x is dgrad alone."""
    k, stride = shape[5], shape[6]
    x, weight, _, grad_y = _bwd_problem(shape, normalise_input=False)
    expected = _eager_grads(x, weight, None, grad_y, stride, k // 2)
    actual = _fused_grads(x, weight, None, grad_y, stride, k // 2, torch.float32, path)
    _compare(actual, expected, torch.float32, ["x", "weight"])


def test_triton_backward_of_contiguous_nchw_tensors():
    """Kernels address every tensor by strides: NCHW (autograd may hand one over) is correct, only slower."""
    shape = BWD_SHAPES[2]
    x, weight, affine, grad_y = _bwd_problem(shape, normalise_input=True)
    x, weight, grad_y = x.contiguous(), weight.contiguous(), grad_y.contiguous()
    expected = _eager_grads(x, weight, affine, grad_y, 1, 1)
    actual = _fused_grads(x, weight, affine, grad_y, 1, 1, torch.float32, "triton_bwd")
    _compare(actual, expected, torch.float32, ["x", "weight", "norm weight", "norm bias"])
    assert actual[0].is_contiguous() and actual[1].is_contiguous()


@pytest.mark.parametrize("k", [1, 3])
def test_wgrad_split_over_pixels_sums_the_partials(k):
    # 288 output pixels in two row ranges (256 + 32): the loop over pixel blocks and the partial sum.
    x, weight, affine, grad_y = _bwd_problem((2, 16, 12, 12, 16, k, 1), normalise_input=True)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    norm = (mean, torch.rsqrt(var + EPS), *affine)
    one = conv_wgrad(grad_y, x, 16, (k, k), (1, 1), (k // 2, k // 2), norm, DEVICE == "cpu", split=1)
    two = conv_wgrad(grad_y, x, 16, (k, k), (1, 1), (k // 2, k // 2), norm, DEVICE == "cpu", split=2)
    expected = _eager_grads(x, weight, affine, grad_y, 1, k // 2)[1]
    assert_close(one.permute(0, 3, 1, 2), expected, atol=1e-4, rtol=1e-4, name="grad_w, one range")
    assert_close(two, one, atol=1e-4, rtol=1e-4, name="grad_w, two ranges")


def test_dgrad_rejects_a_strided_shape():
    x, weight, _, grad_y = _bwd_problem(BWD_SHAPES[1], normalise_input=False)
    with pytest.raises(ValueError, match="stride-1 shapes"):
        conv_dgrad_bn(grad_y, weight, x, (0, 0), None, DEVICE == "cpu")


def test_the_choice_follows_the_switches(monkeypatch):
    x, weight, affine, grad_y = _bwd_problem(BWD_SHAPES[0], normalise_input=True)
    args = (x, weight, None, grad_y, 1, 0)
    tuning.override("conv_stats.backward=triton_dgrad")
    assert backward_path(*args) == "triton_dgrad"
    tuning.override("conv_stats.backward=triton_wgrad")
    assert backward_path(*args) == "triton_wgrad"
    tuning.override("conv_bn_act=triton")  # another op's pin: this op keeps its default (nothing to time here)
    assert backward_path(*args) == "cudnn"
    monkeypatch.setenv("FASTRESNET_DISPATCH", "conv_stats.backward=triton_bwd")
    tuning.override(None)  # back to the environment, which is read when a problem is first met
    assert backward_path(*args) == "triton_bwd"
    monkeypatch.setenv("FASTRESNET_DISPATCH", "conv_stats.backward=fastest")
    tuning.clear()
    with pytest.raises(ValueError, match="'fastest'"):
        backward_path(*args)
    monkeypatch.delenv("FASTRESNET_DISPATCH")
    tuning.override("conv_stats.backward=triton_bwd")  # at stride 2: Triton's wgrad, cuDNN's dgrad
    assert backward_path(x, weight, None, grad_y[:, :, ::2, ::2].contiguous(), 2, 0) == "triton_bwd"


def test_a_triton_path_with_wrong_gradients_never_wins(monkeypatch, tmp_path):
    """The Triton wgrad/dgrad have not run on a GPU: each path's first call is compared with cuDNN's
    gradients; a path that is off (here every one with the Triton wgrad) warns and is left out."""
    x, weight, affine, grad_y = _bwd_problem(BWD_SHAPES[0], normalise_input=True)
    norm = _norm(x, affine)
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "can_measure", lambda device: True)
    monkeypatch.setattr(tuning, "time_ms", lambda fn, device: [fn() for _ in range(2)] and 1.0)
    # the kernels' default tiles ("fixed": what the README first called the default)
    tuning.override("conv_wgrad.tile=fixed,conv_dgrad.tile=default,conv_stats.forward=default")
    paths_run(x, weight, norm, grad_y, 1, 0)
    (decision,) = tuning.decisions()
    assert set(decision["times_ms"]) == set(PATHS)  # all agree with cuDNN's gradients
    real_wgrad = shelf._triton_weight_grad
    monkeypatch.setattr(shelf, "_triton_weight_grad", lambda *a: real_wgrad(*a) * 1.5)
    tuning.clear()
    for path in tmp_path.glob("*.json"):
        path.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths_run(x[:1], weight, _norm(x[:1], affine), grad_y[:1], 1, 0)  # a problem not checked yet
    (decision,) = tuning.decisions()
    assert set(decision["times_ms"]) == {"cudnn", "triton_dgrad"}
    messages = " ".join(str(w.message) for w in caught)
    assert "candidate triton_wgrad is off" in messages and "candidate triton_bwd is off" in messages


def test_a_cuda_graph_capture_records_the_measured_choice(fake_gpu_timing, monkeypatch):
    """torch.compile(mode="reduce-overhead") runs the op once uncaptured (measured there), then captures
    it: the capture must run that measured path, not the default; a problem first met inside a capture
    (no sync allowed for timing) gets the default and is not remembered."""
    fake_gpu_timing.winners["conv_stats.backward"] = "triton_wgrad"
    tuning.override("conv_wgrad.tile=default,conv_dgrad.tile=default")  # the kernels' default tiles
    x, weight, affine, grad_y = _bwd_problem(BWD_SHAPES[0], normalise_input=True)
    args = (x, weight, None, grad_y, 1, 0)
    capturing = [False]
    monkeypatch.setattr(tuning, "capturing", lambda device: capturing[0])
    assert backward_path(*args) == "triton_wgrad"  # the warm-up: measured
    capturing[0] = True
    assert backward_path(*args) == "triton_wgrad"  # the capture
    timed = [op for op, _ in fake_gpu_timing.timed]
    assert timed == ["conv_stats.backward"]
    assert backward_path(*args, input_grad=False) == "cudnn"
    capturing[0] = False
    assert backward_path(*args, input_grad=False) == "triton_wgrad"
    assert [op for op, _ in fake_gpu_timing.timed] == ["conv_stats.backward"] * 2


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the default is not what an unpinned call gives")
def test_the_default_cudnn_path_runs_where_nothing_is_measured():
    x, weight, affine, grad_y = _bwd_problem(BWD_SHAPES[0], normalise_input=True)
    assert backward_path(x, weight, _norm(x, affine), grad_y, 1, 0) == "cudnn"


def test_backward_op_passes_opcheck_on_the_triton_path():
    """Schema, fake implementation (what torch.compile sees) and real outputs agree."""
    x, weight, affine, grad_y = _bwd_problem(BWD_SHAPES[0], normalise_input=True)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    args = (grad_y, x, weight, mean, torch.rsqrt(var + EPS), *affine, [1, 1], [0, 0], True, "triton_bwd")
    torch.library.opcheck(torch.ops.fastresnet.conv_stats_backward.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def _block_pair(cls, inplanes, planes, stride):
    """A torchvision block with random BatchNorm affines, and its convert(mode="train") copy."""
    from fastresnet import convert

    out = planes * cls.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = torch.nn.Sequential(torch.nn.Conv2d(inplanes, out, 1, stride, bias=False),
                                         torch.nn.BatchNorm2d(out))
    ref = cls(inplanes, planes, stride, downsample).to(DEVICE).to(memory_format=torch.channels_last)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.5)
    return ref, convert(copy.deepcopy(ref), mode="train")


@pytest.mark.parametrize("block", ["Bottleneck-s2-projection", "BasicBlock-s1"])
def test_whole_block_trains_through_the_triton_backward(block):
    """Every conv of a fused block's Triton path with Triton's wgrad and (stride 1) dgrad:
    input and parameter gradients as torchvision's block gives them."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    tuning.override("conv_stats.backward=triton_bwd")
    cls, inplanes, planes, stride = (Bottleneck, 16, 8, 2) if block.startswith("Bottleneck") else (BasicBlock, 8, 8, 1)
    ref, fused = _block_pair(cls, inplanes, planes, stride)
    x = _channels_last(torch.randn(2, inplanes, 8, 8, device=DEVICE))
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with PathsRun() as run:
        out_f = fused.run_path("triton", xf)
        out_r = ref(xr)
        grad = torch.randn_like(out_r)
        out_f.backward(grad)
    out_r.backward(grad)
    ran = {call.partition(":")[2] for call in run.calls if call.startswith("conv_stats_backward:")}
    assert ran == {"triton_bwd"}
    pairs = [("x", xf.grad, xr.grad)] + [
        (name, p.grad, q.grad) for (name, p), q in zip(fused.named_parameters(), ref.parameters())
    ]
    for name, a, b in pairs:
        scale = b.abs().max().item() + 1e-6
        assert_close(a / scale, b / scale, atol=2e-3, rtol=2e-3, name=f"grad {name}")


# ---------------------------------------------------------------------------
# GPU: real compilation, ResNet-50 shapes, the measured choice
# ---------------------------------------------------------------------------

# (N, Cin, H, W, Cout, kernel, stride): ResNet-50 stage convs at batch 8
GPU_SHAPES = [
    (8, 64, 56, 56, 64, 3, 1),  # layer1 conv2
    (8, 256, 56, 56, 64, 1, 1),  # layer1 conv1
    (8, 128, 56, 56, 128, 3, 2),  # layer2.0 conv2 (strided 3x3)
    (8, 512, 28, 28, 1024, 1, 2),  # layer3.0 downsample
    (8, 512, 7, 7, 2048, 1, 1),  # layer4 conv3
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_triton_paths_are_as_accurate_as_cudnn(shape, dtype):
    """Each Triton path's gradients, judged against the fp32 truth, are about as accurate as the
    cuDNN path's in the same dtype (elementwise bf16-vs-bf16 comparisons are the wrong test)."""
    k, stride = shape[5], shape[6]
    x, weight, affine, grad_y = _bwd_problem(shape, normalise_input=True)
    exact = _eager_grads(x, weight, affine, grad_y, stride, k // 2)
    baseline = _fused_grads(x, weight, affine, grad_y, stride, k // 2, dtype, "cudnn")
    for path in shelf.BACKWARD_PATHS:
        actual = _fused_grads(x, weight, affine, grad_y, stride, k // 2, dtype, path)
        for name, a, b, e in zip(("x", "weight", "norm weight", "norm bias"), actual, baseline, exact):
            assert_as_accurate_as(a.float(), b.float(), e, name=f"{path} grad {name}")


@pytest.mark.cuda
def test_gpu_measured_choice_is_recorded_and_runs(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(tuning.DISPATCH_ENV, raising=False)
    shape = GPU_SHAPES[0]
    x, weight, affine, grad_y = _bwd_problem(shape, normalise_input=True)
    expected = _eager_grads(x, weight, affine, grad_y, 1, 1)
    actual = _fused_grads(x, weight, affine, grad_y, 1, 1, torch.bfloat16, "auto")
    entries = [d for d in tuning.decisions() if d["op"] == "conv_stats.backward"]
    baseline = _fused_grads(x, weight, affine, grad_y, 1, 1, torch.bfloat16, "cudnn")
    for name, a, b, e in zip(("x", "weight", "norm weight", "norm bias"), actual, baseline, expected):
        assert_as_accurate_as(a.float(), b.float(), e, name=f"measured choice grad {name}")
    assert len(entries) == 1 and set(entries[0]["times_ms"]) == set(PATHS), entries


@pytest.mark.cuda
def test_gpu_compiled_block_with_the_triton_backward(monkeypatch):
    """The backward op stays opaque to torch.compile(fullgraph=True): the compiled Triton path with
    the Triton backward forced gives torchvision's gradients (bf16, against the fp32 block)."""
    from torchvision.models.resnet import Bottleneck

    from fastresnet.nn import tune_dispatch

    tuning.override("fused_block=triton,conv_stats.backward=triton_bwd")
    ref, fused = _block_pair(Bottleneck, 256, 64, 1)
    x = _channels_last(torch.randn(16, 256, 28, 28, device="cuda"))
    exact = copy.deepcopy(ref)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        tune_dispatch(fused, x)
        out_c = torch.compile(fused, fullgraph=True)(x)
        out_r = ref(x)
    out_e = exact(x)
    grad = torch.randn_like(out_e)
    for out in (out_c, out_r, out_e):
        out.float().backward(grad)
    for (name, p), q, e in zip(fused.named_parameters(), ref.parameters(), exact.parameters()):
        assert_as_accurate_as(p.grad.float(), q.grad.float(), e.grad, name=f"grad {name}")


# ---------------------------------------------------------------------------
# The tiles of the forward, wgrad and dgrad kernels, and their choice
# ---------------------------------------------------------------------------


def _names(table):
    return sorted({_TileConfig(bm, bn, bk, 8, w, s).name for tiles in table.values() for bm, bn, bk, w, s in tiles})


OFFERED = _names(_STATS_TILES)

# (N, Cin, H, W, Cout, kernel, stride): M = 162 rows (3 blocks of 64, the last short) and 72
# channels (two 64-wide column blocks, one masked 128/256-wide one); a strided 1x1 with odd sizes
TILE_SHAPES = [(2, 20, 9, 9, 72, 3, 1), (3, 16, 11, 11, 40, 1, 2)]


def _tile_problem(shape, dtype, normalise_input=True):
    n, c, h, w, out_c, k, stride = shape
    x = _channels_last(torch.randn(n, c, h, w, device=DEVICE).mul(2).add(1).to(dtype))
    weight = (torch.randn(out_c, c, k, k, device=DEVICE) / (c * k * k) ** 0.5).to(dtype)
    input_norm = None
    if normalise_input:  # bias < 0 for some channels: the ReLU and the padding after normalisation matter
        input_norm = (torch.randn(c, device=DEVICE) + 2.0, torch.rand(c, device=DEVICE) + 0.5,
                      torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE))
    return x, weight, input_norm


def _check_against_reference(x, weight, stride, padding, input_norm, out, stats):
    mean, invstd, var_unbiased = stats
    ref, ref_mean, _, _ = conv_stats_reference(x, weight, stride, padding, input_norm)
    atol, rtol = CONV_TOL[x.dtype]
    assert_close(out.float(), ref.float(), atol=atol, rtol=rtol, name="raw output")
    # The statistics describe the stored output exactly: compare with its own statistics.
    own_var, own_mean = torch.var_mean(out.float(), dim=(0, 2, 3), unbiased=False)
    m = out.numel() // out.shape[1]
    assert_close(mean, own_mean, atol=1e-5, rtol=1e-5, name="mean")
    assert_close(invstd, torch.rsqrt(own_var + EPS), atol=1e-4, rtol=1e-4, name="invstd")
    assert_close(var_unbiased, own_var * m / (m - 1), atol=1e-4, rtol=1e-4, name="unbiased var")
    assert_close(mean, ref_mean, atol=atol, rtol=rtol, name="mean vs reference")


@pytest.mark.parametrize("shape, dtype", [(TILE_SHAPES[0], torch.float32), (TILE_SHAPES[1], torch.float16)], ids=str)
@pytest.mark.parametrize("tile", OFFERED)
def test_every_offered_tile_matches_the_reference(tile, shape, dtype):
    n, c, h, w, out_c, k, stride = shape
    x, weight, input_norm = _tile_problem(shape, dtype, normalise_input=k == 3)
    cfg = _TileConfig.from_name(tile)
    ref_shape = conv_stats_reference(x, weight, stride, k // 2, input_norm)[0].shape
    out = _channels_last(torch.empty(ref_shape, device=DEVICE, dtype=dtype))
    mean_part, m2_part, rows = conv_stats_fwd(
        x, weight.permute(0, 2, 3, 1).contiguous(), out, (stride, stride), (k // 2, k // 2), input_norm, tile=cfg)
    m = out.numel() // out_c
    # One partial per row block of the chosen tile: the merge must use its BLOCK_M.
    assert rows == cfg.block_m and mean_part.shape == (triton.cdiv(m, cfg.block_m), out_c)
    stats = finalize_stats(mean_part, m2_part, m, rows, EPS)
    _check_against_reference(x, weight, stride, k // 2, input_norm, out, stats)


def _backward_problem(shape, dtype):
    """x (raw), weight, input_norm (x's own batch statistics and an affine), grad_y; and eager's
    grad_w and grad_a = dgrad(grad_y) * relu mask, in fp64 from the same values."""
    n, c, h, w, out_c, k, stride = shape
    x, weight, norm = _tile_problem(shape, dtype)
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
    # ResNet-50 layer1 3x3 at batch 256: the default 128x64x64w4s4 first, then the narrow list.
    narrow = [t.name for t in _stats_tile_candidates(256 * 56 * 56, 64, 64, 2, "cuda")]
    assert narrow == ["128x64x64w4s4", "128x64x64w8s4", "64x64x64w4s4", "128x64x32w4s4"]
    wide = [t.name for t in _stats_tile_candidates(256 * 14 * 14, 1024, 256, 2, "cuda")]
    assert wide == ["128x128x64w8s4", "64x128x64w4s4", "64x256x64w8s4", "128x128x64w8s3"]
    # 128 channels: no 256-wide tile (half of it masked); a small problem's default is 64 tall.
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
    # ResNet-50 layer3 3x3 (256 -> 256) at batch 256: the defaults first, at most three each.
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
    """tuning.measure with made-up times (the second candidate wins); runs every candidate once."""

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
    """A CPU that the tile choices believe they can measure on: fake H100 properties, a fake timer,
    a private disk cache."""
    _fake_gpu(monkeypatch)
    monkeypatch.setattr(tuning, "can_measure", lambda device: True)
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(tuning.DISPATCH_ENV, raising=False)
    timer = _FakeTimer()
    monkeypatch.setattr(tuning, "measure", timer)
    return timer


def _conv_stats(x, weight, input_norm, stride=1, padding=1):
    return conv_stats(x, weight, None, stride, padding, eps=EPS, input_norm=input_norm)


def _forward_path(x, weight, input_norm) -> str:
    """The path (the tile) conv_stats' forward op was given for this 3x3 problem (its last call: the ones
    before it, if any, were timed)."""
    with PathsRun() as run:
        _conv_stats(x, weight, input_norm)
    return [call.partition(":")[2] for call in run.calls if call.startswith("conv_stats:")][-1]


@pytest.mark.skipif(DEVICE == "cuda", reason="the fake timer stands in for a GPU")
def test_the_measured_tile_is_chosen_cached_and_runs(fake_measurement):
    shape = (2, 20, 9, 9, 72, 1, 1)
    x, weight, input_norm = _tile_problem(shape, torch.float32)
    y, *stats = _conv_stats(x, weight, input_norm, padding=0)
    # 162 rows: the small problem's default first (64x128x32w4s4); fp32 and 20 channels: K steps of 32
    names = ["triton", "triton:128x128x32w8s4", "triton:128x128x32w8s3"]
    assert fake_measurement.calls == [names]
    (entry,) = tuning.decisions()
    assert entry["op"] == "conv_stats.forward" and ":2x20x9x9:" in entry["key"] and ":72x20x1x1:" in entry["key"]
    assert entry["choice"] == names[1] and entry["source"] == "measured" and set(entry["times_ms"]) == set(names)
    _check_against_reference(x, weight, 1, 0, input_norm, y, stats)  # the op ran the chosen tile
    _conv_stats(x, weight, input_norm, padding=0)  # the same problem again: the in-process choice, no timing
    assert len(fake_measurement.calls) == 1
    tuning.clear()
    _conv_stats(x, weight, input_norm, padding=0)  # a new process: the disk cache, no timing
    assert len(fake_measurement.calls) == 1 and tuning.decision(entry["key"])["source"] == "disk cache"
    _conv_stats(x, weight, None, padding=0)  # without the prologue: another problem
    assert len(fake_measurement.calls) == 2


@pytest.mark.skipif(DEVICE == "cuda", reason="the fake timer stands in for a GPU")
def test_the_switches_override_measurement(fake_measurement, monkeypatch):
    x, weight, input_norm = _tile_problem((2, 20, 9, 9, 72, 3, 1), torch.float32)
    for spec in ("fixed", "default", "conv_stats.forward=default"):  # no timing: the default tile
        tuning.override(spec)
        assert _forward_path(x, weight, input_norm) == "triton"
    tuning.override("conv_stats.forward=triton:128x128x32w8s3")  # a tile this problem offers
    assert _forward_path(x, weight, input_norm) == "triton:128x128x32w8s3"
    tuning.override("conv_stats.forward=triton:64x256x32w8s4")  # one it does not (72 channels): the default
    assert _forward_path(x, weight, input_norm) == "triton"
    assert fake_measurement.calls == []
    tuning.override("conv_stats.backward=triton_bwd,fused_block=triton")  # other ops' pins: this one is timed
    assert _forward_path(x, weight, input_norm) == "triton:128x128x32w8s4" and len(fake_measurement.calls) == 1
    monkeypatch.setattr(tuning, "can_measure", lambda device: False)  # the CPU as it is
    tuning.override(None)
    assert _forward_path(x, weight, input_norm) == "triton" and len(fake_measurement.calls) == 1


@pytest.mark.skipif(DEVICE == "cuda", reason="the fake timer stands in for a GPU")
def test_the_backward_tiles_are_measured_in_a_second_step(fake_measurement):
    """conv_stats' Triton backward chooses its wgrad and dgrad tiles (two more keys), runs them, and
    gives eager's gradients."""
    shape = (2, 20, 9, 9, 72, 1, 1)
    x, weight, norm, grad_y, grad_w, grad_a = _backward_problem(shape, torch.float32)
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    tuning.override("conv_stats.backward=triton_bwd")
    y, *_ = conv_stats(leaves[0], leaves[1], None, 1, 0, eps=EPS, input_norm=norm)
    y.backward(grad_y)
    ops = sorted(d["op"] for d in tuning.decisions())
    assert ops == ["conv_dgrad.tile", "conv_stats.forward", "conv_wgrad.tile"], ops
    wgrad = next(d for d in tuning.decisions() if d["op"] == "conv_wgrad.tile")
    assert wgrad["key"].startswith("conv_wgrad.tile:72x20x1x1:1x1:0x0:2x20x9x9:float32:1:")
    assert wgrad["choice"] == list(wgrad["times_ms"])[1] and wgrad["choice"].startswith("triton:")
    scale = grad_w.abs().max().item()
    assert_close(leaves[1].grad.double() / scale, grad_w / scale, atol=1e-3, rtol=1e-3, name="grad_w")
    calls = len(fake_measurement.calls)
    y, *_ = conv_stats(leaves[0], leaves[1], None, 1, 0, eps=EPS, input_norm=norm)
    y.backward(grad_y)
    assert len(fake_measurement.calls) == calls  # chosen once per problem


@pytest.mark.skipif(DEVICE == "cuda", reason="the fake timer stands in for a GPU")
def test_tiles_default_switch_times_no_tile_and_runs_the_default(fake_measurement, monkeypatch):
    monkeypatch.setenv("FASTRESNET_TILES", "default")
    x, weight, input_norm = _tile_problem((2, 20, 9, 9, 72, 1, 1), torch.float32)
    y, *stats = _conv_stats(x, weight, input_norm, padding=0)
    assert fake_measurement.calls == []  # no tile was timed
    _check_against_reference(x, weight, 1, 0, input_norm, y, stats)


def test_tiles_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("FASTRESNET_TILES", "fast")
    with pytest.raises(ValueError, match="FASTRESNET_TILES='fast'"):
        tiles_searched()
    monkeypatch.setenv("FASTRESNET_TILES", "search")
    assert tiles_searched()


# ---------------------------------------------------------------------------
# GPU: the tiles timed for real
# ---------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(32, 64, 56, 56, 64, 3, 1), (32, 256, 28, 28, 512, 1, 1)], ids=str)
def test_gpu_tiles_are_measured_and_the_choice_recorded(shape, monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(tuning.DISPATCH_ENV, raising=False)
    n, c, h, w, out_c, k, stride = shape
    x, weight, input_norm = _tile_problem(shape, torch.bfloat16)
    y, *stats = _conv_stats(x, weight, input_norm, stride, k // 2)
    (entry,) = [d for d in tuning.decisions() if d["op"] == "conv_stats.forward"]
    m = y.shape[0] * y.shape[2] * y.shape[3]
    names = ["triton", *shelf._tile_names(_stats_tile_candidates(m, out_c, c, 2, x.device))]
    assert entry["source"] == "measured", tuning.decisions()
    assert set(entry["times_ms"]) == set(names) and entry["choice"] in names, entry  # every tile ran
    own_var, own_mean = torch.var_mean(y.float(), dim=(0, 2, 3), unbiased=False)
    assert_close(stats[0], own_mean, atol=1e-3, rtol=1e-3, name="mean")
    assert_close(stats[1], torch.rsqrt(own_var + EPS), atol=1e-3, rtol=1e-3, name="invstd")
    ref = conv_stats_reference(x.float(), weight.float(), stride, k // 2, input_norm)[0]
    assert_close(y.float(), ref, atol=6e-2, rtol=6e-2, name="raw output")


@pytest.mark.cuda
def test_gpu_backward_tiles_are_measured_and_recorded(monkeypatch, tmp_path):
    """conv_stats' Triton backward at a ResNet-50 layer2 3x3 (bf16): the wgrad and dgrad tiles timed
    (every candidate ran) and the gradients as eager's within bf16's tolerance."""
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(tuning.DISPATCH_ENV, raising=False)
    tuning.override("conv_stats.backward=triton_bwd")
    shape = (16, 128, 28, 28, 128, 3, 1)
    x, weight, norm, grad_y, grad_w, grad_a = _backward_problem(shape, torch.bfloat16)
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    y, *_ = conv_stats(leaves[0], leaves[1], None, 1, 1, eps=EPS, input_norm=norm)
    y.backward(grad_y)
    m = 16 * 28 * 28
    wgrad_names = ["triton", *shelf._tile_names(_wgrad_tile_candidates(m, 128, 128, 2, x.device))]
    dgrad_names = ["triton", *shelf._tile_names(_dgrad_tile_candidates(m, 128, 128, 2, True, x.device))]
    for kind, names in (("wgrad", wgrad_names), ("dgrad", dgrad_names)):
        entries = [d for d in tuning.decisions() if d["op"] == f"conv_{kind}.tile"]
        assert len(entries) == 1 and entries[0]["source"] == "measured", tuning.decisions()
        assert set(entries[0]["times_ms"]) == set(names) and entries[0]["choice"] in names, entries
    scale = grad_w.abs().max().item()
    assert_close(leaves[1].grad.double() / scale, grad_w / scale, atol=6e-2, rtol=6e-2, name="grad_w")
