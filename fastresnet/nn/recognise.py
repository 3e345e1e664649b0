"""Which modules of torchvision, timm and fastresnet the library knows how to fuse: the one place that
recognises a ResNet block, a conv -> BN (-> ReLU) chain and a foldable BatchNorm (convert, fold_bn).

Blocks are recognised by class name and origin, never by attribute names alone: a pre-activation
block has the same names in a different order.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

_RESNET_MODULES = ("torchvision.models.resnet", "timm.models.resnet", "fastresnet.models")
_BLOCK_NAMES = ("BasicBlock", "Bottleneck")
_NET_NAMES = ("ResNet", "CifarResNet")  # their forward starts conv1 -> bn1 -> relu (or act1)
_RELU_NAMES = ("relu", "act1", "act2", "act3")
_OPTIONAL_IDENTITY_NAMES = ("drop_block", "aa", "drop_path")  # timm's extras, fused only as Identity
# timm's attention module (squeeze-excite, ECA, ...) after the last BN of its blocks, which a fused block
# runs as it is
_ATTENTION_NAME = "se"


def block_kind(module: nn.Module) -> Optional[str]:
    """"BasicBlock", "Bottleneck" or None. torchvision's and timm's blocks go by their class names; the
    model zoo promises torchvision's forward for every *Block / *Bottleneck class, the kind following
    from whether there is a conv3."""
    cls = type(module)
    if not cls.__module__.startswith(_RESNET_MODULES):
        return None
    if cls.__module__.startswith("fastresnet.models") and cls.__name__.endswith(("Block", "Bottleneck")):
        return "Bottleneck" if hasattr(module, "conv3") else "BasicBlock"
    return cls.__name__ if cls.__name__ in _BLOCK_NAMES else None


def is_batchnorm(module: nn.Module) -> bool:
    """torch's BatchNorm2d or SyncBatchNorm, or a FrozenBatchNorm2d (torchvision.ops.misc, timm.layers)."""
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return True
    return type(module).__name__ == "FrozenBatchNorm2d" and all(
        hasattr(module, a) for a in ("weight", "bias", "running_mean", "running_var"))


def foldable_reason(bn: nn.Module) -> Optional[str]:
    """Why this BatchNorm cannot be folded into the conv before it in eval mode, or None if it can."""
    if not is_batchnorm(bn):
        return f"{type(bn).__name__} is not a BatchNorm2d, SyncBatchNorm or FrozenBatchNorm2d"
    if getattr(bn, "running_mean", None) is None:
        return "BatchNorm2d without running statistics (track_running_stats=False) normalizes by batch statistics"
    if isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)) and type(bn).forward not in (
            nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward):
        return f"{type(bn).__name__} subclasses a BatchNorm with a forward of its own"
    return None


def unsupported_reason(block: nn.Module) -> Optional[str]:
    """Why `block` (a recognised ResNet block) cannot be fused, or None: its convs must be zero-padded
    nn.Conv2d, its norms BatchNorms, its activations ReLU, an attention module may follow the last BN in
    timm's blocks (`se`), and anything else is absent or Identity."""
    if any(True for _ in block.parameters(recurse=False)) or any(True for _ in block.buffers(recurse=False)):
        return "the block has parameters or buffers of its own"
    num_convs = 3 if hasattr(block, "conv3") else 2
    expected = {f"{kind}{i}" for kind in ("conv", "bn") for i in range(1, num_convs + 1)} | {"downsample"}
    for i in range(1, num_convs + 1):
        conv, bn = getattr(block, f"conv{i}", None), getattr(block, f"bn{i}", None)
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
            return (f"conv{i} is {type(conv).__name__} (padding_mode {getattr(conv, 'padding_mode', '?')}), not a "
                    "zero-padded nn.Conv2d")
        if bn is None or not is_batchnorm(bn):
            return f"bn{i} is {type(bn).__name__}, not a BatchNorm2d, SyncBatchNorm or FrozenBatchNorm2d"
    if not isinstance(getattr(block, "residual", True), bool):
        return "attribute 'residual' is not a bool"
    for name, child in block.named_children():
        if name in expected:
            continue
        if name in _RELU_NAMES and type(child) is nn.ReLU:
            continue
        if name in _OPTIONAL_IDENTITY_NAMES and isinstance(child, nn.Identity):
            continue
        if name == _ATTENTION_NAME and type(block).__module__.startswith("timm."):  # timm's forwards apply it
            continue
        return f"child '{name}' ({type(child).__name__}) has no fused equivalent"
    return None


def _runs_children_in_order(module: nn.Module) -> bool:
    """nn.Sequential (or a subclass keeping its forward) and torchvision's IntermediateLayerGetter."""
    if isinstance(module, nn.Sequential):
        return type(module).forward is nn.Sequential.forward
    return type(module).__name__ == "IntermediateLayerGetter" and type(module).__module__.startswith("torchvision")


def conv_bn_chains(module: nn.Module, in_blocks: bool = False) -> list[tuple[str, str, Optional[str]]]:
    """(conv, bn, relu or None) child names whose outputs `module`'s forward feeds one into the next:
    neighbours in a sequential container, the stem of a ResNet, and with in_blocks the conv{i}/bn{i}
    pairs of a block (whose ReLU placement is the block's own: None). Types are not checked here."""
    cls = type(module)
    names = [n for n, _ in module.named_children()]
    if cls.__module__.startswith(_RESNET_MODULES) and cls.__name__ in _NET_NAMES:
        relu = next((n for n in ("relu", "act1") if hasattr(module, n)), None)
        return [("conv1", "bn1", relu)] if hasattr(module, "conv1") and hasattr(module, "bn1") else []
    if block_kind(module) is not None:
        pairs = [(n, "bn" + n[4:], None) for n in names if n.startswith("conv") and "bn" + n[4:] in names]
        return pairs if in_blocks else []
    if not _runs_children_in_order(module):
        return []
    return [(names[i], names[i + 1], names[i + 2] if i + 2 < len(names) else None) for i in range(len(names) - 1)]
