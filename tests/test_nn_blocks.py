"""BatchNormAct2d against nn.BatchNorm2d (+ add + ReLU), and the fused
BasicBlock / Bottleneck and fuse_bn_act against torchvision's."""

import copy

import pytest
import torch
from torch import nn

from fastresnet.nn import BatchNormAct2d
from fastresnet.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def channels_last_input(*shape, mean=0.0):
    x = torch.randn(shape, device=DEVICE) + mean
    return x.contiguous(memory_format=torch.channels_last)


def randomize_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """Non-trivial parameters and running statistics, so that mix-ups show."""
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if bn.track_running_stats:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    return bn


def unfused(bn, x, residual, relu):
    y = bn(x)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


# ---------------------------------------------------------------------------
# BatchNormAct2d
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"momentum": None},
        {"track_running_stats": False},
        {"affine": False, "momentum": 0.5},
    ],
    ids=["default", "cumulative", "no-running-stats", "no-affine"],
)
@pytest.mark.parametrize("residual,relu", [(True, True), (False, False)])
def test_batchnorm_act_matches_batchnorm2d(kwargs, residual, relu):
    """Three training steps then eval: outputs, gradients, running statistics and
    num_batches_tracked follow nn.BatchNorm2d exactly."""
    c = 12
    torch_bn = randomize_bn(nn.BatchNorm2d(c, **kwargs).to(DEVICE))
    fused = BatchNormAct2d(c, **kwargs, act="relu" if relu else None).to(DEVICE)
    fused.load_state_dict(torch_bn.state_dict())
    for step in range(4):
        training = step < 3
        torch_bn.train(training)
        fused.train(training)
        x = channels_last_input(2, c, 3, 4, mean=step).requires_grad_()
        res = channels_last_input(2, c, 3, 4).requires_grad_() if residual else None
        y = fused(x, res)
        expected = unfused(torch_bn, x, res, relu)
        assert_close(y, expected, name=f"step {step} y")
        inputs = [x] + list(fused.parameters()) + ([res] if residual else [])
        ref_inputs = [x] + list(torch_bn.parameters()) + ([res] if residual else [])
        grad_y = torch.randn_like(y)
        for a, e in zip(torch.autograd.grad(y, inputs, grad_y), torch.autograd.grad(expected, ref_inputs, grad_y)):
            assert_close(a, e, atol=2e-4, rtol=2e-4, name=f"step {step} grad")
        for (name, a), (_, e) in zip(fused.state_dict().items(), torch_bn.state_dict().items()):
            assert_close(a.double(), e.double(), atol=1e-6, rtol=1e-5, name=f"step {step} {name}")


def test_batchnorm_act_state_dict_both_ways_and_errors():
    torch_bn = randomize_bn(nn.BatchNorm2d(6))
    fused = BatchNormAct2d(6)
    assert list(fused.state_dict()) == list(torch_bn.state_dict())
    fused.load_state_dict(torch_bn.state_dict(), strict=True)
    torch_bn.load_state_dict(fused.state_dict(), strict=True)
    shared = BatchNormAct2d.from_batchnorm(torch_bn, act=None)
    assert shared.weight is torch_bn.weight and shared.running_var is torch_bn.running_var
    assert "act=None" in repr(shared)

    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        fused.train()(torch.randn(1, 6, 1, 1))
    with pytest.raises(ValueError, match="expected 4D input"):
        fused(torch.randn(2, 6, 3))
    assert BatchNormAct2d(6, relu=False).apply_relu is False and BatchNormAct2d(6, act=None).apply_relu is False
    with pytest.raises(ValueError, match="act must be"):
        BatchNormAct2d(6, act="gelu")


# ---------------------------------------------------------------------------
# Fused blocks and fuse_bn_act
# ---------------------------------------------------------------------------

from torchvision.models import resnet as tv_resnet  # noqa: E402

from fastresnet.nn import BasicBlock, Bottleneck, fuse_bn_act  # noqa: E402


def randomize_all_bns(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m)
    return model


def tiny_resnet(widths=(8, 16, 32), num_classes=10):
    """ResNet-18's layout scaled down: a stem, then one torchvision BasicBlock per
    stage (stride 2 and a conv1x1+BN downsample from the second stage on)."""
    layers = [nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    for i, width in enumerate(widths):
        inplanes = widths[max(i - 1, 0)]
        downsample = None
        if i > 0:
            downsample = nn.Sequential(tv_resnet.conv1x1(inplanes, width, 2), nn.BatchNorm2d(width))
        layers.append(tv_resnet.BasicBlock(inplanes, width, 2 if i > 0 else 1, downsample))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes)]
    model = randomize_all_bns(nn.Sequential(*layers))
    return model.to(DEVICE).to(memory_format=torch.channels_last)


def compare_forward_backward(model, fused, x, *, atol=2e-4):
    y, expected = fused(x), model(x)
    assert_close(y, expected, atol=atol, rtol=atol, name="output")
    grad = torch.randn_like(y)
    params, ref_params = list(fused.parameters()), list(model.parameters())
    for (name, _), a, e in zip(
        model.named_parameters(), torch.autograd.grad(y, params, grad), torch.autograd.grad(expected, ref_params, grad)
    ):
        assert_close(a, e, atol=atol * max(1.0, e.abs().max().item()), rtol=atol, name=f"grad {name}")


