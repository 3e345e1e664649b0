"""Drop-in modules: subclasses of torch modules with fused kernels, and fused blocks.

- BatchNormAct2d: nn.BatchNorm2d with the residual add and ReLU fused in.
- BasicBlock / Bottleneck (+ fuse_bn_act): torchvision's blocks with each
  bn -> relu and bn + identity -> relu as one call; convs stay cuDNN's.
- InferenceBasicBlock / InferenceBottleneck: eval-only blocks, every conv with
  its BN folded and the epilogue fused (convert(mode="inference")).
- FusedBasicBlock / FusedBottleneck: training blocks with BN statistics in the
  conv epilogue and normalise-on-load (convert(mode="train")); in eval they
  run the inference path.
"""

from fastresnet.nn.batchnorm import BatchNormAct2d
from fastresnet.nn.blocks import BasicBlock, Bottleneck, FuseReport, fuse_bn_act
from fastresnet.nn.inference_blocks import InferenceBasicBlock, InferenceBottleneck
from fastresnet.nn.fused_blocks import FusedBasicBlock, FusedBottleneck, tune_dispatch

__all__ = [
    "BatchNormAct2d",
    "BasicBlock",
    "Bottleneck",
    "FuseReport",
    "FusedBasicBlock",
    "FusedBottleneck",
    "InferenceBasicBlock",
    "InferenceBottleneck",
    "fuse_bn_act",
    "tune_dispatch",
]
