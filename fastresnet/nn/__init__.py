"""Drop-in modules: subclasses of torch modules with fused kernels, and fused blocks."""

from fastresnet.nn.batchnorm import BatchNormAct2d
from fastresnet.nn.blocks import BasicBlock, Bottleneck, FuseReport, fuse_bn_act

__all__ = ["BatchNormAct2d", "BasicBlock", "Bottleneck", "FuseReport", "fuse_bn_act"]
