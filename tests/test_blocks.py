"""The fused blocks (fastresnet.nn.blocks) in each of convert()'s modes.

Each converted block must match the block it replaces in training and eval:
outputs, every gradient, running statistics. On the CPU the Triton path runs
through the interpreter (tiny shapes); whole models run on the reference path.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock, Bottleneck

from fastresnet import convert
from fastresnet.models import get_model
from fastresnet.models.blocks import ZeroPadShortcut
from fastresnet.nn import blocks, tune_dispatch
from fastresnet.ops import tuning
from fastresnet.testing import assert_as_accurate_as, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (atol, rtol) of a block output / gradient (scaled to its largest value) against fp32 eager
TOL = {torch.float32: (2e-3, 2e-3), torch.float16: (1e-1, 1e-1)}  # eager fp16 autocast itself is ~0.1 off here (BN over 128 values)


@pytest.fixture(autouse=True)
def _full_fp32_convs():
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield


def _randomise_bns(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.5)
    return model


def _projection(inplanes, outplanes, stride):
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes))


# (block class, inplanes, planes, stride, shortcut): stride 1 and 2, identity, projection, option A, plain
BLOCKS = [
    (Bottleneck, 32, 8, 1, "identity"),
    (Bottleneck, 16, 8, 2, "projection"),
    (Bottleneck, 16, 8, 1, "projection"),
    (BasicBlock, 8, 8, 1, "identity"),
    (BasicBlock, 8, 16, 2, "projection"),
    (BasicBlock, 8, 16, 2, "option_a"),
    (BasicBlock, 8, 8, 1, "plain"),
]


def _make_block(cls, inplanes, planes, stride, shortcut):
    out = planes * cls.expansion
    downsample = {
        "identity": None, "plain": None,
        "projection": _projection(inplanes, out, stride),
        "option_a": ZeroPadShortcut(inplanes, out, stride),
    }[shortcut]
    block = cls(inplanes, planes, stride, downsample)
    if shortcut == "plain":  # the zoo's plain nets: no addition (an attribute convert() honours)
        block.residual = False
        block.forward = _plain_forward.__get__(block)
    return _randomise_bns(block).to(DEVICE)


def _plain_forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)))


def _compare_step(fused, ref, x, dtype):
    """One training forward + backward of both; compare output, input grad and every parameter grad."""
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    if dtype == torch.float32:
        out_f = fused(xf)
    else:
        with torch.autocast(xf.device.type, dtype=dtype):
            out_f = fused(xf)
        assert out_f.dtype == dtype
    out_r = ref(xr)
    grad = torch.randn_like(out_r)
    out_f.backward(grad.to(out_f.dtype))
    out_r.backward(grad)
    atol, rtol = TOL[dtype]
    assert_close(out_f.float(), out_r, atol=atol, rtol=rtol, name="output")
    tensors = [("x", xf.grad, xr.grad)] + [
        (name, p.grad, q.grad) for (name, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters())
    ]
    for name, a, b in tensors:
        scale = b.abs().max().item() + 1e-6
        assert_close(a.float() / scale, b / scale, atol=atol, rtol=rtol, name=f"grad {name}")


def _compare_buffers(fused, ref, atol=1e-4, rtol=1e-3):
    for (name, a), (_, b) in zip(fused.named_buffers(), ref.named_buffers()):
        assert_close(a.float(), b.float(), atol=atol, rtol=rtol, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("spec", BLOCKS, ids=lambda s: f"{s[0].__name__}-s{s[3]}-{s[4]}")
def test_block_training_and_eval_match_torchvision(spec, dtype):
    if dtype == torch.float16 and DEVICE == "cpu" and (spec[0], spec[3]) != (Bottleneck, 2):
        pytest.skip("fp16 on the interpreter: the strided projection bottleneck covers it (time budget)")
    ref = _make_block(*spec)
    fused = convert(copy.deepcopy(ref), mode="train")
    expected_cls = blocks.FusedBottleneck if spec[0] is Bottleneck else blocks.FusedBasicBlock
    assert type(fused) is expected_cls
    assert list(fused.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, spec[1], 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    _compare_step(fused, ref, x, dtype)
    _compare_buffers(fused, ref)
    assert "triton" in blocks.FUSED_BLOCK.memo.values() or DEVICE == "cuda"
    fused.eval(), ref.eval()
    with torch.no_grad():
        assert_close(fused(x), ref(x), atol=1e-3, rtol=1e-3, name="eval output")
    fused.train(), ref.train()  # back to training: a second step, running statistics and counts evolve alike
    for p in list(fused.parameters()) + list(ref.parameters()):
        p.grad = None
    _compare_step(fused, ref, x, dtype)
    _compare_buffers(fused, ref)


def test_mixed_path_matches_torchvision():
    # Triton for the 1x1 convs, the reference conv (cuDNN on a GPU) for the 3x3, one set of ops.
    ref = _make_block(Bottleneck, 16, 8, 2, "projection")
    fused = convert(copy.deepcopy(ref), mode="train")
    fused.forward = lambda x: fused.run_path("mixed", x)
    x = torch.randn(2, 16, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    _compare_step(fused, ref, x, torch.float32)
    _compare_buffers(fused, ref)


@pytest.mark.parametrize("bn_kwargs", [{"momentum": None}, {"track_running_stats": False}], ids=str)
def test_batchnorm_options_follow_pytorch(bn_kwargs):
    ref = _make_block(BasicBlock, 8, 8, 1, "identity")
    ref.bn1 = nn.BatchNorm2d(8, **bn_kwargs).to(DEVICE)
    ref.bn2 = nn.BatchNorm2d(8, **bn_kwargs).to(DEVICE)
    fused = convert(copy.deepcopy(ref), mode="train")
    x = torch.randn(2, 8, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        _compare_step(fused, ref, x, torch.float32)
        _compare_buffers(fused, ref)


def test_one_value_per_channel_raises_like_pytorch():
    fused = convert(_make_block(BasicBlock, 8, 8, 1, "identity"), mode="train")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 8, 1, 1, device=DEVICE))


def test_forced_path_and_tune_dispatch_leave_state_alone(monkeypatch):
    block = convert(_make_block(BasicBlock, 8, 8, 1, "identity"), mode="train")
    x = torch.randn(2, 8, 6, 6, device=DEVICE)
    tuning.override("fused_block=eager")
    block(x)
    assert list(blocks.FUSED_BLOCK.memo.values()) == ["eager"]
    tuning.override(None)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    tune_dispatch(block, torch.randn(2, 8, 5, 5, device=DEVICE))
    for k, v in block.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in block.parameters())
    with pytest.raises(ValueError, match="unknown path"):
        block.run_path("cudnn", x)


def test_convert_train_keeps_state_dict_and_reports():
    model = resnet18()
    state = copy.deepcopy(model.state_dict())
    convert(model, mode="train")
    assert _fused_block_count(model) == 8
    assert all(isinstance(b, blocks.FusedBasicBlock) for layer in (model.layer1, model.layer4) for b in layer)
    assert list(model.state_dict()) == list(state)
    model.load_state_dict(state, strict=True)
    with pytest.raises(ValueError, match="mode"):
        convert(resnet18(), mode="training")


def _fused_block_count(model: nn.Module) -> int:
    return sum(isinstance(m, (blocks.FusedBasicBlock, blocks.FusedBottleneck)) for m in model.modules())


def _sgd_losses(model, images, labels, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    return losses


def test_resnet50_converted_gradients_and_sgd_losses_match(monkeypatch):
    # The reference path (what a CPU runs) through every converted block of a ResNet-50.
    monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1")
    torch.manual_seed(0)
    ref = _randomise_bns(resnet50(num_classes=10))
    fused = convert(copy.deepcopy(ref), mode="train")
    assert _fused_block_count(fused) == 16
    images = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([1, 7])
    fused_losses, ref_losses = _sgd_losses(fused, images, labels, 1), _sgd_losses(ref, images, labels, 1)
    for (name, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):  # the first step's gradients
        assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, name=name)
    fused_losses += _sgd_losses(fused, images, labels, 2)
    ref_losses += _sgd_losses(ref, images, labels, 2)
    assert_close(torch.tensor(fused_losses), torch.tensor(ref_losses), atol=1e-4, rtol=1e-4, name="losses")
    _compare_buffers(fused, ref)


def test_small_zoo_net_trains_alike_through_the_triton_path():
    # A CIFAR ResNet cut to two stages (an option A shortcut) with every block on the fused Triton path
    # (the interpreter on a CPU; each kernel launch there costs ~0.1 s).
    torch.manual_seed(0)
    net = get_model("resnet20", num_classes=4)
    net.layer1, net.layer2, net.layer3 = net.layer1[:1], net.layer2[:1], nn.Identity()
    net.fc = nn.Linear(32, 4)
    ref = _randomise_bns(net).to(DEVICE)
    fused = convert(copy.deepcopy(ref), mode="train")
    assert _fused_block_count(fused) == 2
    images = torch.randn(2, 3, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 3], device=DEVICE)
    if DEVICE == "cuda":
        tuning.override("fused_block=triton")
    losses = _sgd_losses(fused, images, labels)
    assert_close(torch.tensor(losses), torch.tensor(_sgd_losses(ref, images, labels)), atol=2e-3, rtol=2e-3,
                 name="losses")
    assert set(blocks.FUSED_BLOCK.memo.values()) == {"triton"}


def test_compile_fullgraph_on_the_reference_path(monkeypatch):
    monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1")
    ref = _make_block(Bottleneck, 16, 8, 2, "projection").cpu()
    fused = convert(copy.deepcopy(ref), mode="train")
    compiled = torch.compile(fused, fullgraph=True, backend="eager")
    x = torch.randn(2, 16, 8, 8)
    assert_close(compiled(x), ref(x), atol=1e-4, rtol=1e-4, name="compiled output")


# ---------------------------------------------------------------------------
# GPU: the real Triton path, bf16 autocast, fp16 + GradScaler, torch.compile
# ---------------------------------------------------------------------------


def _gpu_pair(cls=Bottleneck, inplanes=256, planes=64, stride=1, shortcut="identity"):
    ref = _make_block(cls, inplanes, planes, stride, shortcut).cuda().to(memory_format=torch.channels_last)
    return ref, convert(copy.deepcopy(ref), mode="train")


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["triton", "mixed", "cudnn_bnact"])
@pytest.mark.parametrize("stride,shortcut,inplanes", [(1, "identity", 256), (2, "projection", 256)])
def test_gpu_paths_match_eager_under_bf16_autocast(path, stride, shortcut, inplanes):
    """Each path under bf16 autocast is about as accurate as eager bf16, both
    judged against the same block in fp32 (TF32 off)."""
    ref, fused = _gpu_pair(stride=stride, shortcut=shortcut, inplanes=inplanes)
    exact = copy.deepcopy(ref)
    x = torch.randn(32, inplanes, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_f = fused.run_path(path, x.clone().requires_grad_())
        out_r = ref(x.clone().requires_grad_())
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out_e = exact(x.clone().requires_grad_())
        out_e.sum().backward()
    assert out_f.is_contiguous(memory_format=torch.channels_last)
    assert_as_accurate_as(out_f.float(), out_r.float(), out_e, name=f"{path} output")
    out_f.float().sum().backward()
    out_r.float().sum().backward()
    params = zip(fused.named_parameters(), ref.parameters(), exact.parameters())
    for (name, p), q, e in params:
        assert_as_accurate_as(p.grad, q.grad, e.grad, name=f"{path} grad {name}")
    _compare_buffers(fused, ref, atol=1e-3, rtol=1e-2)  # bf16 convs from different libraries: ulp-level drift


@pytest.mark.cuda
def test_gpu_fp16_grad_scaler_step_matches_eager():
    ref, fused = _gpu_pair(BasicBlock, 64, 64)
    x = torch.randn(16, 64, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    tuning.override("fused_block=triton")
    losses = []
    for model in (fused, ref):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cuda")
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(x).float().square().mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
    assert_close(torch.tensor(losses[:3]), torch.tensor(losses[3:]), atol=1e-2, rtol=1e-2, name="losses")


@pytest.mark.cuda
def test_gpu_compile_fullgraph_of_the_triton_path():
    ref, fused = _gpu_pair(stride=2, shortcut="projection")
    x = torch.randn(32, 256, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    tuning.override("fused_block=triton")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        tune_dispatch(fused, x)
        compiled = torch.compile(fused, fullgraph=True)
        out_c = compiled(x)
        out_r = ref(x)
    assert set(blocks.FUSED_BLOCK.memo.values()) == {"triton"}
    assert_close(out_c.float(), out_r.float(), atol=6e-2, rtol=6e-2, name="compiled output")
    out_c.float().sum().backward()
    assert fused.conv2.weight.grad is not None


@pytest.mark.cuda
def test_gpu_measured_dispatch_records_a_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRESNET_CACHE_DIR", str(tmp_path))
    tuning.clear()
    ref, fused = _gpu_pair(BasicBlock, 64, 64)
    state = copy.deepcopy(fused.state_dict())
    x = torch.randn(16, 64, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused(x)
    (chosen,) = blocks.FUSED_BLOCK.memo.values()
    assert chosen in blocks.PATHS
    (decision,) = [d for d in tuning.decisions() if d["op"] == "fused_block"]
    assert set(decision["times_ms"]) <= set(tuning.OPS["fused_block"].candidates)  # a default run: proven paths only
    # the timing steps do not count: only the real step moved the running statistics
    assert int(fused.bn1.num_batches_tracked) == int(state["bn1.num_batches_tracked"]) + 1


def test_timm_blocks_convert_and_match(monkeypatch):
    import timm
    from timm.models.resnet import BasicBlock as TimmBasicBlock
    from timm.models.resnet import Bottleneck as TimmBottleneck
    from timm.models.resnet import downsample_avg

    # One small timm block through the Triton path (the interpreter on a CPU), avg-pool shortcut (avg_down).
    ref = _randomise_bns(TimmBasicBlock(8, 16, 2, downsample_avg(8, 16, 1, stride=2))).to(DEVICE)
    fused = convert(copy.deepcopy(ref), mode="train")
    assert type(fused) is blocks.FusedBasicBlock
    assert list(fused.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 8, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    _compare_step(fused, ref, x, torch.float32)
    _compare_buffers(fused, ref)
    # A whole timm ResNet on the reference path: every block replaced, state_dict unchanged.
    monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1")
    model = timm.models.resnet.ResNet(block=TimmBottleneck, layers=[1, 1, 1, 1], num_classes=3)
    keys = list(model.state_dict())
    convert(model, mode="train")
    assert _fused_block_count(model) == 4
    assert list(model.state_dict()) == keys


def _saved_activation_bytes(model: nn.Module, x: torch.Tensor, path: str | None = None) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one training forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x) if path is None else model.run_path(path, x)
    del out
    return sum(storages.values())


@pytest.mark.parametrize("spec", [BLOCKS[1], BLOCKS[4]], ids=["Bottleneck-s2-projection", "BasicBlock-s2-projection"])
def test_triton_path_saves_no_more_than_eager(spec):
    ref = _make_block(*spec)
    fused = convert(copy.deepcopy(ref), mode="train")
    x = torch.randn(2, spec[1], 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()
    fused_bytes = _saved_activation_bytes(fused, x, "triton")
    eager_bytes = _saved_activation_bytes(ref, x)
    assert 0 < fused_bytes <= eager_bytes, (fused_bytes, eager_bytes)


def test_ddp_single_process_trains_like_the_plain_block(tmp_path):
    # DDP (gloo, world size 1) over a converted block on the Triton path (the interpreter on a CPU):
    # the reducer must see every parameter's gradient through the custom ops' backward.
    import torch.distributed as dist

    if DEVICE == "cuda":
        pytest.skip("the GPU run covers DDP through the cuda tests' single-device paths")
    ref = _make_block(BasicBlock, 8, 16, 2, "projection")
    fused = convert(copy.deepcopy(ref), mode="train")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(fused)
        x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
        ddp(x).square().mean().backward()
        ref(x).square().mean().backward()
    finally:
        dist.destroy_process_group()
    for (name, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        scale = q.grad.abs().max().item() + 1e-6
        assert_close(p.grad / scale, q.grad / scale, atol=2e-3, rtol=2e-3, name=name)
    assert "triton" in blocks.FUSED_BLOCK.memo.values()


# ---------------------------------------------------------------------------
# mode="bn_act": each BN (+ add) + ReLU one pass, the convs left to cuDNN
# ---------------------------------------------------------------------------

from torchvision.models import resnet as tv_resnet  # noqa: E402


def randomize_all_bns(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model


def channels_last_input(*shape, mean=0.0):
    x = torch.randn(shape, device=DEVICE) + mean
    return x.contiguous(memory_format=torch.channels_last)


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
def test_bn_act_block_matches_torchvision(block_type, downsample):
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
    fused = convert(copy.deepcopy(reference), mode="bn_act")
    assert type(fused) is (blocks.FusedBottleneck if block_type is tv_resnet.Bottleneck else blocks.FusedBasicBlock)
    assert len(fused.fastresnet_report.replaced) == 1 and fused.mode == "bn_act"
    assert list(fused.state_dict()) == list(reference.state_dict())
    x = channels_last_input(2, inplanes, 6, 6).requires_grad_()
    compare_forward_backward(reference, fused, x)


def test_bn_act_shares_tensors_and_trains_like_unfused():
    """convert(mode="bn_act") keeps every parameter and buffer tensor (same storage); the
    fused model then trains a few SGD steps with the same losses."""
    torch.manual_seed(0)
    reference = tiny_resnet()
    fused_model = copy.deepcopy(reference)
    before = {k: v.data_ptr() for k, v in fused_model.state_dict().items()}
    assert convert(fused_model, mode="bn_act") is fused_model
    after = fused_model.state_dict()
    assert list(after) == list(before) and all(after[k].data_ptr() == p for k, p in before.items())
    assert sum(isinstance(m, blocks.FusedBasicBlock) for m in fused_model.modules()) == 3

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


def test_bn_act_torchvision_resnet50_structure():
    """Every block of a full torchvision ResNet-50 is replaced, nothing left,
    state_dict keys unchanged and strictly loadable into a fresh torchvision model."""
    model = tv_resnet.resnet50()
    keys = list(model.state_dict())
    report = convert(model, mode="bn_act").fastresnet_report
    assert len(report.replaced) == 16 and not report.left
    assert sum(isinstance(m, blocks.FusedBottleneck) for m in model.modules()) == 16
    assert list(model.state_dict()) == keys
    tv_resnet.resnet50().load_state_dict(model.state_dict(), strict=True)


def test_bn_act_zoo_style_plain_block_and_skips():
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
    report = convert(model, mode="bn_act").fastresnet_report
    assert [path for path, *_ in report.replaced] == ["0"]
    assert [path for path, *_ in report.left] == ["1", "2"]
    assert "child 'se' (Sigmoid)" in str(report) and "GroupNorm" in str(report)
    assert isinstance(model[0], blocks.FusedBasicBlock) and model[0].residual is False
    x = channels_last_input(2, 8, 5, 5).requires_grad_()
    compare_forward_backward(reference[:1], model[:1], x)


def test_bn_act_timm_resnet():
    timm = pytest.importorskip("timm")
    reference = randomize_all_bns(timm.create_model("resnet18", pretrained=False, num_classes=5)).to(DEVICE).eval()
    fused = convert(copy.deepcopy(reference), mode="bn_act")
    report = fused.fastresnet_report
    assert len(report.replaced) == 8 and not report.left
    assert list(fused.state_dict()) == list(reference.state_dict())
    x = channels_last_input(1, 3, 32, 32)
    assert_close(fused(x), reference(x), atol=1e-4, rtol=1e-4, name="eval output")


def test_bn_act_model_compiles_fullgraph_on_reference_path(monkeypatch):
    """On the CPU torch.compile traces the reference (Triton cannot be compiled
    here); the compiled fused blocks match the eager torchvision ones, forward and backward."""
    monkeypatch.setenv("FASTRESNET_FORCE_REFERENCE", "1")
    model = nn.Sequential(tv_resnet.Bottleneck(8, 2)).to(DEVICE).to(memory_format=torch.channels_last)
    randomize_all_bns(model)
    compiled = torch.compile(convert(copy.deepcopy(model), mode="bn_act"), fullgraph=True)
    x = channels_last_input(2, 8, 6, 6).requires_grad_()
    compare_forward_backward(model, compiled, x)
    for (k, a), (_, e) in zip(compiled.state_dict().items(), model.state_dict().items()):
        assert_close(a.double(), e.double(), atol=1e-5, rtol=1e-5, name=k)
