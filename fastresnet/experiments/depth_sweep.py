"""`depth-sweep`: ResNet-20/32/44/56/110 (1202 on request), beside the paper's Table 6.

Table 6's finding up to 110 layers is that deeper is better: the verdict is shown when the test
error (mean over the seeds) falls at every step in depth, and decided when each step clears twice
its standard error over the seeds (fastresnet.experiments.trends).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import paper
from .figures import curves_and_finals
from .runs import by_net, train_all
from .settings import (FASHION_MNIST_CPU_BUDGET, FASHION_MNIST_QUICK_BUDGET, Settings, configs_over_seeds,
                       parse_depths, provenance)
from .tables import by_epoch_tables, error_header, markdown_table, over_seeds_cell, publish
from .trends import SPREADS, steps_text, trend, verdict_word

NAME = "depth-sweep"
DEPTHS = (20, 32, 44, 56, 110, 1202)
DEFAULT_DEPTHS = "20,32,44,56,110"
# The Fashion-MNIST CPU presets leave ResNet-110 out: on a CPU it alone takes longer than the
# other four together; `--depths 20,32,44,56,110` adds it.
CPU_PRESET_DEPTHS = "20,32,44,56"


def run(settings: Settings, depths: tuple[int, ...], say=print) -> dict | None:
    models = [f"resnet{d}" for d in depths]
    outcomes, finished = train_all(configs_over_seeds(settings, [(m, "") for m in models]), say=say)
    if not finished:
        return None
    runs = by_net(outcomes)
    result = {"experiment": NAME, "dataset": settings.dataset, "budget": settings.budget().__dict__,
              **provenance(settings),
              "depths": list(depths), "runs": runs,
              "verdict": deeper_is_better([runs[m] for m in models]),
              "paper_test_error": {m: paper.TABLE6_TEST_ERROR[m] for m in models},
              "paper_params": {m: paper.TABLE6_PARAMS[m] for m in models}}
    folder = settings.outputs_folder(NAME, depths=(depths, parse_depths(default_depths(settings), DEPTHS)))
    return write_outputs(folder, result, say)


def deeper_is_better(summaries: list[dict]) -> dict:
    """Table 6's finding on the nets' summaries in depth order: the test error falls at every step."""
    t = trend(summaries, "final_test_error")
    if len(summaries) > 1:
        word = verdict_word(t["holds"], t["decided"])
    else:
        word = "not decided: one depth, nothing to compare"
    return {**t, "word": word,
            "criterion": f"shown if each deeper ResNet's final test error (mean over the seeds) is lower; decided "
                         f"if each such step is further than {SPREADS:g} standard errors over the seeds from 0"}


def write_outputs(folder: Path, result: dict, say) -> dict:
    runs = result["runs"]
    models = list(runs)
    v = result["verdict"]
    figure = curves_and_finals(folder / "depth_sweep.png", [runs[m] for m in models], models,
                               "ResNets by depth", result["paper_test_error"], "paper (Table 6, CIFAR-10)")
    rows = [[m, f"{runs[m]['params'] / 1e6:.2f}M", f"{result['paper_params'][m] / 1e6:.2f}M",
             over_seeds_cell(runs[m], "final_train_error"), over_seeds_cell(runs[m]), result["paper_test_error"][m]]
            for m in models]
    steps = f" (test error steps {steps_text(v)})" if v["steps"] else ""
    text = (
        f"# Depth sweep ({result['dataset']}, {result['budget']['iterations']} iterations)\n\n"
        + markdown_table(["net", "params", "paper params", error_header(runs[models[0]], "train"),
                          error_header(runs[models[0]], "test"), "paper test error % (Table 6, CIFAR-10)"], rows)
        + f"\nDeeper is better: **{v['word']}**{steps}.\n\nCriterion: {v['criterion']}.\n"
        + by_epoch_tables([runs[m] for m in models], models)
    )
    return publish(folder, result, text, figure, say)


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depths", default=None,
                        help=f"ResNet depths, from {DEPTHS} (default {DEFAULT_DEPTHS}; {CPU_PRESET_DEPTHS} "
                        "under the Fashion-MNIST CPU preset)")
    parser.add_argument("--with-1202", action="store_true", help="add ResNet-1202 (19.4M parameters)")


def default_depths(settings: Settings) -> str:
    """--depths when not given: without ResNet-110 under the Fashion-MNIST CPU presets."""
    cpu_preset = settings.base_budget() in (FASHION_MNIST_CPU_BUDGET, FASHION_MNIST_QUICK_BUDGET)
    return CPU_PRESET_DEPTHS if cpu_preset else DEFAULT_DEPTHS


def main(args: argparse.Namespace, settings: Settings) -> dict | None:
    depths = parse_depths(args.depths or default_depths(settings), DEPTHS)
    if args.with_1202:
        depths = tuple(sorted(set(depths) | {1202}))
    return run(settings, depths)
