"""fastresnet.ops.bn_act against fastresnet.reference: outputs, every gradient,
running statistics; channels_last and NCHW; residual and ReLU on and off.

Without a GPU the Triton kernels run through the interpreter (tests/conftest.py),
so shapes are ResNet stage shapes scaled down, plus odd ones.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastresnet.ops import tuning
from fastresnet.ops.bn_act import affine_act, batch_norm_act
from fastresnet.reference import affine_act_reference, batch_norm_act_reference
from fastresnet.testing import assert_as_accurate_as, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (N, C, H, W): ResNet stages scaled down (channels / 8, pixels / 8), then odd ones:
# C not a multiple of any block, tiny H*W, one image.
SHAPES = [
    (2, 32, 7, 7),
    (2, 64, 4, 4),
    (3, 13, 5, 3),
    (4, 300, 1, 1),
    (1, 7, 2, 9),
]
# Gradients of a reduced-precision op go through fp32 maths but land in the input
# dtype, so they get the dtype's tolerance scaled by the size of the values.
GRAD_TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 6e-2)}


@pytest.fixture(autouse=True)
def kernels_not_dispatch(monkeypatch):
    """On a GPU batch_norm_act may choose eager PyTorch (its measured dispatch);
    these tests check the kernels, so they pin the choice to them. The dispatch
    tests at the end remove the variable again."""
    monkeypatch.setenv("FASTRESNET_DISPATCH", "batch_norm_act=triton")


def make_input(shape, dtype, channels_last, *, mean=0.0, std=1.0, requires_grad=True):
    x = (torch.randn(shape, device=DEVICE) * std + mean).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def channel_vector(c, *, low=-1.0, high=1.0, requires_grad=True):
    v = torch.empty(c, device=DEVICE).uniform_(low, high)
    return v.requires_grad_(requires_grad)


def grads_of(y, inputs, grad_y):
    wanted = [t for t in inputs if t is not None]
    return torch.autograd.grad(y, wanted, grad_y)


# ---------------------------------------------------------------------------
# affine_act
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (True, False)])
def test_affine_act_matches_reference(shape, dtype, residual, relu):
    x = make_input(shape, dtype, channels_last=True)
    scale, shift = channel_vector(shape[1], low=0.5, high=2.0), channel_vector(shape[1])
    res = make_input(shape, dtype, channels_last=True) if residual else None

    y = affine_act(x, scale, shift, res, relu)
    expected = affine_act_reference(x, scale, shift, res, relu)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, expected, name="y")

    grad_y = torch.randn_like(y)
    atol, rtol = GRAD_TOL[dtype]
    names = ["x", "scale", "shift", "residual"]
    actual_grads = grads_of(y, [x, scale, shift, res], grad_y)
    expected_grads = grads_of(expected, [x, scale, shift, res], grad_y)
    for name, a, e in zip(names, actual_grads, expected_grads):
        assert_close(a, e, atol=atol * max(1.0, e.abs().max().item()), rtol=rtol, name=f"grad {name}")


def test_affine_act_nchw_and_center():
    """Contiguous NCHW goes through the kernels by strides and stays NCHW;
    `center` subtracts a large mean before scaling."""
    shape = (2, 12, 5, 6)
    x = make_input(shape, torch.float32, channels_last=False, mean=1e3)
    scale, shift = channel_vector(12), channel_vector(12)
    center = torch.full((12,), 1e3, device=DEVICE).requires_grad_()
    res = make_input(shape, torch.float32, channels_last=True)  # a different layout from x
    y = affine_act(x, scale, shift, res, True, center=center)
    expected = affine_act_reference(x, scale, shift, res, True, center=center)
    assert y.is_contiguous()
    assert_close(y, expected, name="y")
    grad_y = torch.randn_like(y)
    for name, a, e in zip(
        ["x", "scale", "shift", "center", "residual"],
        grads_of(y, [x, scale, shift, center, res], grad_y),
        grads_of(expected, [x, scale, shift, center, res], grad_y),
    ):
        assert_close(a, e, atol=1e-3, rtol=1e-4, name=f"grad {name}")


def test_affine_act_odd_strides_and_frozen_parameters():
    """A W-slice (H and W without a common stride) is copied to channels_last;
    a gradient that is an expanded scalar (stride 0) is read by strides; with
    frozen scale/shift only the elementwise backward runs."""
    base = make_input((2, 8, 4, 10), torch.float32, channels_last=True, requires_grad=False)
    x = base[..., ::2].requires_grad_()
    scale = channel_vector(8, requires_grad=False)
    shift = channel_vector(8, requires_grad=False)
    y = affine_act(x, scale, shift)
    expected = affine_act_reference(x, scale, shift)
    assert_close(y, expected, name="y")
    (grad_x,) = torch.autograd.grad(y.sum(), [x])
    (expected_grad_x,) = torch.autograd.grad(expected.sum(), [x])
    assert_close(grad_x, expected_grad_x, name="grad x")


def test_affine_act_rejects_bad_inputs():
    x = make_input((2, 4, 3, 3), torch.float32, channels_last=True)
    ok = torch.ones(4, device=DEVICE)
    with pytest.raises(ValueError, match="4-D"):
        affine_act(x[0], ok, ok)
    with pytest.raises(ValueError, match=r"scale must have shape \(4,\)"):
        affine_act(x, torch.ones(5, device=DEVICE), ok)
    with pytest.raises(ValueError, match="residual shape"):
        affine_act(x, ok, ok, residual=x[:1])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        affine_act(x.detach().double(), ok, ok)


# ---------------------------------------------------------------------------
# batch_norm_act
# ---------------------------------------------------------------------------


def bn_state(c, *, affine=True):
    """(running_mean, running_var, weight, bias) with non-trivial values."""
    weight = channel_vector(c, low=0.5, high=2.0) if affine else None
    bias = channel_vector(c) if affine else None
    running_mean = torch.randn(c, device=DEVICE)
    running_var = torch.rand(c, device=DEVICE) + 0.5
    return running_mean, running_var, weight, bias


def check_batch_norm_act(x, running_mean, running_var, weight, bias, training, residual, relu, *,
                         momentum=0.1, eps=1e-5, grad_tol=None, out_tol=None):
    """Run op and reference on copies of the running stats; compare outputs,
    running stats and the gradients of every input that requires one."""
    stats = (running_mean, running_var)
    ref_stats = tuple(s.clone() if s is not None else None for s in stats)
    y = batch_norm_act(x, *stats, weight, bias, training, momentum, eps, residual, relu)
    expected = batch_norm_act_reference(x, *ref_stats, weight, bias, training, momentum, eps, residual, relu)
    atol, rtol = out_tol or (None, None)
    assert y.dtype == x.dtype
    assert_close(y, expected, atol=atol, rtol=rtol, name="y")
    for name, actual, ref in zip(["running_mean", "running_var"], stats, ref_stats):
        if actual is not None:
            assert_close(actual, ref, atol=1e-5, rtol=1e-5, name=name)

    grad_y = torch.randn_like(y)
    inputs = [t for t in (x, weight, bias, residual) if t is not None and t.requires_grad]
    atol, rtol = grad_tol or GRAD_TOL[x.dtype]
    for t, a, e in zip(inputs, grads_of(y, inputs, grad_y), grads_of(expected, inputs, grad_y)):
        name = {id(x): "x", id(weight): "weight", id(bias): "bias", id(residual): "residual"}[id(t)]
        assert_close(a, e, atol=atol * max(1.0, e.abs().max().item()), rtol=rtol, name=f"grad {name}")
    return y


@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
def test_batch_norm_act_training_matches_reference(shape, dtype, residual, relu):
    x = make_input(shape, dtype, channels_last=True, mean=0.5, std=2.0)
    res = make_input(shape, dtype, channels_last=True) if residual else None
    check_batch_norm_act(x, *bn_state(shape[1]), True, res, relu)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_act_layouts_train_and_eval(channels_last, training):
    shape = (3, 20, 4, 5)
    x = make_input(shape, torch.float32, channels_last=channels_last)
    res = make_input(shape, torch.float32, channels_last=not channels_last)
    y = check_batch_norm_act(x, *bn_state(20), training, res, True)
    expected_format = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batch_norm_act_train_then_eval(dtype):
    """Several training steps move the running stats exactly like F.batch_norm;
    eval then normalises with them (batch of one included)."""
    c = 24
    running_mean, running_var, weight, bias = bn_state(c)
    ref_mean, ref_var = running_mean.clone(), running_var.clone()
    for step in range(3):
        x = make_input((2, c, 3, 3), dtype, channels_last=True, mean=float(step), requires_grad=False)
        batch_norm_act(x, running_mean, running_var, weight, bias, True, 0.3, 1e-5)
        batch_norm_act_reference(x, ref_mean, ref_var, weight, bias, True, 0.3, 1e-5)
    assert_close(running_mean, ref_mean, atol=1e-5, rtol=1e-5, name="running_mean")
    assert_close(running_var, ref_var, atol=1e-5, rtol=1e-5, name="running_var")
    x = make_input((1, c, 2, 3), dtype, channels_last=True)
    check_batch_norm_act(x, running_mean, running_var, weight, bias, False, None, True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual,relu,affine,channels_last", [
    (True, True, True, True), (False, False, True, True), (True, True, False, False),
])
def test_inference_kernel_matches_reference(shape, dtype, residual, relu, affine, channels_last):
    """Eval without gradients folds the running statistics and runs the one-pass kernel: output like
    F.batch_norm's, in x's dtype and layout."""
    x = make_input(shape, dtype, channels_last=channels_last, mean=0.5, std=2.0, requires_grad=False)
    res = make_input(shape, dtype, channels_last=True, requires_grad=False) if residual else None
    running_mean, running_var, weight, bias = bn_state(shape[1], affine=affine)
    with torch.no_grad():
        y = batch_norm_act(x, running_mean, running_var, weight, bias, False, 0.1, 1e-5, res, relu)
    expected = batch_norm_act_reference(x, running_mean, running_var, weight, bias, False, 0.1, 1e-5, res, relu)
    assert y.dtype == dtype and y.stride() == x.stride()
    assert_close(y, expected, name="y")


def test_batch_norm_act_no_affine_no_running_stats():
    x = make_input((2, 9, 3, 3), torch.float32, channels_last=True)
    check_batch_norm_act(x, None, None, None, None, True, None, True)


def test_batch_norm_act_large_mean_is_accurate():
    """Mean 1e3, std 1: E[x^2] - E[x]^2 in fp32 would lose the variance."""
    shape = (8, 16, 8, 8)
    x = make_input(shape, torch.float32, channels_last=True, mean=1e3, std=1.0, requires_grad=False)
    running_mean, running_var, weight, bias = bn_state(16, affine=True)
    exact_mean, exact_var = running_mean.double(), running_var.double()
    y = batch_norm_act(x, running_mean, running_var, weight, bias, True, 1.0, 1e-5, None, False)
    exact = torch.nn.functional.batch_norm(
        x.double(), exact_mean, exact_var, weight.double(), bias.double(), True, 1.0, 1e-5
    )
    assert_close(y.double(), exact, atol=1e-3, rtol=1e-3, name="y")
    assert_close(running_mean.double(), exact_mean, atol=1e-3, rtol=0, name="running_mean")
    assert_close(running_var.double(), exact_var, atol=0, rtol=1e-3, name="running_var")


def test_batch_norm_act_errors_like_pytorch():
    x = make_input((1, 4, 1, 1), torch.float32, channels_last=True)
    running_mean, running_var, weight, bias = bn_state(4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        batch_norm_act(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="must be given when training=False"):
        batch_norm_act(x, None, None, weight, bias, False, 0.1, 1e-5)
    with pytest.raises(ValueError, match=r"running_var must have shape \(4,\)"):
        batch_norm_act(x, running_mean, running_var[:3], weight, bias, False, 0.1, 1e-5)


# ---------------------------------------------------------------------------
# Custom-op registration, torch.compile, random shapes
# ---------------------------------------------------------------------------


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT
    dispatch of every op: what torch.compile relies on."""
    x = make_input((2, 8, 3, 3), torch.float32, channels_last=True)
    weight, bias = channel_vector(8, low=0.5, high=2.0), channel_vector(8)
    res = make_input((2, 8, 3, 3), torch.float32, channels_last=True)
    center = torch.randn(8, device=DEVICE)
    ops = torch.ops.fastresnet
    grad_y = torch.randn_like(x)
    mean, invstd = x.detach().mean((0, 2, 3)), torch.rand(8, device=DEVICE) + 0.5
    # The backward ops have no derivative of their own (no double backward).
    xd, wd, bd, rd = (t.detach() for t in (x, weight, bias, res))
    for op, args in [
        (ops.affine_act.default, (x, weight, bias, center, res, True)),
        (ops.affine_act.default, (x, weight, bias, None, None, False)),
        (ops.affine_act_backward.default, (grad_y, xd, wd, bd, center, rd, True, True)),
        (ops.affine_act_backward.default, (grad_y, xd, wd, bd, None, None, True, False)),
        (ops.batch_norm_act_train.default, (x, weight, bias, res, 1e-5, True, "triton")),
        (ops.batch_norm_act_backward.default, (grad_y, xd, wd, bd, rd, mean, invstd, None,
                                               torch.empty(0, dtype=torch.uint8), 0, 1e-5, True,
                                               [True, True, True, True], "triton")),
        (ops.bn_act_stats.default, (x, mean, invstd, weight, bias, res, True)),
    ]:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_ops_compile_fullgraph_on_the_kernel_path():
    """torch.compile(fullgraph=True) over the custom ops themselves: same outputs,
    gradients and running statistics as eager (which runs the same ops). On the CPU the kernels run in the interpreter under
    the aot_eager backend (Inductor's build would take ~30 s here)."""

    def train_then_eval(x, running_mean, running_var, weight, bias, residual):
        y = batch_norm_act(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5, residual, True)
        return batch_norm_act(y, running_mean, running_var, weight, bias, False, 0.1, 1e-5, None, False)

    shape = (2, 8, 4, 4)
    x = make_input(shape, torch.float32, channels_last=True)
    res = make_input(shape, torch.float32, channels_last=True)
    running_mean, running_var, weight, bias = bn_state(8)
    eager_stats = (running_mean.clone(), running_var.clone())
    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    compiled = torch.compile(train_then_eval, fullgraph=True, backend=backend)
    y = compiled(x, running_mean, running_var, weight, bias, res)
    expected = train_then_eval(x, *eager_stats, weight, bias, res)
    assert_close(y, expected, name="y")
    assert_close(running_mean, eager_stats[0], name="running_mean")
    assert_close(running_var, eager_stats[1], name="running_var")
    grad_y = torch.randn_like(y)
    for a, e in zip(grads_of(y, [x, weight, bias, res], grad_y), grads_of(expected, [x, weight, bias, res], grad_y)):
        assert_close(a, e, name="grad")


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True)
@hypothesis.given(
    n=st.integers(1, 3),
    c=st.integers(1, 40),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    training=st.booleans(),
    residual=st.booleans(),
    relu=st.booleans(),
    channels_last=st.booleans(),
)
def test_batch_norm_act_random_shapes(n, c, h, w, training, residual, relu, channels_last):
    hypothesis.assume(not training or n * h * w > 1)
    x = make_input((n, c, h, w), torch.float32, channels_last=channels_last)
    res = make_input((n, c, h, w), torch.float32, channels_last=True) if residual else None
    # Few values per channel make BatchNorm's gradient ill-conditioned: scale the tolerance.
    check_batch_norm_act(x, *bn_state(c), training, res, relu, grad_tol=(1e-3, 1e-3))


