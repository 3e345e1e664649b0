"""`layer-responses`: the spread of each 3x3 layer's output, the paper's Figure 7.

What a response is and how its std is taken: responses.py. Nets come from
checkpoints (`--checkpoint RUN_DIR ...`) or are trained here with the
settings' budget (reusing `degradation`'s runs of the same budget), whose
records hold their responses, measured when each run finished.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from . import paper
from .figures import figure7
from .responses import measure
from .runs import recorded_responses, train_all
from .settings import Settings, configs_over_seeds, parse_depths, provenance
from .tables import markdown_table, publish
from .trends import steps_text, trend, verdict_word

NAME = "layer-responses"
DEPTHS = (20, 32, 44, 56, 110)
DEFAULT_DEPTHS = "20,56"


def label(model: str) -> str:
    return f"{'plain' if model.startswith('plain') else 'ResNet'}-{depth(model)}"


def run(settings: Settings, depths: tuple[int, ...], checkpoints: list[str] | None = None, say=print) -> dict | None:
    given = bool(checkpoints)
    if given:
        nets = [measure(path) for path in checkpoints]
    else:
        models = [f"plain{d}" for d in depths] + [f"resnet{d}" for d in depths]
        outcomes, finished = train_all(configs_over_seeds(settings, [(m, "") for m in models]), say=say)
        if not finished:
            return None
        nets = [recorded_responses(o.run_dir) for o in outcomes]
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
