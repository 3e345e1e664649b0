"""The CPU at the sizes a CPU user runs: every provider in one process, in interleaved rounds.

Runs only on a CPU (the other bench_*.py files hold a GPU's sizes, and run tiny on a CPU to check
themselves). Each group's ratios are against eager fp32 NCHW, measured in the same rounds
(harness.interleaved: A, B, C, then B, C, A, ...; the median of each), as ../shared/MEASURING.md asks of
a shared CPU; the first round is a warm-up that holds torch.compile's compilation and fastresnet's
first-call measurements.

  cpu resnet50 inference     torchvision's ResNet-50, batch 16 at 224x224, eval, inference_mode:
                             eager fp32 NCHW | eager fp32 channels_last | torch.compile fp32 channels_last |
                             fastresnet: convert(mode="inference") fp32 channels_last
  cpu resnet20 train step    ResNet-20, batch 128 at 32x32, forward + backward + foreach SGD:
                             eager fp32 NCHW | eager fp32 channels_last | torch.compile fp32 channels_last |
                             fastresnet: what `python -m fastresnet.train` builds by default (--amp auto) |
                             fastresnet convert(mode="train") channels_last
  cpu bn_act <shape>         BatchNorm + residual add + ReLU, training forward + backward, at ResNet-20's
                             three stages (batch 128): eager fp32 NCHW | eager fp32 channels_last |
                             torch.compile channels_last | fastresnet BatchNormAct2d channels_last
On a CPU with bf16 units (AMX-BF16, AVX512-BF16) each eager, compiled and fastresnet provider also runs
in bf16 (autocast); without them bf16 is emulated and many times slower than fp32 (the
fastresnet.training.precision docstring), so those rows are left out.

Triton's interpreter is off for these (bench/conftest.py turns it on for the other files' tiny CPU
runs), so fastresnet runs the CPU's own candidates. FASTRESNET_BENCH_SHORT=1 takes 3 timed rounds
instead of 5. About 15 minutes on a shared 2-core AVX2 EPYC at one thread (ResNet-50 at 224 is most of it).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import fastresnet
import harness
from fastresnet.data import DataConfig
from fastresnet.models import get_model
from fastresnet.nn import BatchNormAct2d
from fastresnet.ops import onednn
from fastresnet.training import TrainConfig
from fastresnet.training.loop import make_train_step
from fastresnet.training.model import build_optimizer, prepare_model
from fastresnet.testing import randomize_bn
from fastresnet.training.precision import choose_amp

DEV = harness.device()
pytestmark = pytest.mark.skipif(DEV.type != "cpu", reason="the CPU's comparisons (a GPU's: the other bench files)")
CL = torch.channels_last
PRECISIONS = ["fp32", "bf16"] if onednn.bf16_units() else ["fp32"]
BN_SHAPES = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]


def _rounds() -> int:
    return 3 if harness.short() else 5


@pytest.fixture(autouse=True)
def _cpu_route(monkeypatch):
    """fastresnet's own CPU paths: no Triton interpreter standing in for a GPU."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


# ---------------------------------------------------------------------------
# ResNet-50 inference, batch 16 at 224
# ---------------------------------------------------------------------------


def test_resnet50_inference(benchmark):
    before = len(_choices())
    torch.manual_seed(0)
    plain = randomize_bn(torchvision.models.resnet50())
    x = torch.randn(16, 3, 224, 224)
    models = {"eager fp32 NCHW": (plain, x)}
    cl_model, x_cl = copy.deepcopy(plain).to(memory_format=CL), x.contiguous(memory_format=CL)
    for precision in PRECISIONS:
        models[f"eager {precision} channels_last"] = (cl_model, x_cl)
        models[f"torch.compile {precision} channels_last"] = (torch.compile(cl_model), x_cl)
        models[f"fastresnet {precision} channels_last"] = (fastresnet.convert(copy.deepcopy(cl_model)), x_cl)

    def forward(name):
        model, images = models[name]
        with torch.inference_mode(), _autocast(name.split()[-2]):
            return model(images)

    expected = forward("eager fp32 NCHW")
    for name in models:  # correctness first; this also compiles and makes fastresnet's choices
        got = forward(name).float()
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        assert error < (5e-2 if "bf16" in name else 1e-3), f"{name}: relative error {error:.2e}"
    medians = harness.interleaved(benchmark, {name: (lambda n=name: forward(n)) for name in models}, dev=DEV,
                                  group="cpu resnet50 inference b16 224", baseline="eager fp32 NCHW",
                                  rounds=_rounds(), images=16, dispatch=_choices(before))
    _print_ratios(medians, "eager fp32 NCHW")