# ---------------------------------------------------------------------------
# GPU only: real ResNet-50 stage shapes, bf16, compiled Triton path
# ---------------------------------------------------------------------------


def assert_relative_error(actual, expected, tol, name):
    """||actual - expected|| <= tol * ||expected||: robust to the rare element
    whose pre-activation is within rounding of 0, where the ReLU mask of the
    kernel and the reference may differ (expected a few times per million)."""
    error = relative_error(actual, expected)
    assert error <= tol, f"{name}: relative error {error:.3e} > {tol:g}"


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14), (8, 2048, 7, 7)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_resnet50_shapes(shape, dtype):
    x = make_input(shape, dtype, channels_last=True, mean=0.5, std=2.0)
    res = make_input(shape, dtype, channels_last=True)
    # Without ReLU every element must match; with it, millions of elements make
    # a few rounding-level mask differences likely, so compare norms.
    check_batch_norm_act(x, *bn_state(shape[1]), True, res, False)
    check_batch_norm_act(x, *bn_state(shape[1]), False, res, False)
    with torch.no_grad():  # inference: the kernel that folds the running statistics itself
        state = bn_state(shape[1])
        y = batch_norm_act(x, *state, False, 0.1, 1e-5, res, True)
        assert_relative_error(y, batch_norm_act_reference(x, *state, False, 0.1, 1e-5, res, True), 1e-2, "eval y")
    running_mean, running_var, weight, bias = bn_state(shape[1])
    y = batch_norm_act(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5, res, True)
    expected = batch_norm_act_reference(
        x, running_mean.clone(), running_var.clone(), weight, bias, True, 0.1, 1e-5, res, True
    )
    assert_relative_error(y, expected, 1e-2, "y")
    grad_y = torch.randn_like(y)
    inputs = [x, weight, bias, res]
    for name, a, e in zip(["x", "weight", "bias", "residual"], grads_of(y, inputs, grad_y), grads_of(expected, inputs, grad_y)):
        assert_relative_error(a, e, 1e-2, f"grad {name}")


