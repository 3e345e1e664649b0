"""BatchNormAct2d and SyncBatchNormAct2d against torch's BatchNorm2d / SyncBatchNorm (+ add + ReLU), and
converted models with torch.nn.SyncBatchNorm.convert_sync_batchnorm before or after convert().

The synchronised statistics run in two gloo processes on the CPU (torch's SyncBatchNorm itself needs
GPUs): what they must equal is BatchNorm over the two processes' batches together, in one process."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchvision.models import resnet as tv_resnet

from fastresnet import convert
from fastresnet.nn import BatchNormAct2d, FusedBasicBlock, FusedBottleneck, SyncBatchNormAct2d
from fastresnet.ops.bn_act import batch_norm_act
from fastresnet.testing import assert_close, spawn_ranks

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


# (what BatchNorm2d and BatchNormAct2d are built and called with, in training or eval): each a mistake
# torch's BatchNorm refuses.
REFUSED = {
    "eps 0 in training": ({"eps": 0.0}, (2, 3, 4, 4), True),
    "negative eps in training": ({"eps": -1e-3}, (2, 3, 4, 4), True),
    "negative eps in eval": ({"eps": -1e-3}, (2, 3, 4, 4), False),
    "one value per channel": ({}, (1, 3, 1, 1), True),
    "3-D input": ({}, (2, 3, 4), True),
    "5-D input": ({}, (2, 3, 2, 2, 2), False),
    "channels": ({}, (2, 4, 3, 3), True),
    "channels in eval": ({}, (2, 4, 3, 3), False),
    "channels without running statistics": ({"track_running_stats": False}, (2, 4, 3, 3), True),
}


@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("case", list(REFUSED))
def test_batchnorm_act_refuses_what_batchnorm2d_refuses_the_same_way(case, path, monkeypatch):
    """The same exception type as torch's, its message included."""
    monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1" if path == "reference" else "0")
    kwargs, shape, training = REFUSED[case]
    x = torch.randn(shape, device=DEVICE)
    with pytest.raises(Exception) as theirs:
        nn.BatchNorm2d(3, **kwargs).to(DEVICE).train(training)(x)
    for module in (BatchNormAct2d(3, **kwargs), SyncBatchNormAct2d(3, **kwargs)):
        if isinstance(module, nn.SyncBatchNorm) and x.dim() != 4:
            continue  # nn.SyncBatchNorm takes any dimension; ours is the 2-D one
        with pytest.raises(type(theirs.value)) as ours:
            module.to(DEVICE).train(training)(x)
        assert str(theirs.value) in str(ours.value)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_batch_norm_act_refuses_what_f_batch_norm_refuses_the_same_way(path, monkeypatch):
    monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1" if path == "reference" else "0")
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    stats = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    for args in [(None, stats[1], None, None, True), (stats[0], None, None, None, False), (None, None, None, None, False),
                 (*stats, torch.ones(2, device=DEVICE), None, True), (*stats, None, torch.ones(4, device=DEVICE), False)]:
        with pytest.raises(Exception) as theirs:
            torch.nn.functional.batch_norm(x, *args)
        with pytest.raises(type(theirs.value)) as ours:
            batch_norm_act(x, *args)
        assert str(theirs.value) in str(ours.value)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_an_empty_batch_passes_as_through_batchnorm2d(path, monkeypatch):
    """torch's BatchNorm takes an empty batch in training: an empty output, running statistics untouched
    (the batch still counted)."""
    monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1" if path == "reference" else "0")
    torch_bn = randomize_bn(nn.BatchNorm2d(3, momentum=None).to(DEVICE))
    fused = BatchNormAct2d(3, momentum=None).to(DEVICE)
    fused.load_state_dict(torch_bn.state_dict())
    x = torch.randn(0, 3, 2, 2, device=DEVICE, requires_grad=True)
    y = fused(x)
    assert y.shape == (0, 3, 2, 2)
    torch_bn(x)
    for (name, a), (_, e) in zip(fused.state_dict().items(), torch_bn.state_dict().items()):
        assert torch.equal(a, e), name
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(fused.weight.grad, torch.zeros(3, device=DEVICE))


def test_sync_batchnorm_act_is_batchnorm_act_without_a_group():
    """Eval, and training in one process: SyncBatchNormAct2d computes what BatchNormAct2d does, through the
    same fused op, with nn.SyncBatchNorm's state_dict."""
    torch_bn = randomize_bn(nn.BatchNorm2d(10).to(DEVICE))
    sync = SyncBatchNormAct2d(10).to(DEVICE)
    assert list(sync.state_dict()) == list(torch_bn.state_dict()) == list(nn.SyncBatchNorm(10).state_dict())
    sync.load_state_dict(torch_bn.state_dict())
    for training in (True, True, False):
        torch_bn.train(training), sync.train(training)
        x = channels_last_input(2, 10, 3, 3).requires_grad_()
        res = channels_last_input(2, 10, 3, 3)
        y, expected = sync(x, res), unfused(torch_bn, x, res, True)
        assert_close(y, expected, name=f"training={training} y")
        (g,), (e,) = torch.autograd.grad(y.sum(), [x]), torch.autograd.grad(expected.sum(), [x])
        assert_close(g, e, atol=2e-4, rtol=2e-4, name=f"training={training} grad x")
    for (name, a), (_, e) in zip(sync.state_dict().items(), torch_bn.state_dict().items()):
        assert_close(a.double(), e.double(), atol=1e-6, rtol=1e-5, name=name)


