"""Drop-in modules: subclasses of torch modules with fused kernels, and fused blocks."""

from fastresnet.nn.batchnorm import BatchNormAct2d

__all__ = ["BatchNormAct2d"]
