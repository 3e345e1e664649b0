"""fold_bn and convert(mode="inference") on torchvision, timm and fastresnet-style models.

Whole models run on the eager reference path here (FASTRESNET_FORCE_REFERENCE=1;
through Triton's interpreter a ResNet-50 would take minutes); the fused blocks
and one ResNet-18 also run through the interpreted kernel.
"""

import copy
from unittest import mock

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

import fastresnet
from fastresnet.models import get_model
from fastresnet.nn import FusedBasicBlock, FusedBottleneck
from fastresnet.testing import assert_close, randomize_bn


@pytest.fixture
def reference_path(monkeypatch):
    monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1")


def relative_error(actual, expected) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def converted_copy(model):
    return fastresnet.convert(copy.deepcopy(model))


def _blocks(model):
    return [m for m in model.modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")]


def assert_same_state_dict(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# wide_resnet50_2 converts the same way (its blocks are torchvision Bottlenecks); left out for test time.
TORCHVISION = ["resnet18", "resnet50", "resnext50_32x4d"]


# ---------------------------------------------------------------------------
# fold_bn
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_fold_bn_torchvision(name):
    model = randomize_bn(getattr(torchvision.models, name)())
    folded = fastresnet.fold_bn(model)
    assert folded.folded_bn_count == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(folded(x), model(x)) < 1e-5
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched


def test_fold_bn_frozen_bn_detection_backbone():
    backbone = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    randomize_bn(backbone)
    folded = fastresnet.fold_bn(backbone)
    assert folded.folded_bn_count == 20
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = backbone(x), folded(x)
    for level in expected:
        assert relative_error(got[level], expected[level]) < 1e-5, level


# ---------------------------------------------------------------------------
# convert: outputs and state_dicts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", TORCHVISION)
def test_convert_torchvision(name, reference_path):
    model = randomize_bn(getattr(torchvision.models, name)())
    converted = converted_copy(model)
    report = converted.fastresnet_report
    blocks = sum(type(m).__name__ in ("BasicBlock", "Bottleneck") for m in model.modules())
    assert [path for path, *_ in report.replaced] == ["conv1"] + [p for p, m in model.named_modules() if m in _blocks(model)]
    assert len(report.replaced) == blocks + 1 and not report.left  # every block, and the stem
    assert_same_state_dict(converted, model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) < 1e-5


@pytest.mark.parametrize("name", ["resnet18", "resnet26d"])  # resnet26d: deep stem, avg-pool downsample
def test_convert_timm(name, reference_path):
    model = randomize_bn(timm.create_model(name, pretrained=False))
    converted = converted_copy(model)
    replaced = [path for path, *_ in converted.fastresnet_report.replaced]
    stem = ["conv1"] if name == "resnet18" else ["conv1.0", "conv1.3"]  # deep stem: its last conv feeds bn1
    assert replaced[: len(stem)] == stem and len(replaced) == len(stem) + 8
    assert_same_state_dict(converted, model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) < 1e-5


def test_convert_faster_rcnn_backbone(reference_path):
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    model.backbone.body = randomize_bn(model.backbone.body)
    # Pretrained detection backbones use FrozenBatchNorm2d; put them in, with the same statistics.
    frozen = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    ).eval()
    frozen.load_state_dict(model.backbone.state_dict(), strict=False)
    for backbone in (model.backbone, frozen):
        converted = converted_copy(backbone)
        assert len(converted.fastresnet_report.replaced) == 17  # the stem and 16 blocks
        assert_same_state_dict(converted, backbone)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            expected, got = backbone(x), converted(x)
        for level in expected:
            assert relative_error(got[level], expected[level]) < 1e-5, level
    whole = converted_copy(model)  # the whole detector: its backbone's blocks are found inside
    paths = [path for path, *_ in whole.fastresnet_report.replaced]
    assert paths[0] == "backbone.body.conv1" and len(paths) == 17
    assert all(path.startswith("backbone.body.layer") for path in paths[1:])


def test_convert_deeplabv3_dilated(reference_path):
    model = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=3, aux_loss=False
    )
    randomize_bn(model)
    converted = converted_copy(model)
    paths = [path for path, *_ in converted.fastresnet_report.replaced]
    assert sum(p.startswith("backbone.") for p in paths) == 17  # the stem and 16 (dilated) blocks
    assert "classifier.1" in paths  # the head's Sequential conv -> BN -> ReLU chains too
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(converted(x)["out"], model(x)["out"]) < 1e-5