# ---------------------------------------------------------------------------
# ResNet-20 training step, batch 128 at 32
# ---------------------------------------------------------------------------


def _step(model: nn.Module, precision: str):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    return make_train_step(model, nn.CrossEntropyLoss(), optimizer, torch.bfloat16 if precision == "bf16" else None,
                           None)


def test_resnet20_train_step(benchmark):
    before = len(_choices())
    torch.manual_seed(0)
    base = get_model("resnet20", num_classes=10)
    images, labels = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    images_cl = images.contiguous(memory_format=CL)
    steps = {"eager fp32 NCHW": (_step(copy.deepcopy(base), "fp32"), images)}
    for precision in PRECISIONS:
        steps[f"eager {precision} channels_last"] = (_step(copy.deepcopy(base).to(memory_format=CL), precision),
                                                     images_cl)
        steps[f"torch.compile {precision} channels_last"] = (
            _step(torch.compile(copy.deepcopy(base).to(memory_format=CL)), precision), images_cl)
    cfg = TrainConfig(model="resnet20", data=DataConfig(backend="synthetic", batch_size=128))
    precision = choose_amp(cfg, DEV, 32)
    prepared = prepare_model(copy.deepcopy(base), cfg, DEV, 32)
    optimizer = build_optimizer(prepared.module, cfg, DEV, lr=1e-3)
    default = make_train_step(prepared.runner, nn.CrossEntropyLoss(), optimizer, precision.dtype, None)
    steps[f"fastresnet default (amp {precision.amp})"] = (default, images_cl)
    converted = fastresnet.convert(copy.deepcopy(base).to(memory_format=CL), mode="train")
    steps["fastresnet convert(mode=train) fp32 channels_last"] = (_step(converted, "fp32"), images_cl)

    medians = harness.interleaved(benchmark, {name: (lambda s=s, x=x: s(x, labels)) for name, (s, x) in steps.items()},
                                  dev=DEV, group="cpu resnet20 train step b128 32", baseline="eager fp32 NCHW",
                                  rounds=_rounds(), images=128, amp_choice=precision.as_dict(), dispatch=_choices(before))
    _print_ratios(medians, "eager fp32 NCHW")


# ---------------------------------------------------------------------------
# BatchNorm + add + ReLU in training, ResNet-20's shapes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_act_train(benchmark, shape):
    torch.manual_seed(0)
    x, residual = torch.randn(shape), torch.randn(shape)
    grad = torch.randn(shape)
    layouts = {"NCHW": torch.contiguous_format, "channels_last": CL}
    modules = {"eager fp32 NCHW": (harness.BnAddRelu(shape[1]), "NCHW"),
               "eager fp32 channels_last": (harness.BnAddRelu(shape[1]), "channels_last"),
               "torch.compile fp32 channels_last": (torch.compile(harness.BnAddRelu(shape[1])), "channels_last"),
               "fastresnet fp32 channels_last": (BatchNormAct2d(shape[1]), "channels_last")}
    inputs = {name: [t.contiguous(memory_format=layouts[layout]).requires_grad_() for t in (x, residual)]
              for name, (_, layout) in modules.items()}

    def step(name):
        module, layout = modules[name]
        a, r = inputs[name]
        out = module(a, r)
        out.backward(grad.contiguous(memory_format=layouts[layout]))
        for t in (a, r, *module.parameters()):
            t.grad = None

    medians = harness.interleaved(benchmark, {name: (lambda n=name: step(n)) for name in modules}, dev=DEV,
                                  group=f"cpu bn_act train {'x'.join(map(str, shape))}", baseline="eager fp32 NCHW",
                                  rounds=_rounds(), bytes=11 * x.numel() * 4)
    _print_ratios(medians, "eager fp32 NCHW")


def _choices(before: int = 0) -> list[dict]:
    """The tuner's decisions made since `before` of them were (a group's own, not the earlier groups')."""
    from fastresnet.ops import tuning

    return tuning.decisions()[before:]


def _print_ratios(medians: dict[str, float], baseline: str) -> None:
    for name, seconds in medians.items():
        print(f"{name}: {seconds * 1e3:.1f} ms, {medians[baseline] / seconds:.2f}x")