@pytest.mark.parametrize("block_type", [tv_resnet.BasicBlock, tv_resnet.Bottleneck])
@pytest.mark.parametrize("downsample", [False, True])
def test_fused_block_matches_torchvision(block_type, downsample):
    planes, stride = 8, 1
    inplanes = planes * block_type.expansion
    down = None
    if downsample:
        stride = 2
        down = nn.Sequential(
            tv_resnet.conv1x1(inplanes, planes * block_type.expansion, stride),
            nn.BatchNorm2d(planes * block_type.expansion),
        )
    reference = randomize_all_bns(block_type(inplanes, planes, stride, down)).to(DEVICE)
    fused, report = fuse_bn_act(copy.deepcopy(reference), return_report=True)
    assert type(fused).__name__ == block_type.__name__ and type(fused).__module__ == "fastresnet.nn.blocks"
    assert len(report.replaced) == 1
    assert list(fused.state_dict()) == list(reference.state_dict())
    x = channels_last_input(2, inplanes, 6, 6).requires_grad_()
    compare_forward_backward(reference, fused, x)


def test_fuse_shares_tensors_and_trains_like_unfused():
    """fuse_bn_act keeps every parameter and buffer tensor (same storage); the
    fused model then trains a few SGD steps with the same losses."""
    torch.manual_seed(0)
    reference = tiny_resnet()
    fused_model = copy.deepcopy(reference)
    before = {k: v.data_ptr() for k, v in fused_model.state_dict().items()}
    assert fuse_bn_act(fused_model) is fused_model
    after = fused_model.state_dict()
    assert list(after) == list(before) and all(after[k].data_ptr() == p for k, p in before.items())
    assert sum(isinstance(m, BasicBlock) for m in fused_model.modules()) == 3

    x = channels_last_input(4, 3, 16, 16)
    target = torch.randint(0, 10, (4,), device=DEVICE)
    losses = {}
    for name, model in (("unfused", reference), ("fused", fused_model)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        losses[name] = []
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["unfused"]), atol=1e-4, rtol=1e-4, name="losses")
    # Three steps of momentum SGD amplify rounding differences (layer4's BN sees
    # 4 values per channel), hence the looser tolerance on the weights.
    for (k, a), (_, e) in zip(fused_model.state_dict().items(), reference.state_dict().items()):
        assert_close(a.double(), e.double(), atol=1e-3, rtol=1e-3, name=k)
    reference.eval(), fused_model.eval()
    assert_close(fused_model(x[:1]), reference(x[:1]), atol=1e-3, rtol=1e-3, name="eval output")


def test_fuse_torchvision_resnet50_structure():
    """Every block of a full torchvision ResNet-50 is replaced, nothing skipped,
    state_dict keys unchanged and strictly loadable into a fresh torchvision model."""
    model = tv_resnet.resnet50()
    keys = list(model.state_dict())
    _, report = fuse_bn_act(model, return_report=True)
    assert len(report.replaced) == 16 and not report.skipped
    assert sum(isinstance(m, Bottleneck) for m in model.modules()) == 16
    assert list(model.state_dict()) == keys
    tv_resnet.resnet50().load_state_dict(model.state_dict(), strict=True)


def test_fuse_zoo_style_plain_block_and_skips():
    """A model-zoo block (torchvision names plus residual=False for plain nets)
    is fused without the addition; blocks with extras or other norms are skipped."""

    class ZooBasicBlock(tv_resnet.BasicBlock):
        def __init__(self, *args, residual=True, **kwargs):
            super().__init__(*args, **kwargs)
            self.residual = residual

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            if self.residual:
                out = out + (x if self.downsample is None else self.downsample(x))
            return self.relu(out)

    ZooBasicBlock.__name__ = "PlainBlock"
    ZooBasicBlock.__module__ = "fastresnet.models.resnet"
    plain = randomize_all_bns(ZooBasicBlock(8, 8, residual=False))
    with_se = tv_resnet.BasicBlock(8, 8)
    with_se.se = nn.Sigmoid()
    group_norm = tv_resnet.BasicBlock(8, 8, norm_layer=lambda c: nn.GroupNorm(2, c))
    model = nn.Sequential(plain, with_se, group_norm).to(DEVICE)
    reference = copy.deepcopy(model)
    _, report = fuse_bn_act(model, return_report=True)
    assert [name for name, _ in report.replaced] == ["0"]
    assert [name for name, _ in report.skipped] == ["1", "2"]
    assert "se is a Sigmoid" in str(report) and "GroupNorm" in str(report)
    assert isinstance(model[0], BasicBlock) and model[0].residual is False
    x = channels_last_input(2, 8, 5, 5).requires_grad_()
    compare_forward_backward(reference[:1], model[:1], x)


def test_fuse_timm_resnet():
    timm = pytest.importorskip("timm")
    reference = randomize_all_bns(timm.create_model("resnet18", pretrained=False, num_classes=5)).to(DEVICE).eval()
    fused, report = fuse_bn_act(copy.deepcopy(reference), return_report=True)
    assert len(report.replaced) == 8 and not report.skipped
    assert list(fused.state_dict()) == list(reference.state_dict())
    x = channels_last_input(1, 3, 32, 32)
    assert_close(fused(x), reference(x), atol=1e-4, rtol=1e-4, name="eval output")


def test_fused_model_compiles_fullgraph_on_reference_path(monkeypatch):
    """On the CPU torch.compile traces the reference (Triton cannot be compiled
    here); the compiled fused blocks match eager ones, forward and backward."""
    monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1")
    model = nn.Sequential(Bottleneck(8, 2)).to(DEVICE).to(memory_format=torch.channels_last)
    randomize_all_bns(model)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    x = channels_last_input(2, 8, 6, 6).requires_grad_()
    compare_forward_backward(model, compiled, x)
    for (k, a), (_, e) in zip(compiled.state_dict().items(), model.state_dict().items()):
        assert_close(a.double(), e.double(), atol=1e-5, rtol=1e-5, name=k)
