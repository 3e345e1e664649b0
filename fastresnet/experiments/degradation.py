"""`degradation`: plain-20/56 against ResNet-20/56, the paper's Figure 6.

The nets train with the same recipe and seeds. The finding the paper rests
on is seen in the *training* error: deeper plain nets train worse, deeper
residual nets train better. This run shows it when, comparing the final
training errors (mean over the last 10% of iterations) of consecutive depths,

    every deeper plain net is worse by more than `margin` percentage points, and
    every deeper residual net is better (lower by any amount),

with each net's training error the mean over its seeds (`--seeds`). Over several
seeds the verdict is decided only where each step that decides it clears twice
its standard error (fastresnet.experiments.trends); one seed leaves the spread
unmeasured, and the verdict says so.

The verdict, the numbers and the criterion are printed and written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import paper
from .figures import figure6
from .runs import FINAL_WINDOW, by_net, train_all
from .settings import ConfigError, Settings, configs_over_seeds, parse_depths, provenance
from .tables import by_epoch_tables, error_header, markdown_table, over_seeds_cell, publish
from .trends import SPREADS, decided_over, steps_text, trend, verdict_word

NAME = "degradation"
DEPTHS = (20, 32, 44, 56, 110)  # the depths with both a plain and a residual CIFAR net in the zoo
DEFAULT_DEPTHS = "20,56"
DEFAULT_MARGIN = 0.5  # percentage points of training error


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depths", default=DEFAULT_DEPTHS,
                        help=f"plain and residual depths to train (deeper: 20,32,44,56,110); from {DEPTHS}")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="percentage points by which each deeper plain net must train worse")


def verdict(plain: list[dict], residual: list[dict], margin: float) -> dict:
    """Whether the degradation shows (plain training error rising with depth, residual falling), from
    the nets' summaries in depth order, and whether their seeds decide it (trends.trend)."""
    plain_trend = trend(plain, "final_train_error", rises_by=margin)
    residual_trend = trend(residual, "final_train_error")
    shown = plain_trend["holds"] and residual_trend["holds"]
    decided = decided_over([plain_trend, residual_trend])
    return {
        "criterion": (f"final training error = mean over the last {FINAL_WINDOW:.0%} of iterations; shown if each "
                      f"deeper plain net's is higher by more than {margin:g} points and each deeper ResNet's is "
                      f"lower; decided if each such step is further than {SPREADS:g} standard errors over the "
                      "seeds from its bound"),
        "plain": plain_trend,
        "residual": residual_trend,
        "plain_rises": plain_trend["holds"],
        "residual_falls": residual_trend["holds"],
        "shown": shown,
        "decided": decided,
        "word": verdict_word(shown, decided),
    }


def run(settings: Settings, depths: tuple[int, ...], margin: float = DEFAULT_MARGIN, say=print) -> dict | None:
    if len(depths) < 2:
        raise ConfigError(f"--depths {depths}: degradation compares depths, give at least two")
    models = [f"plain{d}" for d in depths] + [f"resnet{d}" for d in depths]
    outcomes, finished = train_all(configs_over_seeds(settings, [(m, "") for m in models]), say=say)
    if not finished:
        return None
    summaries = by_net(outcomes)
    plain = [summaries[f"plain{d}"] for d in depths]
    residual = [summaries[f"resnet{d}"] for d in depths]
    result = {
        "experiment": NAME, "dataset": settings.dataset, "budget": settings.budget().__dict__,
        **provenance(settings),
        "depths": list(depths), "runs": summaries,
        "verdict": verdict(plain, residual, margin),
        "paper": paper.FIGURE6_FINDING,
    }
    folder = settings.outputs_folder(NAME, depths=(depths, parse_depths(DEFAULT_DEPTHS, DEPTHS)))
    return write_outputs(folder, result, plain, residual, depths, say)


def write_outputs(folder: Path, result: dict, plain, residual, depths, say) -> dict:
    figure = figure6(folder / "figure6.png", plain, residual, depths)
    rows, labels = [], []
    for kind, summaries in (("plain", plain), ("ResNet", residual)):
        for depth, s in zip(depths, summaries):
            labels.append(f"{kind}-{depth}")
            paper_error = paper.TABLE6_TEST_ERROR.get(s["model"]) if kind == "ResNet" else None
            rows.append([f"{kind}-{depth}", s["params"], over_seeds_cell(s, "final_train_error"), over_seeds_cell(s),
                         paper_error])
    v = result["verdict"]
    text = (
        f"# Degradation ({result['dataset']}, {result['budget']['iterations']} iterations)\n\n"
        + markdown_table(["net", "params", error_header(plain[0], "train"), error_header(plain[0], "test"),
                          "paper test error %"], rows)
        + f"\nDegradation: **{v['word']}** (plain rises: {v['plain_rises']}, steps {steps_text(v['plain'])}; "
        f"ResNet falls: {v['residual_falls']}, steps {steps_text(v['residual'])}).\n\n"
        f"Criterion: {v['criterion']}.\n\n{result['paper']}\n"
        + by_epoch_tables(plain + residual, labels)
    )
    return publish(folder, result, text, figure, say)


def main(args: argparse.Namespace, settings: Settings) -> dict | None:
    return run(settings, parse_depths(args.depths, DEPTHS), args.margin)
