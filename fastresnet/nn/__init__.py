"""Drop-in modules.

- BatchNormAct2d / SyncBatchNormAct2d: nn.BatchNorm2d / nn.SyncBatchNorm with the residual add and
  ReLU fused in (same state_dict).
- FusedBasicBlock / FusedBottleneck: the fused ResNet blocks convert() puts in place of a model's own,
  in one of three modes (inference; train; bn_act), each fusing eval and training as its table says.
- folded_layers: the conv -> BN (-> ReLU) chains convert() folds outside the blocks (stems).
- plain: when the fused modules compute as the plain modules they stand for (graph captures, hooks).
- tune_dispatch(model, x): make every measured choice of a training step before torch.compile.
"""

from fastresnet.nn.batchnorm import BatchNormAct2d, SyncBatchNormAct2d
from fastresnet.nn.blocks import FusedBasicBlock, FusedBottleneck, tune_dispatch

__all__ = ["BatchNormAct2d", "FusedBasicBlock", "FusedBottleneck", "SyncBatchNormAct2d", "tune_dispatch"]