def test_checkpoint_loads_and_folded_weights_refresh(reference_path):
    model, other = randomize_bn(torchvision.models.resnet18()), randomize_bn(torchvision.models.resnet18())
    converted = converted_copy(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        converted(x)  # fills the folded-weight caches
        converted.load_state_dict(other.state_dict())  # an original checkpoint, strict
        assert relative_error(converted(x), other(x)) < 1e-5
        converted.layer1[0].bn1.running_var.mul_(2.0)  # an in-place edit of one buffer
        other.layer1[0].bn1.running_var.mul_(2.0)
        assert relative_error(converted(x), other(x)) < 1e-5


@pytest.mark.parametrize("kernel_path", [False, True], ids=["reference", "kernel"])
def test_bn_recalibration_and_data_edits_are_seen(kernel_path, monkeypatch):
    """Nothing folded is kept between eval calls, so nothing goes stale: not after BatchNorm statistics are
    refreshed by train-mode forwards under no_grad (torch.optim.swa_utils.update_bn; BatchNorm's own
    statistics update bumps no version counter), nor after `.data` edits of a weight or a buffer (which
    bypass version counters by design)."""
    if not kernel_path:
        monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1")
    torch.manual_seed(0)
    model = randomize_bn(get_model("resnet20", num_classes=4))
    converted = converted_copy(model)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    loader = [(torch.randn(4, 3, 8, 8) * 2 + 1,) for _ in range(2)]
    with torch.no_grad():
        converted(x)  # the first eval call
        for m in (model, converted):
            torch.optim.swa_utils.update_bn(loader, m)
            m.eval()
        assert relative_error(converted(x), model(x)) < 1e-4, "after update_bn"
        for m in (model, converted):
            m.conv1.weight.data.mul_(3.0)
            m.layer1[0].bn1.running_var.data.mul_(4.0)
            m.layer2[0].conv2.weight.data.mul_(0.5)
        assert relative_error(converted(x), model(x)) < 1e-4, "after .data edits"


def test_dtype_change_after_convert_refreshes_folded_weights(reference_path):
    model = randomize_bn(torchvision.models.resnet18())
    converted = converted_copy(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        converted(x)
        converted.to(torch.bfloat16)
        model.to(torch.bfloat16)
        got, expected = converted(x.bfloat16()), model(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert relative_error(got.float(), expected.float()) < 5e-2


def test_training_mode_runs_the_eager_blocks(reference_path):
    model = randomize_bn(torchvision.models.resnet18()).train()
    converted = converted_copy(model).train()
    x = torch.randn(4, 3, 32, 32)
    assert_close(converted(x), model(x), atol=1e-5, rtol=1e-5)
    assert_close(converted.layer1[0].bn1.running_mean, model.layer1[0].bn1.running_mean, atol=1e-6, rtol=1e-6)
    converted(x).sum().backward()
    assert converted.layer1[0].conv1.weight.grad is not None


def test_eval_with_input_grad_runs_differentiable_path(reference_path):
    model = randomize_bn(torchvision.models.resnet18())
    converted = converted_copy(model)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    out = converted(x)
    assert relative_error(out, model(x)) < 1e-5
    out.sum().backward()
    assert x.grad is not None and converted.conv1.weight.grad is not None


@pytest.mark.parametrize("name", ["resnet20", "plain20"])
def test_convert_fastresnet_zoo(name, reference_path):
    from fastresnet.models import get_model

    model = randomize_bn(get_model(name))
    converted = converted_copy(model)
    assert len(converted.fastresnet_report.replaced) == 10 and not converted.fastresnet_report.left
    assert_same_state_dict(converted, model)
    x = torch.randn(2, 3, 32, 32)
    folded = fastresnet.fold_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) < 1e-5
        assert relative_error(folded(x), model(x)) < 1e-5


def test_unfuse_leaves_a_module_shared_with_another_model_folded_there(reference_path):
    """A folded stem module put into a second converted model: unfusing the second gives it its own class
    there, and the first model, which still holds it, stays converted and still folds."""
    from fastresnet.nn import folded_layers

    stem = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()))
    first, second = fastresnet.convert(copy.deepcopy(stem)), fastresnet.convert(copy.deepcopy(stem))
    second[1] = first[1]
    fastresnet.unfuse(second)
    assert [type(m) for m in second] == [type(m) for m in stem]
    assert [type(m).__name__ for m in first] == ["FoldedConv2d", "FoldedBatchNorm2d", "FoldedReLU"]
    x = torch.randn(1, 3, 6, 6)
    calls = []
    real = folded_layers.conv_bn_act
    with torch.no_grad(), mock.patch.object(folded_layers, "conv_bn_act", lambda *a, **k: calls.append(1) or real(*a, **k)):
        assert relative_error(first(x), stem(x)) < 1e-5 and relative_error(second(x), stem(x)) < 1e-5
    assert len(calls) == 1  # the first model's stem as one op; the second's as three modules


