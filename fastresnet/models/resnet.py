"""The ImageNet ResNets and plain nets of the paper's Table 1.

Module and parameter names are torchvision's, so a torchvision state_dict
loads with `strict=True` and gives identical outputs. The defaults are
torchvision's too (v1.5 strides, option B shortcuts); the paper's own
variant is `stride_in_1x1=True`, and Table 3's shortcut options are
`shortcut="A" | "B" | "C"`.
"""

from __future__ import annotations

from typing import Callable, Optional, Type, Union

import torch
from torch import Tensor, nn

from .blocks import BasicBlock, Bottleneck, check_shortcut, init_weights, make_shortcut

Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(nn.Module):
    """A 7x7 stem, four stages of residual (or plain) blocks, pool and fc.

    Args:
        block: BasicBlock (ResNet-18/34) or Bottleneck (ResNet-50/101/152).
        layers: blocks per stage (Table 1), e.g. [3, 4, 6, 3].
        num_classes: size of the final fc layer.
        zero_init_residual: start each block's last BN at zero.
        groups, width_per_group: ResNeXt / wide ResNet bottleneck width.
        replace_stride_with_dilation: per stage 2-4, dilate instead of stride.
        norm_layer: the normalisation after each conv (nn.BatchNorm2d).
        shortcut: "A" zero-padded identity, "B" projection where the shape
            changes (torchvision's), "C" projection on every block.
        stride_in_1x1: put a bottleneck's stride on its first 1x1 conv (v1).
        residual: False builds the plain net (no shortcuts, no additions).
    """

    def __init__(
        self,
        block: Block,
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Optional[list[bool]] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        shortcut: str = "B",
        stride_in_1x1: bool = False,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                f"replace_stride_with_dilation should be None or a 3-element list, got {replace_stride_with_dilation}"
            )
        if stride_in_1x1 and block is not Bottleneck:
            raise ValueError("stride_in_1x1 applies to Bottleneck nets (ResNet-50/101/152) only")
        self._norm_layer = norm_layer
        self._shortcut = check_shortcut(shortcut)
        self._residual = residual
        self._stride_in_1x1 = stride_in_1x1
        self.inplanes = 64
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group

        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        init_weights(self, zero_init_residual)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        extra = {"stride_in_1x1": True} if self._stride_in_1x1 else {}
        layers = []
        for i in range(blocks):
            in_planes = self.inplanes
            block_stride = stride if i == 0 else 1
            downsample = None
            if self._residual:
                downsample = make_shortcut(
                    self._shortcut, in_planes, planes * block.expansion, block_stride, self._norm_layer
                )
            layers.append(
                block(
                    in_planes, planes, block_stride, downsample, self.groups, self.base_width,
                    previous_dilation if i == 0 else self.dilation, self._norm_layer,
                    residual=self._residual, **extra,
                )
            )
            self.inplanes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


def resnet152(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 8, 36, 3], **kwargs)


def plain18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], residual=False, **kwargs)


def plain34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], residual=False, **kwargs)
