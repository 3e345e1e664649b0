"""The paper's model zoo, by name.

    >>> from fastresnet.models import get_model, list_models
    >>> model = get_model("resnet50", stride_in_1x1=True)   # the paper's v1 ResNet-50
    >>> model = get_model("resnet110")                       # CIFAR-10, option A shortcuts
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from torch import nn

from . import cifar, resnet
from .blocks import BasicBlock, Bottleneck, ZeroPadShortcut
from .cifar import CifarResNet
from .resnet import ResNet


@dataclass(frozen=True)
class ModelSpec:
    factory: Callable[..., nn.Module]
    module_class: type  # whose constructor defines the accepted options
    fixed: tuple[str, ...]  # constructor arguments the factory sets itself
    input_size: int  # the side of the square input the net is designed for (pixels)
    dataset: str  # "imagenet" or "cifar10"


def _imagenet(factory, plain=False) -> ModelSpec:
    fixed = ("block", "layers") + (("residual",) if plain else ())
    return ModelSpec(factory, ResNet, fixed, 224, "imagenet")


def _cifar(factory) -> ModelSpec:
    return ModelSpec(factory, CifarResNet, ("blocks_per_stage", "residual"), 32, "cifar10")


_REGISTRY: dict[str, ModelSpec] = {
    **{name: _imagenet(getattr(resnet, name)) for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")},
    **{name: _imagenet(getattr(resnet, name), plain=True) for name in ("plain18", "plain34")},
    **{
        f"{kind}{depth}": _cifar(getattr(cifar, f"{kind}{depth}"))
        for kind in ("resnet", "plain")
        for depth in (20, 32, 44, 56, 110, 1202)
        if not (kind == "plain" and depth == 1202)
    },
}


def list_models(dataset: str | None = None) -> list[str]:
    """Names of every model, or of those for `dataset` ("imagenet" or "cifar10")."""
    return [name for name, spec in _REGISTRY.items() if dataset is None or spec.dataset == dataset]


def model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(_REGISTRY)}") from None


def model_options(name: str) -> list[str]:
    """The keyword options `get_model(name, ...)` accepts."""
    spec = model_spec(name)
    params = inspect.signature(spec.module_class.__init__).parameters
    return [p for p in params if p != "self" and p not in spec.fixed]


def get_model(name: str, **kwargs) -> nn.Module:
    """Build the model called `name` with He initialisation.

    Raises ValueError naming the valid choices for an unknown name or option.
    """
    spec = model_spec(name)
    valid = model_options(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for model {name!r}; valid options: {', '.join(valid)}")
    return spec.factory(**kwargs)


__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ModelSpec",
    "ResNet",
    "ZeroPadShortcut",
    "get_model",
    "list_models",
    "model_options",
    "model_spec",
]