@pytest.mark.cuda
def test_gpu_large_mean_many_rows():
    """Mean 1e3 over 256*56*56 rows: the partial/merge scheme at full size."""
    x = make_input((256, 64, 56, 56), torch.float32, channels_last=True, mean=1e3, requires_grad=False)
    running_mean, running_var, weight, bias = bn_state(64)
    exact_mean, exact_var = running_mean.double(), running_var.double()
    y = batch_norm_act(x, running_mean, running_var, weight, bias, True, 1.0, 1e-5, None, False)
    exact = torch.nn.functional.batch_norm(
        x.double(), exact_mean, exact_var, weight.double(), bias.double(), True, 1.0, 1e-5
    )
    assert_close(y.double(), exact, atol=1e-3, rtol=1e-3, name="y")
    assert_close(running_var.double(), exact_var, atol=0, rtol=1e-3, name="running_var")


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


@pytest.mark.cuda
def test_gpu_compiled_fused_resnet_bf16():
    """torchvision ResNet-50 layout (one block per stage) fused, compiled with
    fullgraph=True on the Triton path, bf16 autocast. Two bf16 runs differ from
    each other by their rounding (up to ~25% in the stem's weight gradient at
    random init), so each is compared with the fp32 model instead: the fused
    error may be at most twice eager bf16's own error plus a small floor.
    (On the CPU, compiled with aot_eager over the interpreter, the fused model
    matches fp32 to 6e-6 and its fp16 error equals eager fp16's.)"""
    import copy

    from torchvision.models import resnet as tv_resnet

    from fastresnet import convert

    reference = tv_resnet.ResNet(tv_resnet.Bottleneck, [1, 1, 1, 1]).cuda().to(memory_format=torch.channels_last)
    fused = torch.compile(convert(copy.deepcopy(reference), mode="bn_act"), fullgraph=True)
    eager_bf16 = copy.deepcopy(reference)
    x = make_input((16, 3, 128, 128), torch.float32, channels_last=True, requires_grad=False)

    def run(model, autocast):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        y.float().square().mean().backward()
        return y.float(), [p.grad for p in model.parameters()]

    y32, grads32 = run(reference, False)
    y_fused, grads_fused = run(fused, True)
    y_eager, grads_eager = run(eager_bf16, True)
    names = ["logits"] + [name for name, _ in reference.named_parameters()]
    for name, fused_value, eager_value, exact in zip(
        names, [y_fused, *grads_fused], [y_eager, *grads_eager], [y32, *grads32]
    ):
        fused_error, eager_error = relative_error(fused_value, exact), relative_error(eager_value, exact)
        assert fused_error <= 2 * eager_error + 1e-2, (
            f"{name}: fused bf16 error {fused_error:.3e} vs fp32 > 2 x eager bf16's {eager_error:.3e} + 1e-2"
        )


