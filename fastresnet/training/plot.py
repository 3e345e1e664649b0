"""Training curves as a PNG, drawn like the paper's Figures 4 and 6.

Error (%) against iterations: training error thin, test error bold, in the
same colour; and the training loss with the learning rate on a second axis.
Each panel has its legend; the title names the model and the data set.
matplotlib with the Agg back end (no display needed); if matplotlib is not
installed the plot is skipped with a note, never the run.
"""

from __future__ import annotations

from pathlib import Path

from fastresnet.training.metrics import read_jsonl


def plot_curves(metrics_path: Path, png_path: Path, title: str = "") -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_jsonl(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    test = [r for r in records if r.get("kind") == "eval"]
    if not train and not test:
        return None

    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    colour = "tab:blue"
    if train:
        ax_err.plot([r["step"] for r in train], [r["error"] for r in train], color=colour, lw=0.8, alpha=0.7,
                    label="train error")
    if test:
        ax_err.plot([r["step"] for r in test], [r["top1_error"] for r in test], color=colour, lw=2.2,
                    marker="o" if len(test) < 30 else None, label="test error")
    ax_err.set_xlabel("iterations")
    ax_err.set_ylabel("error (%)")
    ax_err.grid(alpha=0.3)
    ax_err.legend()

    if train:
        steps = [r["step"] for r in train]
        loss = ax_loss.plot(steps, [r["loss"] for r in train], color="tab:red", lw=1.0, label="train loss")
        ax_lr = ax_loss.twinx()
        lr = ax_lr.plot(steps, [r["lr"] for r in train], color="tab:gray", lw=1.0, ls="--", label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_loss.legend(handles=loss + lr)  # one legend for the lines of both y axes
    ax_loss.set_xlabel("iterations")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = png_path.with_name("." + png_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path
