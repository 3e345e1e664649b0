"""The CIFAR-10 ResNets and plain nets of the paper's Section 4.2.

These are not the ImageNet nets: a 3x3 16-filter stem, three stages of n
basic blocks on 32x32, 16x16 and 8x8 maps with 16, 32 and 64 filters,
global average pooling and a 10-way fc: 6n+2 weighted layers. Shortcuts are
option A by default (zero-padding where the dimensions grow), so a residual
net has exactly the depth, width and parameters of its plain twin.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .blocks import BasicBlock, check_shortcut, init_weights, make_shortcut

STAGE_WIDTHS = (16, 32, 64)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs.

    Args:
        blocks_per_stage: n (3, 5, 7, 9, 18, 200 give 20 ... 1202 layers).
        num_classes: size of the final fc layer.
        shortcut: "A" (the paper's CIFAR choice), "B" or "C".
        residual: False builds the plain net.
        zero_init_residual: start each block's last BN at zero.
        norm_layer: the normalisation after each conv (nn.BatchNorm2d).
    """

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        shortcut: str = "A",
        residual: bool = True,
        zero_init_residual: bool = False,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
    ) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self._shortcut = check_shortcut(shortcut)
        self._residual = residual
        self.inplanes = STAGE_WIDTHS[0]

        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(STAGE_WIDTHS[0], blocks_per_stage, stride=1)
        self.layer2 = self._make_layer(STAGE_WIDTHS[1], blocks_per_stage, stride=2)
        self.layer3 = self._make_layer(STAGE_WIDTHS[2], blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(STAGE_WIDTHS[2], num_classes)

        init_weights(self, zero_init_residual)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            block_stride = stride if i == 0 else 1
            downsample = None
            if self._residual:
                downsample = make_shortcut(self._shortcut, self.inplanes, planes, block_stride, self._norm_layer)
            layers.append(
                BasicBlock(
                    self.inplanes, planes, block_stride, downsample,
                    norm_layer=self._norm_layer, residual=self._residual,
                )
            )
            self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def _cifar_factory(depth: int, residual: bool):
    if (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet has 6n+2 layers; {depth} is not of that form")
    n = (depth - 2) // 6
    kind = "resnet" if residual else "plain"

    def factory(**kwargs) -> CifarResNet:
        return CifarResNet(n, residual=residual, **kwargs)

    factory.__name__ = f"{kind}{depth}"
    factory.__qualname__ = factory.__name__
    factory.__doc__ = f"{'ResNet' if residual else 'Plain'}-{depth} for CIFAR-10 ({n} basic blocks per stage)."
    return factory


resnet20 = _cifar_factory(20, residual=True)
resnet32 = _cifar_factory(32, residual=True)
resnet44 = _cifar_factory(44, residual=True)
resnet56 = _cifar_factory(56, residual=True)
resnet110 = _cifar_factory(110, residual=True)
resnet1202 = _cifar_factory(1202, residual=True)
plain20 = _cifar_factory(20, residual=False)
plain32 = _cifar_factory(32, residual=False)
plain44 = _cifar_factory(44, residual=False)
plain56 = _cifar_factory(56, residual=False)
plain110 = _cifar_factory(110, residual=False)