def test_many_programs_and_partials(monkeypatch):
    """Small blocks force what a GPU does at full size: many row ranges merged
    by _bn_stats_finalize, loops over several tiles, tiles straddling images,
    channel blocks with a ragged end."""
    from fastresnet.kernels import bn_act as kernels
    from fastresnet.kernels import bn_stats

    block_m, block_c, rows_per_program = 16, 8, 32

    def small_plan(x, tile_elements=None):
        rows_total = x.shape[0] * x.shape[2] * x.shape[3]
        return -(-rows_total // rows_per_program), rows_per_program, block_m, block_c, 4

    monkeypatch.setattr(kernels, "_reduction_plan", small_plan)
    monkeypatch.setattr(bn_stats, "_reduction_plan", small_plan)
    monkeypatch.setattr(kernels, "_elementwise_blocks", lambda x: (block_m, block_c, 4))
    shape = (3, 11, 5, 5)  # 75 rows in 3 ranges of 2 tiles: ranges and tiles end mid-image
    x = make_input(shape, torch.float32, channels_last=True, mean=1e3)
    res = make_input(shape, torch.float32, channels_last=False)
    # relu=False: at mean 1e3 the fp32 reference's own error (~1e-4) can flip a ReLU mask.
    check_batch_norm_act(x, *bn_state(11), True, res, False, grad_tol=(1e-3, 1e-3), out_tol=(1e-3, 1e-3))
    scale, shift = channel_vector(11), channel_vector(11)
    y = affine_act(x, scale, shift, res, True, center=torch.full((11,), 1e3))
    grad_y = torch.randn_like(y)
    expected = affine_act_reference(x, scale, shift, res, True, center=torch.full((11,), 1e3))
    assert_close(y, expected, atol=1e-3, rtol=1e-3, name="affine y")
    for a, e in zip(grads_of(y, [x, scale, shift], grad_y), grads_of(expected, [x, scale, shift], grad_y)):
        assert_close(a, e, atol=1e-2, rtol=1e-3, name="affine grad")


# ---------------------------------------------------------------------------
# Dispatch between the fused kernels and eager PyTorch (measured on a GPU)
# ---------------------------------------------------------------------------


@pytest.fixture
def measured_on_cpu(fake_gpu_timing, monkeypatch):
    """Let the CPU choose as a GPU does (conftest's fake_gpu_timing): each candidate runs once and the
    path named in `winners[op]` is 'faster', eager by default. Yields the FakeTiming record."""
    monkeypatch.delenv("FASTRESNET_DISPATCH", raising=False)
    fake_gpu_timing.default = "eager"
    return fake_gpu_timing


def timed_ops(fake):
    return [op.removeprefix("batch_norm_act.") for op, _ in fake.timed]


def check_inference(x, running_mean, running_var, weight, bias):
    """Eval without gradients (the inference path) against the reference."""
    with torch.no_grad():
        y = batch_norm_act(x, running_mean, running_var, weight, bias, False, 0.1, 1e-5, None, True)
        expected = batch_norm_act_reference(x, running_mean, running_var, weight, bias, False, 0.1, 1e-5, None, True)
    assert_close(y, expected, name="inference y")


class PathsRun(TorchDispatchMode):
    """The fastresnet custom ops called, each with the path it was given ("-" for the one-path ops)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastresnet":
            path = args[-1] if isinstance(args[-1], str) else "-"
            self.calls.append(f"{func._schema.name.removeprefix('fastresnet::')}:{path}")
        return func(*args, **(kwargs or {}))


def forward_paths(x) -> list[str]:
    """The training forwards that can run x, experimental ones included where the switch is on."""
    from fastresnet.ops import bn_act as ops

    return ops.BN_FORWARD._applying((x,), tuning.settings().experimental)


def test_dispatch_defaults_follow_h200_numbers():
    from fastresnet.ops import bn_act as ops

    for (n, c, h, w), expected in [((256, 256, 56, 56), "triton"), ((256, 1024, 14, 14), "triton"),
                                   ((256, 2048, 7, 7), "eager"), ((4, 64, 8, 8), "eager")]:
        assert ops.default_forward(torch.empty(n, c, h, w, device="meta"), True) == expected, (n, c, h, w)
    # eval: the pass that has run on a GPU (the one-launch kernel has not: it waits on the experimental shelf)
    assert ops.default_forward(torch.empty(256, 2048, 7, 7, device="meta"), False) == "triton"
    assert ops.DEFAULT_BACKWARD == "eager"  # the kernels' backward lost at every stage (run 2)


def check_chosen_separately(fake, forward, backward, affine, residual, relu):
    """Every pairing of forward and backward path gives the reference's output,
    running statistics and gradients: both forwards leave the same mean/invstd.
    The forward is timed alone at the first call, the backward alone at the
    first backward (after this forward, then after each other one), then each
    forward with its best backward as one step; later calls time nothing."""
    fake.winners.update({"batch_norm_act.forward": forward, "batch_norm_act.backward": backward,
                         "batch_norm_act.step": forward})
    shape = (2, 12, 3, 3)
    x = make_input(shape, torch.float32, channels_last=True, mean=0.5, std=2.0)
    res = make_input(shape, torch.float32, channels_last=True) if residual else None
    forwards = forward_paths(x)
    for _ in range(2):
        check_batch_norm_act(x, *bn_state(12, affine=affine), True, res, relu)
    grads = "1" + ("11" if affine else "00") + ("1" if residual else "0")
    others = [name for name in forwards if name != forward]
    keys = [key for _, key in fake.timed]
    assert timed_ops(fake) == ["forward"] + ["backward"] * len(forwards) + ["step"]
    assert [k.split(":")[-2] for k in keys[1:-1]] == [f"after-{name}" for name in [forward, *others]]
    assert all(k.endswith(f":grads{grads}") for k in keys[1:])
    assert {entry["key"]: entry["choice"] for entry in tuning.decisions()} == dict(
        zip(keys, [forward] + [backward] * len(forwards) + [forward])
    )


@pytest.mark.parametrize("forward,backward", [("triton", "triton"), ("triton", "eager"), ("eager", "triton"),
                                              ("eager", "eager")])
@pytest.mark.parametrize("affine,residual,relu", [(True, True, True), (False, False, False)])
def test_forward_and_backward_chosen_separately(measured_on_cpu, forward, backward, affine, residual, relu):
    check_chosen_separately(measured_on_cpu, forward, backward, affine, residual, relu)


def test_training_step_overrules_the_forward_alone(measured_on_cpu, monkeypatch):
    """When the kernels' forward wins alone but eager's forward + backward make
    the faster step, later calls with gradients run eager's forward (and the
    backward already chosen after it); forward-only calls keep the kernels."""
    from fastresnet.ops import bn_act as ops

    fake = measured_on_cpu
    fake.winners.update({"batch_norm_act.forward": "triton", "batch_norm_act.backward": "eager",
                         "batch_norm_act.step": "eager"})
    used = []
    chosen = ops._training_paths

    def recording(*args):
        forward, plain = chosen(*args)
        used.append(forward)
        return forward, plain

    monkeypatch.setattr(ops, "_training_paths", recording)
    shape = (2, 6, 3, 3)
    x = make_input(shape, torch.float32, channels_last=True)
    state = bn_state(6)
    check_batch_norm_act(x, *state, True, None, True)
    timed = len(fake.timed)
    used.clear()
    check_batch_norm_act(x, *state, True, None, True)
    with torch.no_grad():
        batch_norm_act(x, *state, True, 0.1, 1e-5, None, True)
    assert used == ["eager", "triton"] and len(fake.timed) == timed


def test_failing_step_timing_keeps_the_forward(measured_on_cpu, monkeypatch):
    """A path that raises while the training step is timed (say, an unsupported
    cuDNN configuration) is logged and skipped: the call still trains right."""
    from fastresnet.ops import bn_act as ops

    run = ops._training_run

    def broken_eager(x, weight, bias, residual, eps, relu, forward):
        if forward == "eager":
            raise RuntimeError("unsupported configuration")
        return run(x, weight, bias, residual, eps, relu, forward)

    measured_on_cpu.winners.update({"batch_norm_act.forward": "triton", "batch_norm_act.backward": "triton"})
    x = make_input((2, 6, 3, 3), torch.float32, channels_last=True)
    monkeypatch.setattr(ops, "_training_run", broken_eager)
    check_batch_norm_act(x, *bn_state(6), True, None, True)
    assert list(ops.BN_STEP.memo.values()) == ["triton"]


def test_dispatch_switch_forces_a_path(measured_on_cpu, monkeypatch):
    """FASTRESNET_DISPATCH=batch_norm_act=triton (or =eager) runs that path in every stage, untimed:
    the kernels (the eval pass through affine_act), or ATen's BatchNorm (no fastresnet op in eval)."""
    x = make_input((2, 5, 2, 2), torch.float32, channels_last=True)
    used = {}
    for mode in ("triton", "eager"):
        monkeypatch.setenv("FASTRESNET_DISPATCH", f"batch_norm_act={mode}")
        tuning.clear()  # the switch is read when a problem is first met
        with PathsRun() as training:
            check_batch_norm_act(x, *bn_state(5), True, None, True)
        with PathsRun() as inference:
            check_inference(x, *bn_state(5))
        used[mode] = training.calls + inference.calls
    assert used == {"triton": ["batch_norm_act_train:triton", "batch_norm_act_backward:triton", "affine_act:-"],
                    "eager": ["batch_norm_act_train:eager", "batch_norm_act_backward:eager"]}
    assert not tuning.decisions()  # nothing timed


