"""`layer-responses`: the spread of each 3x3 layer's output, the paper's Figure 7.

A layer's response is the output of a 3x3 conv after its BN, before the
ReLU and before the residual addition: in the zoo's torchvision names, the
output of `bnK` beside `convK`. Its standard deviation is taken over every
element (images, channels, positions) of the test set, in evaluation mode,
as the population std from float64 running sums:

    std = sqrt(sum(x^2)/N - (sum(x)/N)^2)

Forward hooks on the BN modules read the statistics inside the hook, because
the ReLU that follows runs in place and overwrites the tensor afterwards.
Nets come from checkpoints (`--checkpoint RUN_DIR ...`) or are trained here
with the settings' budget (reusing `degradation`'s runs of the same budget).
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch
from torch import nn

from fastresnet.data import build_loaders
from fastresnet.models import get_model
from fastresnet.training import smoke
from fastresnet.training.checkpoint import load_checkpoint
from fastresnet.training.config import TrainConfig, saved_values
from fastresnet.training.fields import apply_flat

from . import paper
from .figures import figure7
from .runs import train_all
from .settings import Settings, configs_over_seeds, parse_depths, provenance
from .tables import markdown_table, publish
from .trends import steps_text, trend, verdict_word

NAME = "layer-responses"
DEPTHS = (20, 32, 44, 56, 110)
DEFAULT_DEPTHS = "20,56"


def conv3x3_responses(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, BN) for every 3x3 conv, in network order: the BN named like the conv (conv2 -> bn2)."""
    modules = dict(model.named_modules())
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
            prefix, _, leaf = name.rpartition(".")
            bn_name = (prefix + "." if prefix else "") + leaf.replace("conv", "bn", 1)
            bn = modules.get(bn_name)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                raise ValueError(f"3x3 conv {name} has no BN named {bn_name} after it")
            pairs.append((name, bn))
    return pairs


class _RunningMoments:
    """Sum and sum of squares of a layer's outputs, kept on its device (read once, at the end)."""

    def __init__(self):
        self.sums = None
        self.count = 0

    def hook(self, module, inputs, output):
        x = output.detach().double()
        sums = torch.stack([x.sum(), x.square().sum()])
        self.sums = sums if self.sums is None else self.sums + sums
        self.count += x.numel()

    def std(self) -> float:
        if self.count == 0:
            raise RuntimeError("no images went through the net: the loader is empty")
        total, squares = self.sums.tolist()
        mean = total / self.count
        return math.sqrt(max(squares / self.count - mean * mean, 0.0))


@torch.no_grad()
def response_stds(model: nn.Module, images_batches, device: torch.device | str = "cpu") -> list[tuple[str, float]]:
    """[(conv name, std of its response)] over the batches, in network order; the model in eval mode."""
    pairs = conv3x3_responses(model)
    moments = [_RunningMoments() for _ in pairs]
    handles = [bn.register_forward_hook(m.hook) for (_, bn), m in zip(pairs, moments)]
    was_training = model.training
    model.eval()
    try:
        for batch in images_batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(images.to(device).float())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [(name, m.std()) for (name, _), m in zip(pairs, moments)]


def load_trained(path: str | Path, device: torch.device) -> tuple[nn.Module, TrainConfig]:
    """A net and its TrainConfig from a run directory or a checkpoint file of `python -m fastresnet.train`."""
    state = load_checkpoint(path)
    cfg = apply_flat(TrainConfig(), saved_values(state["config"]), f"the config in {path}")
    fc = state["model"]["fc.weight"]
    options = {"num_classes": fc.shape[0], **({"shortcut": cfg.shortcut} if cfg.shortcut else {})}
    model = get_model(cfg.model, **options)
    model.load_state_dict(state["model"])
    return model.to(device), cfg


def measure(path: str | Path, device: torch.device) -> dict:
    model, cfg = load_trained(path, device)
    data = build_loaders(cfg.data, device=device, seed=cfg.seed)
    stds = response_stds(model, smoke.batches(data.val), device)  # the whole test set, except in a smoke run
    return {"model": cfg.model, "seed": cfg.seed, "checkpoint": str(path), "layers": [n for n, _ in stds],
            "stds": [s for _, s in stds]}


def label(model: str) -> str:
    return f"{'plain' if model.startswith('plain') else 'ResNet'}-{depth(model)}"


