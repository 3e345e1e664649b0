"""Residual blocks with BatchNorm, residual add and ReLU fused, and fuse_bn_act.

BasicBlock and Bottleneck have torchvision's structure and names (conv1, bn1,
conv2, bn2, conv3, bn3, relu, downsample, stride), so their state_dicts are
torchvision's. The difference is in forward: every `bn -> relu` and the last
`bn + identity -> relu` is one BatchNormAct2d call, one pass over memory
instead of three.

fuse_bn_act(model) swaps, in place, every torchvision-style block of an
existing model (torchvision's, timm's plain ResNet blocks, fastresnet's model
zoo) for the fused one, sharing the same parameter and buffer tensors, so the
state_dict keeps its keys and values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import Tensor, nn

from fastresnet.nn.batchnorm import BatchNormAct2d, is_plain_batchnorm

logger = logging.getLogger(__name__)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_planes, out_planes, 3, stride=stride, padding=dilation, groups=groups, bias=False, dilation=dilation
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def _fused_norm_layer(norm_layer: Optional[Callable]) -> Callable[..., BatchNormAct2d]:
    """torchvision's ResNet passes norm_layer=nn.BatchNorm2d: it becomes BatchNormAct2d."""
    if norm_layer is None or norm_layer is nn.BatchNorm2d:
        return BatchNormAct2d
    if isinstance(norm_layer, type) and issubclass(norm_layer, BatchNormAct2d):
        return norm_layer
    raise TypeError(f"fused blocks need a BatchNormAct2d norm_layer, got {norm_layer!r}")


class _FusedBlock(nn.Module):
    """What BasicBlock and Bottleneck share: the shortcut and its addition.

    residual=False makes a plain (shortcut-free) block, as in the paper's plain
    nets: the last BatchNorm is followed by ReLU with nothing added.
    """

    residual: bool

    def _shortcut(self, x: Tensor) -> Optional[Tensor]:
        if not self.residual:
            return None
        return x if self.downsample is None else self.downsample(x)


class BasicBlock(_FusedBlock):
    """torchvision's BasicBlock (two 3x3 convolutions) with fused BatchNorm + add + ReLU."""

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable] = None,
        *,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        norm_layer = _fused_norm_layer(norm_layer)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes, act="relu")
        self.relu = nn.ReLU(inplace=True)  # kept for torchvision's structure; the BNs apply it
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes, act="relu")  # bn2(out, identity) = relu(bn2(out) + identity)
        self.downsample = downsample
        self.stride = stride
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x))
        return self.bn2(self.conv2(out), self._shortcut(x))

    def zero_init_last(self) -> None:
        if self.bn2.weight is not None:
            nn.init.zeros_(self.bn2.weight)


class Bottleneck(_FusedBlock):
    """torchvision's Bottleneck (1x1, 3x3 with the stride, 1x1 expanding by 4)
    with fused BatchNorm + add + ReLU."""

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable] = None,
        *,
        residual: bool = True,
    ) -> None:
        super().__init__()
        norm_layer = _fused_norm_layer(norm_layer)
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width, act="relu")
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width, act="relu")
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion, act="relu")  # bn3(out, identity)
        self.relu = nn.ReLU(inplace=True)  # kept for torchvision's structure; the BNs apply it
        self.downsample = downsample
        self.stride = stride
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        return self.bn3(self.conv3(out), self._shortcut(x))

    def zero_init_last(self) -> None:
        if self.bn3.weight is not None:
            nn.init.zeros_(self.bn3.weight)


# ---------------------------------------------------------------------------
# fuse_bn_act: swap the blocks of an existing model
# ---------------------------------------------------------------------------

# Blocks are recognised by class name and origin, never by attribute names
# alone: a pre-activation block has the same names in a different order.
_BLOCK_MODULE_PREFIXES = ("torchvision.models", "timm.models", "fastresnet.models")
_FUSED_TYPES = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}