def test_convert_sync_batchnorm_keeps_the_act():
    model = nn.Sequential(BatchNormAct2d(4), BatchNormAct2d(4, act=None), nn.BatchNorm2d(4))
    converted = SyncBatchNormAct2d.convert_sync_batchnorm(copy.deepcopy(model))
    assert [type(m) for m in converted] == [SyncBatchNormAct2d, SyncBatchNormAct2d, nn.SyncBatchNorm]
    assert [m.apply_relu for m in converted[:2]] == [True, False]
    assert converted[0].weight is not model[0].weight  # the copy's own tensors ...
    assert list(converted.state_dict()) == list(model.state_dict())  # ... under the same keys


# ---------------------------------------------------------------------------
# convert() and torch.nn.SyncBatchNorm.convert_sync_batchnorm, in both orders
# ---------------------------------------------------------------------------


def tiny_net():
    """A stem chain and two torchvision blocks (one with a projection), BatchNorms randomised."""
    stem = [nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True)]
    down = nn.Sequential(tv_resnet.conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    blocks = [tv_resnet.BasicBlock(8, 8), tv_resnet.BasicBlock(8, 16, 2, down)]
    model = nn.Sequential(*stem, *blocks)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m)
    return model.to(memory_format=torch.channels_last)


def both_orders(model, mode):
    """(convert, then convert_sync_batchnorm) and (convert_sync_batchnorm, then convert) of copies."""
    first = nn.SyncBatchNorm.convert_sync_batchnorm(convert(copy.deepcopy(model), mode=mode))
    second = convert(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)), mode=mode)
    return first, second


@pytest.mark.parametrize("mode", ["inference", "train", "bn_act"])
def test_convert_sync_batchnorm_in_either_order_computes_what_the_model_does(mode):
    """One process: SyncBatchNorm is BatchNorm there, so both orders must match the unconverted model in
    training (output, every gradient, running statistics) and in eval; before, convert then
    convert_sync_batchnorm raised in bn_act mode and applied the stem's BatchNorm twice in eval."""
    model = tiny_net()
    first, second = both_orders(model, mode)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in first.modules()) == 6
    fused = sum(isinstance(m, (FusedBasicBlock, FusedBottleneck)) for m in second.modules())
    assert fused == 2 and list(first.state_dict()) == list(second.state_dict()) == list(model.state_dict())
    x = channels_last_input(2, 3, 6, 6)
    for step in range(2):
        ys = [m.train()(x) for m in (model, first, second)]
        params = [list(m.parameters()) for m in (model, first, second)]
        grads = [torch.autograd.grad(y.square().sum(), p) for y, p in zip(ys, params)]
        for name, y, g in (("convert, then sync", ys[1], grads[1]), ("sync, then convert", ys[2], grads[2])):
            assert_close(y, ys[0], atol=1e-4, rtol=1e-4, name=f"{name}: step {step} output")
            for i, (a, e) in enumerate(zip(g, grads[0])):
                assert_close(a, e, atol=1e-3 * max(1.0, e.abs().max().item()), rtol=1e-3, name=f"{name}: grad {i}")
    for converted in (first, second):
        for (key, a), (_, e) in zip(converted.state_dict().items(), model.state_dict().items()):
            assert_close(a.double(), e.double(), atol=1e-5, rtol=1e-4, name=key)
        with torch.no_grad():
            assert_close(converted.eval()(x), model.eval()(x), atol=1e-4, rtol=1e-4, name="eval output")


def tiny_blocks():
    """The two blocks of tiny_net alone (torch's SyncBatchNorm, which a stem left to torch would run,
    refuses CPU tensors in a group of several processes)."""
    return tiny_net()[3:]


SYNC_CASES = [(mode, order) for mode in ("train", "bn_act") for order in ("convert-then-sync", "sync-then-convert")]


def _sync_worker(rank, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for mode, order in SYNC_CASES:
            torch.manual_seed(0)
            model = tiny_blocks()
            x = channels_last_input(4, 8, 6, 6)[2 * rank:2 * rank + 2]  # each rank its half of one batch
            net = both_orders(model, mode)[0 if order == "convert-then-sync" else 1].train()
            y = net(x)
            grads = torch.autograd.grad(y.square().sum(), list(net.parameters()))
            torch.save({"y": y.detach(), "grads": grads, "state": net.state_dict()}, f"{tmp}/{mode}-{order}-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(DEVICE == "cuda", reason="gloo on CPU tensors; the GPU's SyncBatchNorm is torch's own")
def test_sync_batchnorm_reduces_across_two_processes(tmp_path):
    """Two gloo processes, each with half of one batch, through converted blocks with SyncBatchNorm (modes
    train and bn_act, convert_sync_batchnorm before and after convert): each rank's output and running
    statistics, and the sum of the two ranks' gradients, are those of the unconverted blocks on the whole
    batch in one process (what SyncBatchNorm means)."""
    spawn_ranks(_sync_worker, str(tmp_path))
    torch.manual_seed(0)
    model = tiny_blocks().train()
    x = channels_last_input(4, 8, 6, 6)
    y = model(x)
    grads = torch.autograd.grad(y.square().sum(), list(model.parameters()))
    for mode, order in SYNC_CASES:
        case = f"{mode}, {order}"
        ranks = [torch.load(tmp_path / f"{mode}-{order}-{r}.pt") for r in (0, 1)]
        for r, result in enumerate(ranks):
            assert_close(result["y"], y[2 * r:2 * r + 2].detach(), atol=1e-4, rtol=1e-4, name=f"{case}: rank {r} y")
            for (key, a), (_, e) in zip(result["state"].items(), model.state_dict().items()):
                assert_close(a.double(), e.double(), atol=1e-5, rtol=1e-4, name=f"{case}: rank {r} {key}")
        for i, (g0, g1, e) in enumerate(zip(ranks[0]["grads"], ranks[1]["grads"], grads)):
            assert_close(g0 + g1, e, atol=1e-3 * max(1.0, e.abs().max().item()), rtol=1e-3, name=f"{case}: grad {i}")
