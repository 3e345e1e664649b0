"""The model zoo against the paper's tables and torchvision's weights."""

import math
import operator

import pytest
import torch
import torchvision
from torch import nn

from fastresnet.flops import count_macs, count_params
from fastresnet.models import (
    BasicBlock,
    Bottleneck,
    ZeroPadShortcut,
    get_model,
    list_models,
    model_options,
    model_spec,
)

IMAGENET_DEPTHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]

# Table 6 of the paper: CIFAR-10 parameter counts.
PAPER_CIFAR_PARAMS = {
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet44": 0.66e6,
    "resnet56": 0.85e6,
    "resnet110": 1.7e6,
    "resnet1202": 19.4e6,
}

# Table 1 of the paper: multiply-adds at 224x224 with the v1 (stride in 1x1) layout.
PAPER_IMAGENET_MACS = {
    "resnet18": 1.8e9,
    "resnet34": 3.6e9,
    "resnet50": 3.8e9,
    "resnet101": 7.6e9,
    "resnet152": 11.3e9,
}


def _v1(name):
    return {"stride_in_1x1": True} if name in ("resnet50", "resnet101", "resnet152") else {}


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


def _count_additions(model):
    """Additions in the traced graph: one per residual block, none in a plain net."""
    graph = torch.fx.symbolic_trace(model).graph
    adds = {operator.add, operator.iadd, torch.add}
    return sum(1 for node in graph.nodes if node.op == "call_function" and node.target in adds)


@pytest.mark.parametrize("name", IMAGENET_DEPTHS)
def test_torchvision_state_dict_loads_strictly_and_outputs_are_identical(name):
    reference = getattr(torchvision.models, name)(weights=None).eval()
    ours = get_model(name).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))


def test_our_state_dict_loads_into_torchvision():
    ours = get_model("resnet50")
    torchvision.models.resnet50(weights=None).load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("name", IMAGENET_DEPTHS)
def test_imagenet_parameter_counts_equal_torchvision(name):
    expected = count_params(getattr(torchvision.models, name)(weights=None))
    assert count_params(get_model(name)) == expected


@pytest.mark.parametrize("name,paper", sorted(PAPER_CIFAR_PARAMS.items()))
def test_cifar_parameter_counts_match_table6(name, paper):
    assert abs(count_params(get_model(name)) - paper) / paper < 0.02


@pytest.mark.parametrize("name,paper", sorted(PAPER_IMAGENET_MACS.items()))
def test_imagenet_multiply_adds_match_table1(name, paper):
    macs = count_macs(get_model(name, **_v1(name)), (3, 224, 224))
    assert abs(macs - paper) / paper < 0.03


def test_torchvision_layout_costs_more_than_the_papers():
    # PAPER.md: v1.5 moves the stride to the 3x3 conv, 4.09 G for ResNet-50.
    macs = count_macs(get_model("resnet50"), (3, 224, 224))
    assert abs(macs - 4.09e9) / 4.09e9 < 0.01


def test_stride_in_1x1_moves_the_stride():
    v1, v15 = get_model("resnet50", stride_in_1x1=True), get_model("resnet50")
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)
    with pytest.raises(ValueError, match="stride_in_1x1"):
        get_model("resnet18", stride_in_1x1=True)


@pytest.mark.parametrize("name", list_models())
def test_output_shape(name):
    if name == "resnet1202":
        pytest.skip("covered by the forward/backward test at batch 2")
    spec = model_spec(name)
    model = get_model(name, num_classes=7).eval()
    size = 64 if spec.dataset == "imagenet" else 32
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_channels_last(name):
    spec = model_spec(name)
    model = get_model(name).to(memory_format=torch.channels_last)
    size = 64 if spec.dataset == "imagenet" else 32
    x = torch.randn(2, 3, size, size).to(memory_format=torch.channels_last)
    out = model(x)
    out.float().pow(2).mean().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["plain18", "plain34", "plain20", "plain56"])
def test_plain_nets_have_no_shortcuts_and_no_additions(name):
    model = get_model(name)
    assert all(block.downsample is None and not block.residual for block in _blocks(model))
    assert not any("downsample" in key for key in model.state_dict())
    assert _count_additions(model) == 0


@pytest.mark.parametrize("name", ["resnet18", "resnet20"])
def test_residual_nets_add_once_per_block(name):
    model = get_model(name)
    assert _count_additions(model) == len(_blocks(model))


@pytest.mark.parametrize("depth", [20, 56])
def test_cifar_option_a_is_parameter_free(depth):
    residual, plain = get_model(f"resnet{depth}"), get_model(f"plain{depth}")
    shortcuts = [m for m in residual.modules() if isinstance(m, ZeroPadShortcut)]
    assert len(shortcuts) == 2  # the first block of stages 2 and 3
    assert all(count_params(s) == 0 for s in shortcuts)
    assert count_params(residual) == count_params(plain)


def test_option_a_pads_zero_channels_and_subsamples():
    shortcut = ZeroPadShortcut(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    y = shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0


def test_shortcut_options_b_and_c():
    def projections(model):
        return sum(isinstance(b.downsample, nn.Sequential) for b in _blocks(model))

    b, c = get_model("resnet34", shortcut="B"), get_model("resnet34", shortcut="C")
    assert projections(b) == 3  # where the shape changes: conv3_1, conv4_1, conv5_1
    assert projections(c) == len(_blocks(c))  # every block
    a = get_model("resnet34", shortcut="A")
    assert count_params(a) == count_params(get_model("plain34"))
    assert projections(get_model("resnet20", shortcut="B")) == 2


def test_he_initialisation():
    model = get_model("resnet56")
    conv = model.layer3[4].conv2
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    std = conv.weight.std().item()
    assert abs(std - math.sqrt(2.0 / fan_out)) / math.sqrt(2.0 / fan_out) < 0.1


@pytest.mark.parametrize("name", ["resnet50", "resnet20"])
def test_zero_init_residual(name):
    model = get_model(name, zero_init_residual=True)
    assert all(torch.count_nonzero(block.last_bn().weight) == 0 for block in _blocks(model))


def test_norm_layer_is_used():
    model = get_model("resnet18", norm_layer=lambda c: nn.GroupNorm(8, c))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet18.*resnet1202"):
        get_model("resnet19")


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown option.*widht.*valid options:.*shortcut"):
        get_model("resnet20", widht=2)
    assert "stride_in_1x1" in model_options("resnet50")
    assert "block" not in model_options("resnet50")


def test_bad_shortcut_names_the_choices():
    with pytest.raises(ValueError, match="unknown shortcut option 'D'; choose one of A, B, C"):
        get_model("resnet20", shortcut="D")


def test_list_models_by_dataset():
    assert set(list_models("imagenet")) == set(IMAGENET_DEPTHS) | {"plain18", "plain34"}
    assert "resnet1202" in list_models("cifar10") and "plain110" in list_models("cifar10")