def run(settings: Settings, depths: tuple[int, ...], checkpoints: list[str] | None = None, say=print) -> dict | None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    given = bool(checkpoints)
    if not given:
        models = [f"plain{d}" for d in depths] + [f"resnet{d}" for d in depths]
        outcomes, finished = train_all(configs_over_seeds(settings, [(m, "") for m in models]), say=say)
        if not finished:
            return None
        checkpoints = [str(o.run_dir) for o in outcomes]
    nets = [measure(path, device) for path in checkpoints]
    result = {"experiment": NAME, **provenance(settings), "nets": nets, "findings": findings(nets),
              "paper": paper.FIGURE7_FINDING}
    # nets given as checkpoints are whatever nets they are: only trained ones are named by their depths
    default = parse_depths(DEFAULT_DEPTHS, DEPTHS)
    folder = settings.outputs_folder(NAME, depths=(default if given else depths, default))
    return write_outputs(folder, result, say)


def findings(nets: list[dict]) -> dict:
    """Per model, the mean response std over its seeds' nets (and their spread); whether each ResNet's is
    below its plain twin's and whether it falls with ResNet depth, each with whether the seeds decide it."""
    per_model: dict[str, list[dict]] = {}
    for n in nets:
        per_model.setdefault(n["model"], []).append(n)
    models = {m: response_over_seeds(model_nets) for m, model_nets in per_model.items()}
    plain_twins = {m: m.replace("resnet", "plain") for m in models if m.startswith("resnet")}
    below_plain = {m: trend([models[plain], models[m]], "response")
                   for m, plain in plain_twins.items() if plain in models}
    resnets = [models[m] for m in sorted((m for m in models if m.startswith("resnet")), key=depth)]
    return {"mean_std": {m: s["response"] for m, s in models.items()},
            "mean_std_spread": {m: s["response_std"] for m, s in models.items()},
            "resnet_below_plain": below_plain,
            "deeper_resnet_smaller": trend(resnets, "response") if len(resnets) > 1 else None}


def response_over_seeds(nets: list[dict]) -> dict:
    """One model's nets (one per seed) as their mean response std and its spread, in the keys trends.trend reads."""
    values = [sum(n["stds"]) / len(n["stds"]) for n in nets]
    return {"response": sum(values) / len(values), "response_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": [n.get("seed") for n in nets]}


def depth(model: str) -> int:
    return int("".join(ch for ch in model if ch.isdigit()))


def yes_no(t: dict | None) -> str:
    """A table cell for a trend: yes or no, and over several seeds whether they decide it."""
    if t is None:
        return "-"
    word = "yes" if t["holds"] else "no"
    if t["decided"] is None:
        return word
    return f"{word} (decided)" if t["decided"] else f"{word} (within the seeds' spread)"


def write_outputs(folder: Path, result: dict, say) -> dict:
    nets, f = result["nets"], result["findings"]
    deeper = f["deeper_resnet_smaller"]
    deeper_text = ("not decided: fewer than two ResNet depths" if deeper is None else
                   f"{verdict_word(deeper['holds'], deeper['decided'])} (steps {steps_text(deeper)})")
    first_seed = {}  # the figure draws one net per model, like the paper's
    for n in nets:
        first_seed.setdefault(n["model"], n)
    figure = figure7(folder / "figure7.png", {label(m): n["stds"] for m, n in first_seed.items()})
    rows = [[label(n["model"]), n.get("seed", "-"), len(n["stds"]), sum(n["stds"]) / len(n["stds"]), max(n["stds"]),
             min(n["stds"]), yes_no(f["resnet_below_plain"].get(n["model"]))]
            for n in nets]
    text = (
        "# Layer responses (std of each 3x3 conv's output after BN, before ReLU/addition)\n\n"
        + markdown_table(["net", "seed", "3x3 layers", "mean std", "max std", "min std",
                          "below its plain twin (mean over seeds)"], rows)
        + f"\nDeeper ResNet smaller (mean std falls with depth): **{deeper_text}**.\n\n{result['paper']}\n"
    )
    return publish(folder, result, text, figure, say)


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depths", default=DEFAULT_DEPTHS, help=f"plain and residual depths to train, from {DEPTHS}")
    parser.add_argument("--checkpoint", nargs="+", default=None,
                        help="run directories or checkpoint files of trained nets (instead of training them here)")


def main(args: argparse.Namespace, settings: Settings) -> dict | None:
    return run(settings, parse_depths(args.depths, DEPTHS), args.checkpoint)
