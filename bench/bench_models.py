"""Forward and training-step images/s of the model zoo against torchvision's.

Same run, same device, channels_last, bf16 autocast on a GPU. fastresnet's
plain models are torchvision's layout, so the ratio should be 1.0: this is
the baseline the fused blocks are measured from.
"""

import pytest
import torch
import torchvision

import harness
from fastresnet.flops import count_macs
from fastresnet.models import get_model, model_spec

MODELS = ["resnet18", "resnet50", "resnet20"]
PROVIDERS = ["torchvision", "fastresnet"]


def _build(name, provider, dev):
    if provider == "torchvision":
        if not hasattr(torchvision.models, name):
            pytest.skip(f"torchvision has no {name}")
        model = getattr(torchvision.models, name)(weights=None)
    else:
        model = get_model(name)
    return model.to(dev, memory_format=torch.channels_last)


def _input(name, dev):
    s = harness.sizes()
    cifar = model_spec(name).dataset == "cifar10"
    batch, side = (s.cifar_batch, 32) if cifar else (s.batch, s.image_size)
    return torch.randn(batch, 3, side, side, device=dev).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", MODELS)
def test_forward(benchmark, name, provider):
    dev = harness.device()
    model = _build(name, provider, dev).eval()
    x = _input(name, dev)

    def step():
        with torch.no_grad(), harness.autocast(dev):
            return model(x)

    macs = count_macs(model, tuple(x.shape[1:]))
    harness.run(
        benchmark, step, dev=dev, group=f"{name} forward", provider=provider,
        baseline=provider == "torchvision", images=x.shape[0], flops=2 * macs * x.shape[0],
    )


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", MODELS)
def test_train_step(benchmark, name, provider):
    dev = harness.device()
    model = _build(name, provider, dev).train()
    x = _input(name, dev)
    target = torch.randint(0, 10, (x.shape[0],), device=dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with harness.autocast(dev):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        return loss

    macs = count_macs(model, tuple(x.shape[1:]))
    harness.run(
        benchmark, step, dev=dev, group=f"{name} train step", provider=provider,
        baseline=provider == "torchvision", images=x.shape[0], flops=6 * macs * x.shape[0],
    )
