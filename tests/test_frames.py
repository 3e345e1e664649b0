"""From a module's forward to a kernel launch in at most four of the project's own frames: the module,
the op, the op's body, the kernels' launcher (Liger-Kernel's module -> function -> kernel, plus the
tuner's one question). A deeper path is host time on every call and a reader's detour.

A converted ResNet-50 bottleneck (projection shortcut, stride 2) is walked in training (forward and
backward) and in eval on tiny inputs, on the paths a GPU takes where the CPU can run them (the Triton
kernels through the interpreter, ATen's ops elsewhere). At every launch, a Triton kernel's or an ATen
op's (custom ops' bodies included), the stack's frames in fastresnet/ and kernels/ are counted.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.resnet import Bottleneck

import fastresnet
from fastresnet import backend

ROOTS = tuple(os.path.realpath(p) + os.sep for p in (Path(fastresnet.__file__).parent,
                                                      Path(__file__).resolve().parent.parent / "kernels"))
LIMIT = 4

pytestmark = pytest.mark.skipif(not backend.triton_available() or torch.cuda.is_available(),
                                reason="walks the CPU's interpreter path")


def project_frames() -> list[str]:
    frames, frame = [], sys._getframe(1)
    while frame is not None:
        path = os.path.realpath(frame.f_code.co_filename)
        if path.startswith(ROOTS):
            frames.append(f"{Path(path).name}:{frame.f_code.co_name}")
        frame = frame.f_back
    return frames[::-1]


class Launches(TorchDispatchMode):
    """Every ATen op and Triton launch with the project frames above it. A fastresnet custom op's body
    runs here as the dispatcher would run it, with this mode still on, so that its launches are seen."""

    def __init__(self):
        super().__init__()
        self.seen: list[list[str]] = []  # per launch: the project frames, then what was launched
        self.in_kernel = False

    def record(self, what: str) -> None:
        self.seen.append(project_frames() + [what])

    def deepest(self) -> list[str]:
        return max(self.seen, key=len)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.in_kernel:  # the interpreter's own tensor work inside a kernel
            return func(*args, **kwargs)
        if func.namespace == "fastresnet":
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        self.record(str(func))
        return func(*args, **kwargs)


@pytest.fixture
def launches(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    mode = Launches()
    run = InterpretedFunction.run

    def recorded_run(self, *args, **kwargs):
        mode.record(f"triton {self.fn.__name__}")
        mode.in_kernel = True
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.in_kernel = False

    monkeypatch.setattr(InterpretedFunction, "run", recorded_run)
    return mode


def resnet50_block() -> nn.Module:
    """layer2.0 of ResNet-50 at an eighth of its width: a 1x1, a strided 3x3, a 1x1, a projection."""
    torch.manual_seed(0)
    downsample = nn.Sequential(nn.Conv2d(32, 64, 1, stride=2, bias=False), nn.BatchNorm2d(64))
    block = Bottleneck(32, 16, stride=2, downsample=downsample)
    return fastresnet.convert(block, mode="train")


def test_the_walk_counts_the_project_frames_above_a_launch(launches):
    from fastresnet.ops.bn_act import affine_act

    x = torch.randn(2, 3, 2, 2)
    with launches:
        affine_act(x, torch.ones(3), torch.zeros(3))
    (triton,) = [seen for seen in launches.seen if seen[-1].startswith("triton")]
    assert triton == ["bn_act.py:affine_act", "bn_act.py:_affine_act", "bn_act.py:affine_act_fwd",
                      "triton _affine_act_fwd"]


# (training or eval, the block's path (None: its own choice), pins): every path of the main tree the CPU runs
WALKS = [
    ("train", None, None),  # the CPU's choice: the Triton path, its kernels through the interpreter
    ("train", "mixed", None),
    ("train", "cudnn_bnact", None),
    ("train", "cudnn_bnact", "batch_norm_act=eager"),
    ("train", "eager", None),
    ("eval", None, None),  # each conv + BN + ReLU one op: the Triton kernel
    ("eval", None, "conv_bn_act=cudnn_affine"),
    ("eval", "cudnn_bnact", None),
    ("eval", "cudnn_bnact", "batch_norm_act=eager"),
]


@pytest.mark.parametrize("mode,path,pins", WALKS, ids=lambda v: str(v))
def test_every_path_of_a_converted_resnet50_block_is_at_most_four_frames_deep(launches, mode, path, pins):
    from fastresnet.ops import tuning

    tuning.override(pins)
    block = resnet50_block().train(mode == "train")
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    context = torch.enable_grad() if mode == "train" else torch.no_grad()
    with context:
        block(x.requires_grad_(mode == "train"), path)  # the first call chooses; the walk is of the calls after
        with launches:
            out = block(x, path)
            if mode == "train":
                out.sum().backward()
    kernels = {seen[-1] for seen in launches.seen if seen[-1].startswith("triton")}
    expected = {(None, "train", None): {"triton _conv_stats_fwd", "triton _affine_act_bwd_reduce"},
                (None, "eval", None): {"triton _conv_bn_act_fwd"},
                (None, "eval", "conv_bn_act=cudnn_affine"): {"triton _affine_act_fwd"}}.get((path, mode, pins), set())
    assert kernels >= expected and len(launches.seen) > 10, kernels
    deepest = launches.deepest()
    assert len(deepest) - 1 <= LIMIT, f"{len(deepest) - 1} project frames to a launch: " + " -> ".join(deepest)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_other_modules_are_at_most_four_frames_deep(launches, mode):
    """BatchNormAct2d, and a converted stem (conv -> bn -> relu folded into one op in eval)."""
    from fastresnet.nn import BatchNormAct2d

    torch.manual_seed(0)
    stem = fastresnet.convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                            nn.ReLU(inplace=True)), mode="inference")
    modules = [BatchNormAct2d(8), stem]
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    for module, inputs in zip(modules, (x, images)):
        module.train(mode == "train")
        with torch.no_grad():
            module(inputs)  # the first call chooses
            with launches:
                module(inputs)
    deepest = launches.deepest()
    assert len(launches.seen) > 3 and len(deepest) - 1 <= LIMIT, " -> ".join(deepest)
