"""Drop-in modules: subclasses of torch modules with fused kernels, and fused blocks."""

from fastresnet.nn.batchnorm import BatchNormAct2d
from fastresnet.nn.inference_blocks import FusedBasicBlock, FusedBottleneck

__all__ = ["BatchNormAct2d", "FusedBasicBlock", "FusedBottleneck"]
