"""`convert(model, mode="inference")`: swap the ResNet blocks of any model for fused ones, in place.

Recognised blocks: BasicBlock and Bottleneck of torchvision (resnet*, resnext*,
wide_resnet*, and the backbones of its detection/segmentation models, whose
BatchNorms are FrozenBatchNorm2d when pretrained), of timm's ResNet family, and
of fastresnet's model zoo (torchvision's attribute names, plus an optional
boolean `residual` and any parameter-free `downsample` module). A block is
replaced only when every part of it is understood: plain nn.Conv2d convs,
foldable BatchNorms, ReLU activations, and no extra layers (squeeze-excite,
anti-aliasing, drop-block, drop-path) that are not Identity. Anything else is
left alone, with the reason recorded in the report.

The fused blocks take over the original children, so the state_dict keys and
values are unchanged and an original checkpoint still loads.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import torch.nn as nn

from fastresnet.fold import foldable_reason
from fastresnet.nn.folded_layers import fold_chain, is_folded_conv
from fastresnet.nn.inference_blocks import FusedBasicBlock, FusedBottleneck

log = logging.getLogger("fastresnet.convert")

_BLOCK_MODULES = ("torchvision.models.resnet", "timm.models.resnet", "fastresnet.models")
_BLOCK_CLASS_NAMES = ("BasicBlock", "Bottleneck")
_RELU_NAMES = ("relu", "act1", "act2", "act3")
_OPTIONAL_IDENTITY_NAMES = ("drop_block", "aa", "se", "drop_path")
_NET_CLASS_NAMES = ("ResNet", "CifarResNet")  # forward: conv1 -> bn1 -> relu (or act1) first


@dataclasses.dataclass
class ConversionReport:
    """What convert() did: one (path, class, ...) row per replaced block and per layer it left alone."""

    replaced: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (path, old class, new class)
    left: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (path, class, reason)

    def __str__(self) -> str:
        lines = [f"fastresnet.convert: replaced {len(self.replaced)} blocks, left {len(self.left)} layers"]
        lines += [f"  replaced {path or '<root>'}: {old} -> {new}" for path, old, new in self.replaced]
        lines += [f"  left {path or '<root>'} ({cls}): {why}" for path, cls, why in self.left]
        return "\n".join(lines)


def is_resnet_block(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ in _BLOCK_CLASS_NAMES and cls.__module__.startswith(_BLOCK_MODULES)


def unsupported_reason(block: nn.Module) -> str | None:
    """Why `block` (a recognised ResNet block) cannot be fused, or None."""
    num_convs = 3 if hasattr(block, "conv3") else 2
    expected = {f"{kind}{i}" for kind in ("conv", "bn") for i in range(1, num_convs + 1)} | {"downsample"}
    for i in range(1, num_convs + 1):
        conv, bn = getattr(block, f"conv{i}", None), getattr(block, f"bn{i}", None)
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
            return f"conv{i} is {type(conv).__name__} (padding_mode {getattr(conv, 'padding_mode', '?')}), not a zero-padded nn.Conv2d"
        reason = foldable_reason(bn) if bn is not None else "missing"
        if reason:
            return f"bn{i}: {reason}"
    if not isinstance(getattr(block, "residual", True), bool):
        return "attribute 'residual' is not a bool"
    for name, child in block.named_children():
        if name in expected:
            continue
        if name in _RELU_NAMES and type(child) is nn.ReLU:
            continue
        if name in _OPTIONAL_IDENTITY_NAMES and isinstance(child, nn.Identity):
            continue
        return f"child '{name}' ({type(child).__name__}) has no fused equivalent"
    return None


def _fused_block(block: nn.Module, mode: str = "inference") -> nn.Module:
    if mode == "train":
        from fastresnet.nn import fused_blocks as training_blocks

        cls = training_blocks.FusedBottleneck if hasattr(block, "conv3") else training_blocks.FusedBasicBlock
        return cls(block).train(block.training)
    cls = FusedBottleneck if hasattr(block, "conv3") else FusedBasicBlock
    return cls(block).train(block.training)


def _runs_children_in_order(module: nn.Module) -> bool:
    """nn.Sequential (or a subclass keeping its forward) and torchvision's IntermediateLayerGetter."""
    if isinstance(module, nn.Sequential):
        return type(module).forward is nn.Sequential.forward
    return type(module).__name__ == "IntermediateLayerGetter" and type(module).__module__.startswith("torchvision")


