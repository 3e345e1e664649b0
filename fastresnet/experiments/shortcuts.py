"""`shortcuts`: options A, B and C at one depth, beside the paper's Table 3.

A: identity, zero-padded where the dimensions grow (no parameters); B:
projections (1x1 conv + BN) where they grow, identity elsewhere; C:
projections on every shortcut. The paper (Table 3, ImageNet ResNet-34) finds
the differences small: under a point of top-1 error. This run calls its
spread small when the largest minus the smallest final test error is at most
`threshold` percentage points.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import paper
from .figures import curves_and_finals
from .runs import by_net, train_all
from .settings import ConfigError, Settings, configs_over_seeds, provenance
from .tables import by_epoch_tables, error_header, markdown_table, over_seeds_cell, publish

NAME = "shortcuts"
DEPTHS = (20, 32, 44, 56, 110)
OPTIONS = ("A", "B", "C")
DEFAULT_DEPTH = 20
DEFAULT_THRESHOLD = 1.0  # percentage points; Table 3's spread is 0.84


def run(settings: Settings, depth: int, threshold: float = DEFAULT_THRESHOLD, say=print) -> dict | None:
    if depth not in DEPTHS:
        raise ConfigError(f"--depth {depth}: choose one of {', '.join(map(str, DEPTHS))}")
    model = f"resnet{depth}"
    # A is the CIFAR nets' default: its run is the one trained without a shortcut option
    nets = [(model, "" if option == "A" else option) for option in OPTIONS]
    outcomes, finished = train_all(configs_over_seeds(settings, nets), say=say)
    if not finished:
        return None
    runs = dict(zip(OPTIONS, by_net(outcomes).values()))
    errors = [runs[o]["final_test_error"] for o in OPTIONS]
    spread = max(errors) - min(errors)
    result = {
        "experiment": NAME, "dataset": settings.dataset, "budget": settings.budget().__dict__,
        **provenance(settings), "model": model,
        "runs": runs, "spread": spread, "threshold": threshold, "small": spread <= threshold,
        "criterion": f"spread of final test errors (max - min over A, B, C) <= {threshold:g} points",
        "paper_top1_error": paper.TABLE3_TOP1_ERROR, "paper": paper.TABLE3_FINDING,
    }
    return write_outputs(settings.outputs_folder(NAME, depth=(depth, DEFAULT_DEPTH)), result, say)


def write_outputs(folder: Path, result: dict, say) -> dict:
    runs = result["runs"]
    figure = curves_and_finals(folder / "shortcuts.png", [runs[o] for o in OPTIONS], list(OPTIONS),
                               f"{result['model']}: shortcut options", result["paper_top1_error"],
                               "paper (Table 3, ImageNet ResNet-34 top-1)")
    rows = [[o, runs[o]["params"], over_seeds_cell(runs[o], "final_train_error"), over_seeds_cell(runs[o]),
             result["paper_top1_error"][o]] for o in OPTIONS]
    text = (
        f"# Shortcut options, {result['model']} ({result['dataset']}, {result['budget']['iterations']} iterations)\n\n"
        + markdown_table(["option", "params", error_header(runs["A"], "train"), error_header(runs["A"], "test"),
                          "paper top-1 error % (Table 3, ImageNet ResNet-34)"], rows)
        + f"\nSpread {result['spread']:.2f} points: **{'small' if result['small'] else 'not small'}** "
        f"({result['criterion']}).\n\n{result['paper']}\n"
        + by_epoch_tables([runs[o] for o in OPTIONS], [f"option {o}" for o in OPTIONS])
    )
    return publish(folder, result, text, figure, say)


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH, help=f"the ResNet depth, from {DEPTHS}")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="percentage points of test error under which the options' spread counts as small")


def main(args: argparse.Namespace, settings: Settings) -> dict | None:
    return run(settings, args.depth, args.threshold)
