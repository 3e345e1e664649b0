"""`convert(model, mode)`: swap the ResNet blocks of any model for fused ones, in place.

Recognised blocks (fastresnet.nn.recognise): BasicBlock and Bottleneck of torchvision (resnet*,
resnext*, wide_resnet*, and the backbones of its detection/segmentation models, whose BatchNorms are
FrozenBatchNorm2d when pretrained), of timm's ResNet family, and of fastresnet's model zoo
(torchvision's attribute names, plus an optional boolean `residual` and any parameter-free
`downsample` module). A block is replaced only when every part of it is understood: plain nn.Conv2d
convs, BatchNorms, ReLU activations, timm's attention module after the last BN (squeeze-excite, ECA: run
as it is), and no other extra layers (anti-aliasing, drop-block, drop-path) that are not Identity.
Anything else is left alone, with the reason in the report.

Modes (fastresnet.nn.blocks has the table):
  "inference"  eval runs every conv + BN (+ residual) (+ ReLU) as one op; training the original blocks.
               The stems and other conv -> BN (-> ReLU) chains of sequential containers are folded too.
  "train"      also the training step fused, the path measured per shape; chains folded as above.
  "bn_act"     only each BN (+ add) + ReLU fused into one pass, convs left to cuDNN, in training and
               eval; chains outside blocks left alone.

The fused blocks take over the original children, so the state_dict keys and values are unchanged and
an original checkpoint still loads. Norms swapped in afterwards (torch.nn.SyncBatchNorm's
convert_sync_batchnorm) are honoured, and so is converting a model that already has SyncBatchNorms.

`unfuse(model)` undoes convert in place; converting a converted model first undoes the earlier
conversion, so the last mode asked for is the one the model has.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import torch.nn as nn

from fastresnet.nn.blocks import MODES, FusedBasicBlock, FusedBottleneck
from fastresnet.nn.folded_layers import FOLDED, fold_chain, is_folded_conv, unfold_chains
from fastresnet.nn.recognise import block_kind, conv_bn_chains, foldable_reason, unsupported_reason

log = logging.getLogger("fastresnet.convert")


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


def _fused_block(block: nn.Module, mode: str) -> nn.Module:
    cls = FusedBottleneck if block_kind(block) == "Bottleneck" else FusedBasicBlock
    return cls(block, mode)


def _fold_chains(module: nn.Module, prefix: str, report: ConversionReport, uses: Counter) -> None:
    """Fuse the conv -> BN (-> ReLU) chains among module's children (stems, Sequentials)."""
    for conv_name, bn_name, relu_name in conv_bn_chains(module):
        conv, bn = getattr(module, conv_name), getattr(module, bn_name)
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or foldable_reason(bn) is not None:
            continue
        if type(bn) not in FOLDED:  # a BatchNorm subclass or timm's FrozenBatchNorm2d: left to run as it is
            continue
        relu = getattr(module, relu_name) if relu_name else None
        if type(relu) is not nn.ReLU or uses[id(relu)] != 1:
            relu_name = None
        if uses[id(conv)] != 1 or uses[id(bn)] != 1:
            continue  # a module used twice cannot change behaviour for one of its uses
        fold_chain(module, conv_name, bn_name, relu_name)
        path = f"{prefix}.{conv_name}" if prefix else conv_name
        trio = [conv, bn] + ([relu] if relu_name else [])
        report.replaced.append((path, "+".join(type(m).__name__ for m in trio),
                                "+".join(FOLDED[type(m)].__name__ for m in trio) + " (one conv_bn_act in eval)"))


def _convert_children(module: nn.Module, prefix: str, report: ConversionReport, uses: Counter, mode: str) -> None:
    if mode != "bn_act":
        _fold_chains(module, prefix, report, uses)
    for name, child in list(module.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        if block_kind(child) is not None:
            reason = unsupported_reason(child)
            if reason is None:
                fused = _fused_block(child, mode)
                setattr(module, name, fused)
                report.replaced.append((path, type(child).__name__, type(fused).__name__))
                continue
            report.left.append((path, type(child).__name__, reason))
        elif isinstance(child, nn.Conv2d) and not is_folded_conv(child) and mode != "bn_act":
            report.left.append((path, type(child).__name__, "outside a supported block: runs unchanged"))
        _convert_children(child, path, report, uses, mode)


def convert(model: nn.Module, mode: str = "inference", verbose: bool = False) -> nn.Module:
    """Replace the supported ResNet blocks of `model` with fused ones, in place; return the model (a new
    fused block when `model` itself is a block).

    mode: "inference", "train" or "bn_act" (see the module docstring). The report (a ConversionReport)
    is kept as `model.fastresnet_report`, logged on "fastresnet.convert" and printed when `verbose`.
    """
    if mode not in MODES:
        raise ValueError(f"convert: mode={mode!r} is not supported; use one of {MODES}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    model = unfuse(model)
    report = ConversionReport()
    if block_kind(model) is not None and unsupported_reason(model) is None:
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


def unfuse(model: nn.Module) -> nn.Module:
    """Undo convert() in place: every fused block back to the block it replaced (an instance of its class
    holding the same children), every folded chain back to its modules' own classes. Returns the model
    (the original block when `model` is a fused block); a model without fused modules is returned as it is.
    """
    unfold_chains(model)
    if isinstance(model, (FusedBasicBlock, FusedBottleneck)):
        model = model.unfused()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (FusedBasicBlock, FusedBottleneck)):
                setattr(module, name, child.unfused())
    model.__dict__.pop("fastresnet_report", None)
    return model