def test_a_pin_for_one_stage_leaves_the_others_measured(measured_on_cpu):
    """batch_norm_act.backward=triton pins the backward only: the forward and the step are still timed."""
    tuning.override("batch_norm_act.backward=triton")
    measured_on_cpu.winners.update({"batch_norm_act.forward": "eager", "batch_norm_act.step": "eager"})
    x = make_input((2, 6, 3, 3), torch.float32, channels_last=True)
    check_batch_norm_act(x, *bn_state(6), True, None, True)
    assert timed_ops(measured_on_cpu) == ["forward", "step"]
    from fastresnet.ops import bn_act as ops

    assert set(ops.BN_BACKWARD.memo.values()) == {"triton"}


def test_eval_is_dispatched_per_shape(measured_on_cpu):
    """Inference (no gradient) and eval with gradients are their own problems,
    timed per shape; the eager path gives F.batch_norm's result."""
    fake = measured_on_cpu
    fake.winners.update({"batch_norm_act.eval": "eager", "batch_norm_act.eval_grad": "triton"})
    state = bn_state(6)
    for shape in ((2, 6, 3, 3), (1, 6, 2, 2)):
        x = make_input(shape, torch.float32, channels_last=True)
        check_inference(x, *state)
    check_batch_norm_act(x, *state, False, None, True)  # with gradients
    assert timed_ops(fake) == ["eval", "eval", "eval_grad"]
    assert [entry["choice"] for entry in tuning.decisions()] == ["eager", "eager", "triton"]