def test_convert_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode='bogus'"):
        fastresnet.convert(torchvision.models.resnet18(), mode="bogus")


def test_unsupported_blocks_are_left_and_named(reference_path):
    model = timm.models.resnet.ResNet(block=timm.models.resnet.BasicBlock, layers=[1, 1, 1, 1], act_layer=nn.SiLU)
    randomize_bn(model)
    converted = converted_copy(model)
    replaced = [path for path, *_ in converted.fastresnet_report.replaced]
    # No block; only the stem (conv + BN: its SiLU runs as it is) and the projection shortcuts'
    # Sequential(conv, bn) inside the left blocks.
    assert replaced == ["conv1", "layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]
    reasons = {path: why for path, _, why in converted.fastresnet_report.left}
    assert "child 'act1' (SiLU)" in reasons["layer1.0"]
    assert "layer1.0" in str(converted.fastresnet_report)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) < 1e-5


@pytest.mark.parametrize("name,num_blocks", [("seresnet50", 16), ("ecaresnet26t", 8)])
def test_squeeze_excite_and_eca_resnets(name, num_blocks, reference_path):
    """timm's most used attention ResNets: every block fused around its attention module, in each mode,
    the state_dict unchanged."""
    model = randomize_bn(timm.create_model(name, pretrained=False))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    for mode in ("inference", "train", "bn_act"):
        converted = fastresnet.convert(copy.deepcopy(model), mode)
        fused = [m for m in converted.modules() if isinstance(m, FusedBottleneck)]
        assert len(fused) == num_blocks and all(type(m.se).__name__ in ("SEModule", "EcaModule") for m in fused)
        assert not [row for row in converted.fastresnet_report.left if row[1] == "Bottleneck"]
        assert_same_state_dict(converted, model)
        with torch.no_grad():
            assert relative_error(converted(x), expected) < 1e-5, mode


# ---------------------------------------------------------------------------
# fastresnet-zoo-style blocks: optional `residual`, parameter-free (option A) shortcut
# ---------------------------------------------------------------------------


class OptionAShortcut(nn.Module):
    """He et al.'s option A: subsample and zero-pad the channels (no parameters)."""

    def __init__(self, out_channels):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - x.shape[1]))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, residual=True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = OptionAShortcut(cout) if stride != 1 else None
        self.residual = residual

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


BasicBlock.__module__ = "fastresnet.models.cifar"  # as if it came from the model zoo


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
def test_zoo_style_blocks_through_the_kernel(residual):
    """Runs the interpreted Triton kernel (no forced reference)."""
    model = nn.Sequential(BasicBlock(16, 16, residual=residual), BasicBlock(16, 32, stride=2, residual=residual))
    randomize_bn(model)
    converted = converted_copy(model)
    assert [type(m) for m in converted] == [FusedBasicBlock, FusedBasicBlock]
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_close(converted(x), model(x), atol=1e-4, rtol=1e-4)


def test_torchvision_blocks_through_the_kernel():
    """A whole ResNet-18 and a projection Bottleneck through the interpreted kernel, at a tiny size."""
    model = randomize_bn(torchvision.models.resnet18())
    converted = converted_copy(model)
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) < 1e-5
    block = torchvision.models.resnet.Bottleneck(
        32, 16, stride=2, downsample=nn.Sequential(nn.Conv2d(32, 64, 1, 2, bias=False), nn.BatchNorm2d(64))
    )
    randomize_bn(block)
    fused = fastresnet.convert(copy.deepcopy(block))
    assert isinstance(fused, FusedBottleneck)
    x = torch.randn(2, 32, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_close(fused(x), block(x), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------


@pytest.mark.cuda
def test_convert_resnet50_on_gpu_bf16(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    model = randomize_bn(torchvision.models.resnet50()).cuda().to(memory_format=torch.channels_last)
    converted = converted_copy(model)
    x = torch.randn(8, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected, got = model(x).float(), converted(x).float()
    with torch.no_grad():
        exact = model(x)
    assert relative_error(got, exact) < 5e-2
    assert relative_error(got, exact) < 3 * relative_error(expected, exact) + 1e-3  # no worse than eager bf16
