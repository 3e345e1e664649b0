"""conv_stats' backward paths (fastresnet/ops/conv_train_backward.py, kernels/conv_train_bwd.py)
against eager autograd through conv(relu(batch_norm(x))).

On the CPU the Triton kernels run through Triton's interpreter: tiny shapes, large blocks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from fastresnet.kernels.conv_train_bwd import conv_dgrad_bn, conv_wgrad
from fastresnet.ops import conv_train_backward, dispatch
from fastresnet.ops.conv_train import conv_stats
from fastresnet.testing import assert_as_accurate_as, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
GRAD_TOL = {torch.float32: (2e-3, 2e-3), torch.float16: (4e-2, 4e-2), torch.bfloat16: (6e-2, 6e-2)}
PATHS = conv_train_backward.BACKWARD_PATHS

# (N, Cin, H, W, Cout, kernel, stride): the ResNet conv kinds scaled down, plus odd sizes
SHAPES = [
    (2, 16, 6, 6, 32, 1, 1),  # bottleneck 1x1
    (2, 24, 7, 7, 20, 1, 2),  # projection shortcut: odd H/W, Cout not a power of 2
    (2, 20, 7, 7, 12, 3, 1),  # 3x3, Cin and Cout not multiples of 16
    (1, 16, 9, 7, 16, 3, 2),  # strided 3x3, batch 1, non-square
]


@pytest.fixture(autouse=True)
def _full_fp32_and_fresh_choices():
    """fp32 convs in full precision on a GPU; no dispatch decision leaks between tests."""
    dispatch.clear_memory()
    conv_train_backward._choices.clear()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield
    dispatch.set_dispatch_mode(None)
    conv_train_backward._choices.clear()


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def _problem(shape, normalise_input):
    """fp32 leaves: raw x, weight, gamma, beta (beta < 0 for some channels: the ReLU matters) and grad_y."""
    n, c, h, w, out_c, k, stride = shape
    x = _channels_last(torch.randn(n, c, h, w, device=DEVICE) * 2 + 1)
    weight = _channels_last(torch.randn(out_c, c, k, k, device=DEVICE) / (c * k * k) ** 0.5)
    gamma, beta = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
    oh, ow = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    grad_y = _channels_last(torch.randn(n, out_c, oh, ow, device=DEVICE))
    return x, weight, (gamma, beta) if normalise_input else None, grad_y


def _eager_grads(x, weight, affine, grad_y, stride, padding):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, *(affine or ()))]
    a = leaves[0]
    if affine is not None:
        a = F.relu(F.batch_norm(a, None, None, leaves[2], leaves[3], True, 0.0, EPS))
    F.conv2d(a, leaves[1], None, stride, padding).backward(grad_y)
    return [t.grad for t in leaves]


def _fused_grads(x, weight, affine, grad_y, stride, padding, dtype, path):
    """conv_stats with (mean, invstd) of x as its norm_input, as the previous conv_stats gives them."""
    leaves = [x.detach().to(dtype).requires_grad_(), weight.detach().to(dtype).requires_grad_()]
    norm_input = None
    if affine is not None:
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
        leaves += [t.detach().clone().requires_grad_() for t in affine]
        norm_input = (mean, torch.rsqrt(var + EPS), leaves[2], leaves[3])
    y, *_ = conv_stats(leaves[0], leaves[1], stride, padding, EPS, norm_input, backward=path)
    y.backward(grad_y.to(dtype))
    return [t.grad for t in leaves]


def _compare(actual, expected, dtype, names):
    atol, rtol = GRAD_TOL[dtype]
    for name, a, b in zip(names, actual, expected):
        assert a.dtype == (dtype if name in ("x", "weight") else torch.float32), name
        scale = b.abs().max().item() + 1e-6  # gradients of sums: compare relative to their size
        assert_close(a.float() / scale, b / scale, atol=atol, rtol=rtol, name=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_backward_path_matches_eager(shape, path, dtype):
    k, stride = shape[5], shape[6]
    x, weight, affine, grad_y = _problem(shape, normalise_input=True)
    expected = _eager_grads(x, weight, affine, grad_y, stride, k // 2)
    actual = _fused_grads(x, weight, affine, grad_y, stride, k // 2, dtype, path)
    _compare(actual, expected, dtype, ["x", "weight", "gamma", "beta"])
    assert actual[1].stride() == weight.stride(), "grad_w must have the weight's strides"


@pytest.mark.parametrize("path", ["triton_bwd", "triton_wgrad"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=str)
def test_backward_without_an_input_batchnorm(shape, path):
    """The block's first conv: a = x, grad_x is dgrad alone."""
    k, stride = shape[5], shape[6]
    x, weight, _, grad_y = _problem(shape, normalise_input=False)
    expected = _eager_grads(x, weight, None, grad_y, stride, k // 2)
    actual = _fused_grads(x, weight, None, grad_y, stride, k // 2, torch.float32, path)
    _compare(actual, expected, torch.float32, ["x", "weight"])


def test_triton_backward_of_contiguous_nchw_tensors():
    """Kernels address every tensor by strides: NCHW (autograd may hand one over) is correct, only slower."""
    shape = SHAPES[2]
    x, weight, affine, grad_y = _problem(shape, normalise_input=True)
    x, weight, grad_y = x.contiguous(), weight.contiguous(), grad_y.contiguous()
    expected = _eager_grads(x, weight, affine, grad_y, 1, 1)
    actual = _fused_grads(x, weight, affine, grad_y, 1, 1, torch.float32, "triton_bwd")
    _compare(actual, expected, torch.float32, ["x", "weight", "gamma", "beta"])
    assert actual[0].is_contiguous() and actual[1].is_contiguous()


@pytest.mark.parametrize("k", [1, 3])
def test_wgrad_split_over_pixels_sums_the_partials(k):
    # 288 output pixels in two row ranges (256 + 32): the loop over pixel blocks and the partial sum.
    x, weight, affine, grad_y = _problem((2, 16, 12, 12, 16, k, 1), normalise_input=True)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    norm = (mean, torch.rsqrt(var + EPS), *affine)
    one = conv_wgrad(grad_y, x, 16, (k, k), (1, 1), (k // 2, k // 2), norm, DEVICE == "cpu", split=1)
    two = conv_wgrad(grad_y, x, 16, (k, k), (1, 1), (k // 2, k // 2), norm, DEVICE == "cpu", split=2)
    expected = _eager_grads(x, weight, affine, grad_y, 1, k // 2)[1]
    assert_close(one.permute(0, 3, 1, 2), expected, atol=1e-4, rtol=1e-4, name="grad_w, one range")
    assert_close(two, one, atol=1e-4, rtol=1e-4, name="grad_w, two ranges")


def test_dgrad_rejects_a_strided_shape():
    x, weight, _, grad_y = _problem(SHAPES[1], normalise_input=False)
    with pytest.raises(ValueError, match="stride-1 shapes"):
        conv_dgrad_bn(grad_y, weight, x, (0, 0), None, DEVICE == "cpu")


def test_the_choice_follows_the_switches(monkeypatch):
    x, weight, affine, grad_y = _problem(SHAPES[0], normalise_input=True)
    args = (grad_y, x, weight, None, (1, 1), (0, 0), True)
    monkeypatch.delenv(conv_train_backward.BACKWARD_ENV, raising=False)
    assert conv_train_backward.choose_backward("triton_dgrad", *args) == "triton_dgrad"
    dispatch.set_dispatch_mode("triton_wgrad")
    assert conv_train_backward.choose_backward("auto", *args) == "triton_wgrad"
    dispatch.set_dispatch_mode("triton")  # another op's candidate: this op keeps its fixed rule
    assert conv_train_backward.choose_backward("auto", *args) == "cudnn"
    monkeypatch.setenv(conv_train_backward.BACKWARD_ENV, "triton_bwd")
    assert conv_train_backward.choose_backward("auto", *args) == "triton_bwd"
    monkeypatch.setenv(conv_train_backward.BACKWARD_ENV, "fastest")
    with pytest.raises(ValueError, match="'fastest'"):
        conv_train_backward.choose_backward("auto", *args)
    with pytest.raises(ValueError, match="'cudnn_v8'"):
        conv_stats(x, weight, backward="cudnn_v8")
    assert conv_train_backward.candidates((2, 2), True) == ["cudnn", "triton_wgrad"]


def test_a_triton_path_with_wrong_gradients_never_wins(monkeypatch):
    """The Triton wgrad/dgrad have not run on a GPU: each path's first timed call is compared with cuDNN's
    gradients; a path that is off (here every one with the Triton wgrad) warns and is left out."""
    x, weight, affine, grad_y = _problem(SHAPES[0], normalise_input=True)
    norm = (x.mean((0, 2, 3)), torch.rsqrt(x.var((0, 2, 3)) + EPS), *affine)
    monkeypatch.setattr(dispatch, "time_ms", lambda fn, device: [fn() for _ in range(2)] and 1.0)
    runs = conv_train_backward.timed_runs(grad_y, x, weight, norm, (1, 1), (0, 0), True)
    assert sorted(runs) == sorted(PATHS)
    assert set(dispatch.measure(runs, torch.device("cpu"))) == set(PATHS)  # all agree with cuDNN's gradients
    real_wgrad = conv_train_backward._triton_weight_grad
    monkeypatch.setattr(conv_train_backward, "_triton_weight_grad", lambda *a: real_wgrad(*a) * 1.5)
    runs = conv_train_backward.timed_runs(grad_y, x, weight, norm, (1, 1), (0, 0), True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert set(dispatch.measure(runs, torch.device("cpu"))) == {"cudnn", "triton_dgrad"}
    messages = " ".join(str(w.message) for w in caught)
    assert "candidate triton_wgrad is off" in messages and "candidate triton_bwd is off" in messages


def test_a_cuda_graph_capture_records_the_measured_choice(monkeypatch):
    """torch.compile(mode="reduce-overhead") runs the op once uncaptured (measured there), then captures
    it: the capture must run that measured path, not the fixed rule; a problem first met inside a capture
    (no sync allowed for timing) gets the fixed rule and is not remembered."""
    monkeypatch.delenv(conv_train_backward.BACKWARD_ENV, raising=False)
    dispatch.set_dispatch_mode("measure")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    timed = []
    monkeypatch.setattr(dispatch, "choose", lambda key, runs, fixed, device: timed.append(key) or "triton_wgrad")
    x, weight, affine, grad_y = _problem(SHAPES[0], normalise_input=True)
    args = (grad_y, x, weight, None, (1, 1), (0, 0), True)
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    assert conv_train_backward.choose_backward("auto", *args) == "triton_wgrad"  # the warm-up: measured
    capturing[0] = True
    assert conv_train_backward.choose_backward("auto", *args) == "triton_wgrad"  # the capture
    assert len(timed) == 1
    other = (grad_y, x, weight, None, (1, 1), (0, 0), False)
    assert conv_train_backward.choose_backward("auto", *other) == "cudnn"
    capturing[0] = False
    assert conv_train_backward.choose_backward("auto", *other) == "triton_wgrad" and len(timed) == 2


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the fixed rule is not what 'auto' gives")
def test_auto_runs_the_fixed_cudnn_rule_where_nothing_is_measured(monkeypatch):
    monkeypatch.delenv(conv_train_backward.BACKWARD_ENV, raising=False)
    ran = []
    real = conv_train_backward.run_backward
    monkeypatch.setattr(conv_train_backward, "run_backward", lambda path, *a: ran.append(path) or real(path, *a))
    x, weight, affine, grad_y = _problem(SHAPES[0], normalise_input=True)
    _fused_grads(x, weight, affine, grad_y, 1, 0, torch.float32, "auto")
    assert ran == ["cudnn"]


def test_backward_op_passes_opcheck():
    """Schema, fake implementation (what torch.compile sees) and real outputs agree."""
    x, weight, affine, grad_y = _problem(SHAPES[0], normalise_input=True)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    args = (grad_y, x, weight, mean, torch.rsqrt(var + EPS), *affine, [1, 1], [0, 0], True, "triton_bwd")
    torch.library.opcheck(torch.ops.fastresnet.conv_stats_backward.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def _block_pair(cls, inplanes, planes, stride):
    """A torchvision block with random BatchNorm affines, and its convert(mode="train") copy."""
    import copy

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
def test_whole_block_trains_through_the_triton_backward(block, monkeypatch):
    """Every conv of a fused block's Triton path with Triton's wgrad and (stride 1) dgrad:
    input and parameter gradients as torchvision's block gives them."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    monkeypatch.setenv(conv_train_backward.BACKWARD_ENV, "triton_bwd")
    cls, inplanes, planes, stride = (Bottleneck, 16, 8, 2) if block.startswith("Bottleneck") else (BasicBlock, 8, 8, 1)
    ref, fused = _block_pair(cls, inplanes, planes, stride)
    ran = []
    real = conv_train_backward.run_backward
    monkeypatch.setattr(conv_train_backward, "run_backward", lambda path, *a: ran.append(path) or real(path, *a))
    x = _channels_last(torch.randn(2, inplanes, 8, 8, device=DEVICE))
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_f, out_r = fused.run_path("triton", xf), ref(xr)
    grad = torch.randn_like(out_r)
    out_f.backward(grad)
    out_r.backward(grad)
    assert ran and set(ran) == {"triton_bwd"}
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
    x, weight, affine, grad_y = _problem(shape, normalise_input=True)
    exact = _eager_grads(x, weight, affine, grad_y, stride, k // 2)
    baseline = _fused_grads(x, weight, affine, grad_y, stride, k // 2, dtype, "cudnn")
    for path in PATHS[1:]:
        actual = _fused_grads(x, weight, affine, grad_y, stride, k // 2, dtype, path)
        for name, a, b, e in zip(("x", "weight", "gamma", "beta"), actual, baseline, exact):
            assert_as_accurate_as(a.float(), b.float(), e, name=f"{path} grad {name}")


@pytest.mark.cuda
def test_gpu_measured_choice_is_recorded_and_runs(monkeypatch, tmp_path):
    monkeypatch.setenv(dispatch.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(conv_train_backward.BACKWARD_ENV, raising=False)
    monkeypatch.delenv(dispatch.DISPATCH_ENV, raising=False)
    shape = GPU_SHAPES[0]
    x, weight, affine, grad_y = _problem(shape, normalise_input=True)
    expected = _eager_grads(x, weight, affine, grad_y, 1, 1)
    actual = _fused_grads(x, weight, affine, grad_y, 1, 1, torch.bfloat16, "auto")
    baseline = _fused_grads(x, weight, affine, grad_y, 1, 1, torch.bfloat16, "cudnn")
    for name, a, b, e in zip(("x", "weight", "gamma", "beta"), actual, baseline, expected):
        assert_as_accurate_as(a.float(), b.float(), e, name=f"measured choice grad {name}")
    entries = [d for d in dispatch.decisions() if d["key"].startswith("conv_stats_backward:")]
    assert len(entries) == 1 and set(entries[0]["times_ms"]) == set(PATHS), entries


@pytest.mark.cuda
def test_gpu_compiled_block_with_the_triton_backward(monkeypatch):
    """The backward op stays opaque to torch.compile(fullgraph=True): the compiled Triton path with
    the Triton backward forced gives torchvision's gradients (bf16, against the fp32 block)."""
    import copy

    from torchvision.models.resnet import Bottleneck

    from fastresnet.nn import fused_blocks

    monkeypatch.setenv(conv_train_backward.BACKWARD_ENV, "triton_bwd")
    ref, fused = _block_pair(Bottleneck, 256, 64, 1)
    x = _channels_last(torch.randn(16, 256, 28, 28, device="cuda"))
    exact = copy.deepcopy(ref)
    dispatch.set_dispatch_mode("triton")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused_blocks.tune_dispatch(fused, x)
        out_c = torch.compile(fused, fullgraph=True)(x)
        out_r = ref(x)
    out_e = exact(x)
    grad = torch.randn_like(out_e)
    for out in (out_c, out_r, out_e):
        out.float().backward(grad)
    for (name, p), q, e in zip(fused.named_parameters(), ref.parameters(), exact.parameters()):
        assert_as_accurate_as(p.grad.float(), q.grad.float(), e.grad, name=f"grad {name}")