def test_a_default_run_times_only_the_main_trees_paths(measured_on_cpu):
    """Without FASTRESNET_EXPERIMENTAL the shelf's variants are not even timed (tests/experimental has them
    compete with the switch on)."""
    x = make_input((2, 96, 3, 3), torch.float32, channels_last=True)
    check_batch_norm_act(x, *bn_state(96), True, None, True)
    check_inference(x, *bn_state(96))
    timed = {name for entry in tuning.decisions() for name in entry["times_ms"]}
    assert timed == {"triton", "eager"}


def test_timing_leaves_the_random_stream_alone(measured_on_cpu):
    """The first call of a problem times its paths; a run whose choices come from the disk cache must
    draw the same random numbers afterwards, so no candidate may draw any (eval with gradients did)."""
    x = make_input((2, 6, 3, 3), torch.float32, channels_last=True)
    state, train_state = bn_state(6), bn_state(6)
    before = torch.get_rng_state()
    batch_norm_act(x, *state, False, 0.1, 1e-5, None, True).sum().backward()  # eval_grad, timed
    y = batch_norm_act(x, *train_state, True, 0.1, 1e-5, None, True)  # forward, then backward and step
    y.sum().backward()
    assert torch.equal(torch.get_rng_state(), before)


class CountOps(TorchDispatchMode):
    """The ATen (and fastresnet) ops a call issues, each custom op counted as one."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class Launcher:
    """A kernel that records its launch instead of running."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(self.name)


