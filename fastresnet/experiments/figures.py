"""The experiments' figures, drawn like the paper's (matplotlib, Agg back end, written atomically)."""

from __future__ import annotations

from pathlib import Path

from .tables import seed_count

COLOURS = ("tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown")
# The error axis ends at this multiple of the worst final test error, as the paper's Figure 6 ends at
# 20%: the nets' last epochs, where they part, are what the figure compares, not their first steps.
ERROR_AXIS_TOP = 3.0


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the experiments draw their figures with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write fig to path atomically and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    _pyplot().close(fig)
    return path


def error_curves(ax, summaries: list[dict], labels: list[str], title: str, top: float | None = None) -> None:
    """Figure 6's style: training error thin, test error bold, one colour per net, against iterations,
    the error axis from 0 to `top` (default: error_axis_top of these nets). A net trained on several
    seeds draws its first seed's run (runs.over_seeds), as the paper draws one run, and the legend says so."""
    for colour, summary, label in zip(COLOURS, summaries, labels):
        train = summary["train_curve"]
        test = summary["test_curve"]
        if train:
            ax.plot([s for s, _ in train], [e for _, e in train], color=colour, lw=0.7, alpha=0.8)
        if test:
            ax.plot([s for s, _ in test], [e for _, e in test], color=colour, lw=2.2, label=label,
                    marker="o" if len(test) < 30 else None)
    if top is None:
        top = error_axis_top(summaries)
    if top is not None:
        ax.set_ylim(0, top)
    ax.set_title(title)
    ax.set_xlabel("iterations")
    ax.set_ylabel("error (%)")
    ax.grid(alpha=0.3)
    ax.legend(title="bold: test, thin: train" + seeds_line(summaries), fontsize=8)


def seeds_line(summaries: list[dict]) -> str:
    """The legend's line for nets trained on several seeds, whose curves are each one's first seed's run."""
    first_seeds = {s["seed"] for s in summaries if seed_count(s) > 1}
    if not first_seeds:
        return ""
    return f"\nthe runs of seed {first_seeds.pop()}" if len(first_seeds) == 1 else "\neach net's first seed"


def error_axis_top(summaries: list[dict]) -> float | None:
    """ERROR_AXIS_TOP times the worst final test error of these nets (at most 100%); None without tests."""
    finals = [s["test_curve"][-1][1] for s in summaries if s["test_curve"]]
    return min(100.0, ERROR_AXIS_TOP * max(finals)) if finals else None


def figure6(path: Path, plain: list[dict], residual: list[dict], depths: tuple[int, ...]) -> Path:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    top = error_axis_top(plain + residual)  # the panels share the axis: it holds the nets of both
    error_curves(left, plain, [f"plain-{d}" for d in depths], "plain networks", top)
    error_curves(right, residual, [f"ResNet-{d}" for d in depths], "residual networks", top)
    return _save(fig, path)


def figure7(path: Path, responses: dict[str, list[float]]) -> Path:
    """Std of each 3x3 layer's response: in network order (top) and sorted by magnitude (bottom)."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7))
    for colour, (label, stds) in zip(COLOURS, responses.items()):
        style = "--" if label.startswith("plain") else "-"
        top.plot(range(1, len(stds) + 1), stds, style, color=colour, lw=1.2, label=label)
        bottom.plot(range(1, len(stds) + 1), sorted(stds, reverse=True), style, color=colour, lw=1.2, label=label)
    top.set_xlabel("layer index (original)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.set_ylabel("std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def curves_and_finals(path: Path, summaries: list[dict], labels: list[str], title: str,
                      paper: dict[str, float] | None = None, paper_label: str = "paper") -> Path:
    """Error curves on the left; final test error per net (ours, and the paper's where given) on the right."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    error_curves(left, summaries, labels, title)
    x = range(len(labels))
    colours = [COLOURS[i % len(COLOURS)] for i in x]  # each net's colour in the curves
    seeds = max(seed_count(s) for s in summaries)
    right.bar([i - 0.2 for i in x], [s["final_test_error"] for s in summaries], width=0.4,
              label="this run" if seeds < 2 else f"mean of {seeds} seeds", color=colours)
    if paper:
        right.bar([i + 0.2 for i in x], [paper.get(label, float("nan")) for label in labels], width=0.4,
                  label=paper_label, color="lightgrey", edgecolor=colours)
    right.set_xticks(list(x), labels)
    right.set_ylabel("final test error (%)")
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=8)
    return _save(fig, path)


def warmup_figure(path: Path, runs: dict[str, list[dict]], threshold: float, title: str) -> Path:
    """Training error (left) and learning rate (right) of each run's logged steps."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for colour, (label, records) in zip(COLOURS, runs.items()):
        steps = [r["step"] for r in records]
        left.plot(steps, [r["error"] for r in records], color=colour, lw=1.5, label=label)
        right.plot(steps, [r["lr"] for r in records], color=colour, lw=1.5, label=label)
    left.axhline(threshold, color="grey", ls="--", lw=0.8, label=f"{threshold:g}%")
    left.set_title(title)
    left.set_ylabel("training error (%)")
    right.set_title("learning rate")
    right.set_yscale("log")
    for ax in (left, right):
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)
