"""The network a training config names: the zoo's model with the config's shortcut and initialisation.

Apart from model.py (which makes it fast for the device) so that precision.py, which model.py asks for the
autocast dtype, can build the run's network for its timed steps without an import cycle.
"""

from __future__ import annotations

from torch import nn

from fastresnet.models import get_model
from fastresnet.training.config import TrainConfig


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    options = {"num_classes": num_classes}
    if cfg.shortcut:
        options["shortcut"] = cfg.shortcut
    if cfg.zero_init_residual:
        options["zero_init_residual"] = True
    return get_model(cfg.model, **options)