@dataclass
class FuseReport:
    """What fuse_bn_act did: (module name, original class) replaced, (name, why) skipped."""

    replaced: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fuse_bn_act: replaced {len(self.replaced)} blocks, skipped {len(self.skipped)}"]
        lines += [f"  replaced {name or '<root>'} ({kind})" for name, kind in self.replaced]
        lines += [f"  skipped {name or '<root>'}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _is_identity(module: Optional[nn.Module]) -> bool:
    return module is None or type(module) is nn.Identity


def _why_not_fusable(block: nn.Module, kind: str) -> Optional[str]:
    """None when `block` computes exactly torchvision's forward; else the reason."""
    norms = ["bn1", "bn2", "bn3"] if kind == "Bottleneck" else ["bn1", "bn2"]
    for name in norms + ["conv1", "conv2"] + (["conv3"] if kind == "Bottleneck" else []):
        if not isinstance(getattr(block, name, None), nn.Module):
            return f"has no module {name}"
    for name in norms:
        if not is_plain_batchnorm(getattr(block, name)):
            return f"{name} is a {type(getattr(block, name)).__name__}, not a BatchNorm2d"
    acts = [n for n in ("relu", "act1", "act2", "act3") if hasattr(block, n)]
    if not acts:
        return "has no activation module"
    for name in acts:
        if type(getattr(block, name)) is not nn.ReLU:
            return f"{name} is a {type(getattr(block, name)).__name__}, not nn.ReLU"
    for name in ("drop_block", "aa", "se", "drop_path"):  # timm's optional extras
        if not _is_identity(getattr(block, name, None)):
            return f"{name} is a {type(getattr(block, name)).__name__} (only identity is fused)"
    return None


def _fused_copy(block: nn.Module, kind: str) -> _FusedBlock:
    """A fused block holding `block`'s own conv, BatchNorm and downsample tensors."""
    fused_type = _FUSED_TYPES[kind]
    fused = fused_type.__new__(fused_type)
    nn.Module.__init__(fused)
    fused.conv1 = block.conv1
    fused.bn1 = BatchNormAct2d.from_batchnorm(block.bn1, act="relu")
    fused.conv2 = block.conv2
    fused.bn2 = BatchNormAct2d.from_batchnorm(block.bn2, act="relu")
    if kind == "Bottleneck":
        fused.conv3 = block.conv3
        fused.bn3 = BatchNormAct2d.from_batchnorm(block.bn3, act="relu")
    relu = getattr(block, "relu", None)  # timm names it act1/act2/act3
    fused.relu = relu if relu is not None else nn.ReLU(inplace=True)
    fused.downsample = block.downsample
    fused.stride = getattr(block, "stride", block.conv2.stride[0])
    fused.residual = bool(getattr(block, "residual", True))
    return fused.train(block.training)


def _block_kind(module: nn.Module) -> Optional[str]:
    """"BasicBlock", "Bottleneck" or None. torchvision's and timm's blocks go by
    their exact class names; fastresnet's model zoo promises torchvision's
    forward for every *Block / *Bottleneck class (PlainBlock included), and the
    kind follows from whether there is a conv3."""
    cls = type(module)
    if cls in (BasicBlock, Bottleneck):  # already fused
        return None
    if cls.__module__.startswith("fastresnet.models") and cls.__name__.endswith(("Block", "Bottleneck")):
        return "Bottleneck" if hasattr(module, "conv3") else "BasicBlock"
    if cls.__name__ in _FUSED_TYPES and cls.__module__.startswith(_BLOCK_MODULE_PREFIXES):
        return cls.__name__
    return None


def fuse_bn_act(model: nn.Module, *, return_report: bool = False):
    """Replace every torchvision-style BasicBlock / Bottleneck in `model` by the
    fused block, in place, sharing parameter and buffer tensors (state_dict
    keys and values are unchanged). Blocks with extras that are not identity
    (squeeze-excitation, drop-path, anti-aliasing, another activation or norm)
    are left alone and listed in the report, which is also logged.

    Returns the model (a new fused block when `model` itself is a block), or
    (model, FuseReport) with return_report=True.
    """
    report = FuseReport()
    root = _fuse_module(model, "", report)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full_name = f"{name}.{child_name}" if name else child_name
            fused = _fuse_module(child, full_name, report)
            if fused is not child:
                setattr(module, child_name, fused)
    logger.info("%s", report)
    return (root, report) if return_report else root


def _fuse_module(module: nn.Module, name: str, report: FuseReport) -> nn.Module:
    kind = _block_kind(module)
    if kind is None:
        return module
    why = _why_not_fusable(module, kind)
    if why is not None:
        report.skipped.append((name, why))
        return module
    report.replaced.append((name, f"{type(module).__module__}.{type(module).__name__}"))
    return _fused_copy(module, kind)
