"""Drop-in modules: subclasses of torch modules with fused kernels, and fused blocks."""

from fastresnet.nn.batchnorm import BatchNormAct2d
from fastresnet.nn.blocks import BasicBlock, Bottleneck, FuseReport, fuse_bn_act
from fastresnet.nn.inference_blocks import FusedBasicBlock, FusedBottleneck

__all__ = [
    "BatchNormAct2d",
    "BasicBlock",
    "Bottleneck",
    "FuseReport",
    "FusedBasicBlock",
    "FusedBottleneck",
    "fuse_bn_act",
]
