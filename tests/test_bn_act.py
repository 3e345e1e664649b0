"""fastresnet.ops.bn_act against fastresnet.reference: outputs, every gradient,
running statistics; channels_last and NCHW; residual and ReLU on and off.

Without a GPU the Triton kernels run through the interpreter (tests/conftest.py),
so shapes are ResNet stage shapes scaled down, plus odd ones.
"""

import pytest
import torch

from fastresnet.ops.bn_act import affine_act, batch_norm_act
from fastresnet.reference import affine_act_reference, batch_norm_act_reference
from fastresnet.testing import assert_close

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