def _chains(module: nn.Module) -> list[tuple[str, str, str | None]]:
    """(conv, bn, relu or None) child names that `module`'s forward calls one after another."""
    cls = type(module)
    if cls.__name__ in _NET_CLASS_NAMES and cls.__module__.startswith(_BLOCK_MODULES):
        relu = next((n for n in ("relu", "act1") if hasattr(module, n)), None)
        return [("conv1", "bn1", relu)] if hasattr(module, "conv1") and hasattr(module, "bn1") else []
    if not _runs_children_in_order(module):
        return []
    names = [n for n, _ in module.named_children()]
    chains = []
    for i in range(len(names) - 1):
        relu = names[i + 2] if i + 2 < len(names) else None
        chains.append((names[i], names[i + 1], relu))
    return chains


def _fold_chains(module: nn.Module, prefix: str, report: ConversionReport, uses: Counter) -> None:
    """Fuse the conv -> BN (-> ReLU) chains among module's children (stems, Sequentials)."""
    for conv_name, bn_name, relu_name in _chains(module):
        conv, bn = getattr(module, conv_name), getattr(module, bn_name)
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or foldable_reason(bn) is not None:
            continue
        relu = getattr(module, relu_name) if relu_name else None
        if type(relu) is not nn.ReLU or uses[id(relu)] != 1:
            relu_name = None
        if uses[id(conv)] != 1 or uses[id(bn)] != 1:
            continue  # a module used twice cannot change behaviour for one of its uses
        fold_chain(module, conv_name, bn_name, relu_name)
        path = f"{prefix}.{conv_name}" if prefix else conv_name
        parts = "+".join(type(m).__name__ for m in (conv, bn, relu) if m is not None and (m is not relu or relu_name))
        report.replaced.append((path, parts, "conv_bn_act (conv keeps its class; BN/ReLU pass through in eval)"))


def _convert_children(
    module: nn.Module, prefix: str, report: ConversionReport, uses: Counter, mode: str = "inference"
) -> None:
    _fold_chains(module, prefix, report, uses)
    for name, child in list(module.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        if is_resnet_block(child):
            reason = unsupported_reason(child)
            if reason is None:
                fused = _fused_block(child, mode)
                setattr(module, name, fused)
                report.replaced.append((path, type(child).__name__, type(fused).__name__))
                continue
            report.left.append((path, type(child).__name__, reason))
        elif isinstance(child, nn.Conv2d) and not is_folded_conv(child):
            report.left.append((path, type(child).__name__, "outside a supported block: runs unchanged"))
        _convert_children(child, path, report, uses, mode)


def convert(model: nn.Module, mode: str = "inference", verbose: bool = False) -> nn.Module:
    """Replace the supported ResNet blocks of `model` with fused ones, in place; return the model.

    mode="inference": the fused blocks run the Triton or cuDNN fused path in
    eval mode and the original eager computation in training mode.
    mode="train": fastresnet.nn.fused_blocks' blocks, which also fuse the
    training step (BatchNorm statistics in the conv epilogue, normalise-on-load;
    the path measured per shape) and run the inference path in eval mode.
    The report (a ConversionReport) is kept as `model.fastresnet_report`, logged on "fastresnet.convert" and printed when
    `verbose`.
    """
    if mode not in ("inference", "train"):
        raise ValueError(f"convert: mode={mode!r} is not supported; use 'inference' or 'train'")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    report = ConversionReport()
    if is_resnet_block(model) and unsupported_reason(model) is None:
        fused = _fused_block(model, mode)
        report.replaced.append(("", type(model).__name__, type(fused).__name__))
        model = fused
    else:
        uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        _convert_children(model, "", report, uses, mode)
    model.fastresnet_report = report
    log.info("%s", report)
    if verbose:
        print(report)
    return model