def test_training_fast_path_issues_few_ops(monkeypatch):
    """Host time decides the small stages: once the dispatch has decided, a training forward of
    BatchNormAct2d on the kernel path launches the statistics pass, its finalize and the one
    normalisation pass, and issues at most eight ops (its buffers and the running-statistics update)."""
    from fastresnet.kernels import bn_act as kernels
    from fastresnet.kernels import bn_stats
    from fastresnet.nn import BatchNormAct2d

    launches = []
    for module, name in ((bn_stats, "_bn_stats_partial"), (bn_stats, "_bn_stats_finalize"),
                         (kernels, "_affine_act_fwd")):
        monkeypatch.setattr(module, name, Launcher(name, launches))
    bn = BatchNormAct2d(8).to(DEVICE)
    x = make_input((2, 8, 3, 3), torch.float32, channels_last=True, requires_grad=False)
    res = make_input((2, 8, 3, 3), torch.float32, channels_last=True, requires_grad=False)
    with torch.no_grad():
        bn(x, res)  # the first call decides the path
        launches.clear()
        with CountOps() as counted:
            bn(x, res)
        assert len(counted.ops) <= 8, "\n".join(counted.ops)
        assert launches == ["_bn_stats_partial", "_bn_stats_finalize", "_affine_act_fwd"]


def test_dispatch_is_traceable_and_never_times_under_compile(measured_on_cpu):
    """fullgraph=True: a problem seen eagerly keeps its choice; an unseen one
    takes the compile rule (Inductor's code, the eager path traced); nothing is timed."""
    running_mean, running_var, weight, bias = bn_state(6)

    def step(x, res):
        return batch_norm_act(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5, res, True)

    seen = make_input((2, 6, 3, 3), torch.float32, channels_last=True)
    grads_of(step(seen, None), [seen, weight], torch.randn_like(seen))
    timed = len(measured_on_cpu.timed)
    assert timed == 1 + len(forward_paths(seen)) + 1  # forward; backward after each forward; the step
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    unseen = make_input((3, 6, 2, 2), torch.float32, channels_last=True)
    res = make_input((3, 6, 2, 2), torch.float32, channels_last=True)
    for x, r in ((seen, None), (unseen, res)):
        y = compiled(x, r)
        expected = batch_norm_act_reference(x, None, None, weight, bias, True, 0.1, 1e-5, r, True)
        assert_close(y, expected, name="compiled y")
        grads_of(y, [x, weight], torch.randn_like(y))
    assert len(measured_on_cpu.timed) == timed


def compiled_path(x, wanted, monkeypatch) -> str:
    """What batch_norm_act traces for a training call of x under torch.compile: "triton" (the custom ops) or
    "eager" (ATen's code)."""
    from fastresnet.ops import bn_act as ops

    with monkeypatch.context() as patch:
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        forward, plain = ops._training_paths(ops._problem(x, None, True), wanted, x, None, None, None, 1e-5, True)
    return "eager" if plain else forward


def test_compiled_path_needs_the_kernels_chosen_for_every_stage(measured_on_cpu, monkeypatch):
    """Inside torch.compile the kernels (custom ops) are traced only where eager
    calls chose them for the forward and for the backward that follows it."""
    fake = measured_on_cpu
    x = make_input((2, 4, 2, 2), torch.float32, channels_last=True)
    running_mean, running_var, weight, bias = bn_state(4)
    needs = (True, True, True, False)
    assert compiled_path(x, needs, monkeypatch) == "eager"  # nothing measured yet
    fake.winners.update({"batch_norm_act.forward": "triton", "batch_norm_act.backward": "eager"})
    grads_of(batch_norm_act(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5), [x, weight, bias],
             torch.randn_like(x))
    assert compiled_path(x, needs, monkeypatch) == "eager"  # the backward chose eager
    assert compiled_path(x, (False,) * 4, monkeypatch) == "triton"  # forward only
    fake.winners.update({"batch_norm_act.backward": "triton", "batch_norm_act.step": "triton"})
    other = make_input((3, 4, 2, 2), torch.float32, channels_last=True)  # a new problem
    grads_of(batch_norm_act(other, running_mean, running_var, weight, bias, True, 0.1, 1e-5), [other, weight, bias],
             torch.randn_like(other))
    assert compiled_path(other, needs, monkeypatch) == "triton"


