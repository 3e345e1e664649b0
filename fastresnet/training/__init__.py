"""Internals of `python -m fastresnet.train` and `python -m fastresnet.evaluate`."""

from fastresnet.training.config import TrainConfig, validate
from fastresnet.training.fields import ConfigError
from fastresnet.training.loop import NonFiniteLoss, evaluate_model, train

__all__ = ["ConfigError", "NonFiniteLoss", "TrainConfig", "evaluate_model", "train", "validate"]