@pytest.mark.cuda
@pytest.mark.parametrize("training", [True, False])
def test_gpu_dispatch_measures_and_runs_the_faster_path(tmp_path, monkeypatch, training):
    """On the GPU every candidate of the main tree is timed at a real ResNet-50 shape (bf16), the choices
    are logged with their times, and the result is right whichever won (tests/experimental: the same with
    the shelf's candidates)."""
    check_gpu_dispatch(tmp_path, monkeypatch, training)


def check_gpu_dispatch(tmp_path, monkeypatch, training):
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTRESNET_DISPATCH", raising=False)
    tuning.clear()
    shape = (32, 1024, 14, 14)
    x = make_input(shape, torch.bfloat16, channels_last=True)
    res = make_input(shape, torch.bfloat16, channels_last=True)
    running_mean, running_var, weight, bias = bn_state(shape[1])
    ref_stats = (running_mean.clone(), running_var.clone())
    y = batch_norm_act(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5, res, True)
    # Judged against the fp32 truth, beside the bf16 reference's own error (two bf16
    # computations differ from each other by more than either differs from the truth).
    stats_exact = (ref_stats[0].clone(), ref_stats[1].clone())
    expected = batch_norm_act_reference(x, *ref_stats, weight, bias, training, 0.1, 1e-5, res, True)
    x32, res32 = (t.detach().float().requires_grad_() for t in (x, res))
    exact = batch_norm_act_reference(x32, *stats_exact, weight, bias, training, 0.1, 1e-5, res32, True)
    assert_as_accurate_as(y, expected, exact, name="y")
    assert_close(running_mean, ref_stats[0], atol=1e-3, rtol=1e-3, name="running_mean")
    grad_y = torch.randn_like(y)
    names = ["x", "weight", "bias", "residual"]
    actual_grads = grads_of(y, [x, weight, bias, res], grad_y)
    expected_grads = grads_of(expected, [x, weight, bias, res], grad_y)
    exact_grads = grads_of(exact, [x32, weight, bias, res32], grad_y.float())
    for name, a, e, t in zip(names, actual_grads, expected_grads, exact_grads):
        assert_as_accurate_as(a, e, t, name=f"grad {name}")
    entries = tuning.decisions()
    print("dispatch decisions:", entries)
    from fastresnet.ops import bn_act as ops

    shelf = tuning.settings().experimental
    forwards = set(forward_paths(x))
    ops_timed = [entry["op"].removeprefix("batch_norm_act.") for entry in entries]
    assert ops_timed == (["forward"] + ["backward"] * len(forwards) + ["step"] if training else ["eval_grad"])
    candidates = {"forward": forwards, "backward": set(ops.BN_BACKWARD.offered(shelf)), "step": forwards,
                  "eval_grad": {"triton", "eager"}}
    for op, entry in zip(ops_timed, entries):
        assert set(entry["times_ms"]) == candidates[op] and entry["source"] == "measured", entry


def check_mixed_paths_bf16(fake, forward, backward):
    """One forward followed by another's backward, at a ResNet-50 shape in bf16: as accurate as PyTorch's
    own bf16 against the fp32 truth (the mean/invstd handoff and, after cuDNN, its backend index and reserve
    space)."""
    fake.winners.update({"batch_norm_act.forward": forward, "batch_norm_act.backward": backward})
    shape = (16, 512, 28, 28)
    x = make_input(shape, torch.bfloat16, channels_last=True)
    res = make_input(shape, torch.bfloat16, channels_last=True)
    running_mean, running_var, weight, bias = bn_state(shape[1])
    stats = [(running_mean.clone(), running_var.clone()) for _ in range(2)]
    y = batch_norm_act(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5, res, True)
    expected = batch_norm_act_reference(x, *stats[0], weight, bias, True, 0.1, 1e-5, res, True)
    x32, res32 = (t.detach().float().requires_grad_() for t in (x, res))
    exact = batch_norm_act_reference(x32, *stats[1], weight, bias, True, 0.1, 1e-5, res32, True)
    assert_as_accurate_as(y, expected, exact, name="y")
    assert_close(running_var, stats[1][1], atol=1e-3, rtol=1e-3, name="running_var")
    grad_y = torch.randn_like(y)
    for name, a, e, t in zip(
        ["x", "weight", "bias", "residual"],
        grads_of(y, [x, weight, bias, res], grad_y),
        grads_of(expected, [x, weight, bias, res], grad_y),
        grads_of(exact, [x32, weight, bias, res32], grad_y.float()),
    ):
        assert_as_accurate_as(a, e, t, name=f"grad {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("forward,backward", [("triton", "eager"), ("eager", "triton")])
def test_gpu_mixed_paths_bf16(measured_on_cpu, forward, backward):
    """cuDNN's forward followed by the kernels' backward, and the kernels' forward followed by ATen's
    native backward (tests/experimental: the shelf's pipelined backward and one-launch forward)."""
    check_mixed_paths_bf16(measured_on_cpu, forward, backward)
