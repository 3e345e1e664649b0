"""The profile's outputs: profile.md (a table per provider), profile.png (a stacked bar per
provider), profile.json (the same numbers), and per provider its trace.json and kernels.tsv
(every kernel or op name with the category it got: the list tests/test_profile.py takes)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fastresnet.profiling import categories as cat
from fastresnet.profiling.ceilings import Ceilings
from fastresnet.profiling.timeline import Breakdown
from fastresnet.profiling.work import Work

OTHER_LIMIT = 0.05  # "other" above this share of the step is reported loudly, with its names
WALL_TOLERANCE = 0.05  # the trace's window and the host clock must agree within this (or WALL_SLACK_MS)
WALL_SLACK_MS = 0.1
CPU_LABELS = {cat.HOST_GAP: "host overhead (Python, views, autograd)"}
COLOURS = {cat.CONV_FORWARD: "#1f77b4", cat.CONV_DGRAD: "#4f9bd0", cat.CONV_WGRAD: "#9ecae1",
           cat.CONV_BACKWARD: "#6baed6", cat.MATMUL: "#17becf", cat.BN_ACT: "#ff7f0e", cat.POOL_LOSS: "#bcbd22",
           cat.OPTIMIZER: "#2ca02c", cat.COPIES: "#8c564b", cat.OTHER: "#d62728", cat.HOST_GAP: "#c7c7c7",
           cat.DATA: "#555555"}
FUSED_COLOURS = ("#9467bd", "#c5b0d5", "#e377c2", "#f7b6d2", "#7b4173", "#a55194")


@dataclass
class ProviderResult:
    provider: str
    description: str
    breakdown: Breakdown
    trace: Path


@dataclass
class ProfileRun:
    title: str  # e.g. "resnet50 training step, batch 256"
    command: str
    device_name: str
    mode: str
    batch_size: int
    steps: int
    warmup: int
    step_flops: float  # the model's conv and fc FLOPs per step (2 per multiply-add; training: 3 passes)
    ceilings: Ceilings | None
    environment: dict = field(default_factory=dict)
    results: list[ProviderResult] = field(default_factory=list)


def label(category: str, device: str) -> str:
    return CPU_LABELS.get(category, category) if device == "cpu" else category


def floor_ms(work: Work | None, ceilings: Ceilings | None) -> float | None:
    if work is None or ceilings is None or (work.flops <= 0 and work.bytes <= 0):
        return None
    return max(work.flops / (ceilings.matmul_tflops * 1e12), work.bytes / (ceilings.copy_gbs * 1e9)) * 1e3


def _rate(value: float, unit: str) -> str:
    """Three significant figures, with a prefix that keeps the number readable (CPU rates are small)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:,.3g} {prefix}{unit}"
    return f"{value:,.3g} {unit}"


def achieved(work: Work | None, ms: float) -> str:
    if work is None or ms <= 0:
        return "-"
    if work.flops > 0:
        return _rate(work.flops / (ms * 1e-3), "FLOP/s")
    if work.bytes > 0:
        return _rate(work.bytes / (ms * 1e-3), "B/s")
    return "-"


def wall_gap(b: Breakdown) -> float | None:
    """|window - host clock| / host clock, or None without a host measurement."""
    if not b.wall_ms:
        return None
    return abs(b.window_ms - b.wall_ms) / b.wall_ms


def warnings(b: Breakdown) -> list[str]:
    """What a reader must not miss: a large "other" (with its names), a window off the host clock."""
    out = []
    other = b.row_ms(cat.OTHER) / b.step_ms if b.step_ms else 0.0
    if other > OTHER_LIMIT:
        names = "; ".join(f"`{_short(n)}` {ms:.3f} ms" for n, ms, _ in b.top_names(cat.OTHER, 10))
        out.append(f"WARNING: 'other' is {other:.1%} of the step, above the {OTHER_LIMIT:.0%} limit: these names are "
                   f"in no table of fastresnet/profiling/categories.py (add them there and to tests/test_profile.py): "
                   f"{names}")
    gap = wall_gap(b)
    if gap is not None and gap > WALL_TOLERANCE and abs(b.window_ms - b.wall_ms) / b.steps > WALL_SLACK_MS:
        out.append(f"WARNING: the trace's window ({b.step_ms:.3f} ms/step) and the host clock "
                   f"({b.wall_ms / b.steps:.3f} ms/step) differ by {gap:.1%} (tolerance {WALL_TOLERANCE:.0%}): "
                   "the trace may not hold the whole step")
    return out


def _short(name: str, width: int = 110) -> str:
    name = name.replace("|", "/")
    return name if len(name) <= width else name[: width - 3] + "..."


def _num(value: float | None, scale: float, digits: int = 2) -> str:
    return "-" if not value else f"{value / scale:,.{digits}f}"


def provider_table(r: ProviderResult, run: ProfileRun) -> list[str]:
    b = r.breakdown
    lines = ["| category | ms/step | share | GFLOP/step | MB/step | achieved | floor ms | x floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for category in cat.row_order(b.time_ms):
        ms = b.row_ms(category)
        work = b.work.get(category)
        floor = floor_ms(work, run.ceilings)
        lines.append(
            f"| {label(category, b.device)} | {ms:,.3f} | {ms / b.step_ms:.1%} | "
            f"{_num(work and work.flops, 1e9)} | {_num(work and work.bytes, 1e6, 1)} | {achieved(work, ms)} | "
            f"{'-' if floor is None else f'{floor:,.3f}'} | {'-' if not floor else f'{ms / floor:,.1f}x'} |")
    step_work = Work(flops=run.step_flops)
    floor = floor_ms(step_work, run.ceilings)
    lines.append(f"| **step** | **{b.step_ms:,.3f}** | 100% | {_num(run.step_flops, 1e9)} (model) | | "
                 f"{achieved(step_work, b.step_ms)} | {'-' if floor is None else f'{floor:,.3f}'} | "
                 f"{'-' if not floor else f'{b.step_ms / floor:,.1f}x'} |")
    return lines


def largest_table(b: Breakdown, n: int = 15) -> list[str]:
    entries = [(name, ms, calls, category) for category in b.names
               for name, ms, calls in b.top_names(category, n)]
    entries.sort(key=lambda e: -e[1])
    lines = ["| name | category | ms/step | calls/step |", "|---|---|---:|---:|"]
    lines += [f"| `{_short(name)}` | {label(category, b.device)} | {ms:,.3f} | {calls:g} |"
              for name, ms, calls, category in entries[:n]]
    return lines


def markdown(run: ProfileRun) -> str:
    first = run.results[0].breakdown
    device = first.device
    c = run.ceilings
    lines = [f"# Where the time goes: {run.title} on {run.device_name}", "",
             f"- Command: `{run.command}`",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in run.environment.items()),
             f"- Steps: {run.warmup} warm-up steps unprofiled, one under the profiler's own warm-up (dropped), "
             f"then {run.steps} profiled; every number is per step, averaged over them.",
             ("- Step time: the profiled window read on the device timeline, from an idle device to an idle device. "
              "Kernels fill it (where streams overlap, the time is split between the kernels); the time no kernel runs "
              f"is `{cat.DATA}` while the host waits for the next batch, else `{cat.HOST_GAP}` (Python, launches, "
              "syncs)." if device == "cuda" else
              "- Step time: the profiled window read on the main thread: each op's own time (outside the ops it "
              f"calls) is a row; time in no op, in views, allocation and autograd's bookkeeping is "
              f"`{CPU_LABELS[cat.HOST_GAP]}`; `{cat.DATA}` is the wait for the next batch."),
             f"- The rows add up to the step time exactly; the host clock around the same steps checks that the window "
             f"is the whole step (tolerance {WALL_TOLERANCE:.0%}).",
             ("- Ceilings measured in this process: copy " + f"{_rate(c.copy_gbs * 1e9, 'B/s')}, {c.dtype} matmul "
              f"{_rate(c.matmul_tflops * 1e12, 'FLOP/s')} ({c.device}). Floor: the FLOPs at the matrix rate or the bytes (every "
              "tensor read once, every output written once) at the copy bandwidth, whichever is longer; `x floor` is "
              "the time over it. Work is shown where the recorded shapes give it (not for inductor's or fastresnet's "
              "fused kernels)." if c else "- Ceilings: none measured."),
             "", "## Summary", "",
             f"| provider | ms/step | img/s | vs {run.results[0].provider} | host clock ms/step | built as |",
             "|---|---:|---:|---:|---:|---|"]
    for r in run.results:
        b = r.breakdown
        wall = f"{b.wall_ms / b.steps:,.3f}" if b.wall_ms else "-"
        lines.append(f"| {r.provider} | {b.step_ms:,.3f} | {run.batch_size / (b.step_ms * 1e-3):,.0f} | "
                     f"{first.step_ms / b.step_ms:.2f}x | {wall} | {r.description} |")
    lines += ["", "![time per step by category](profile.png)", ""]
    for r in run.results:
        lines += [f"## {r.provider}", "", r.description, f"(trace: `{r.trace.parent.name}/{r.trace.name}`)", ""]
        lines += [f"> **{w}**" for w in warnings(r.breakdown)]
        lines += provider_table(r, run) + ["", "Largest kernels" + (" (ops on a CPU)" if device == "cpu" else ""), ""]
        lines += largest_table(r.breakdown) + [""]
    return "\n".join(lines) + "\n"


TSV_SEPARATOR = " > "


def kernels_tsv(b: Breakdown) -> str:
    """Every classified name: category, kind (kernel or op), name, the host ops that decided the
    category (joined by " > "; categories.classify gives the category back from them), time."""
    kind = "kernel" if b.device == "cuda" else "op"
    rows = ["category\tkind\tname\tdecided_by\tms_per_step\tcalls_per_step"]
    for category in cat.row_order(b.names):
        for name, (ms, calls, decided_by) in sorted(b.names[category].items(), key=lambda item: -item[1][0]):
            if decided_by is not None:
                rows.append(f"{category}\t{kind}\t{name}\t{TSV_SEPARATOR.join(decided_by)}\t"
                            f"{ms / b.steps:.6f}\t{calls / b.steps:g}")
    return "\n".join(rows) + "\n"


def as_json(run: ProfileRun) -> dict:
    providers = []
    for r in run.results:
        b = r.breakdown
        rows = {}
        for category in cat.row_order(b.time_ms):
            work = b.work.get(category)
            rows[category] = {"ms": b.row_ms(category), "share": b.row_ms(category) / b.step_ms,
                              "flops": work.flops if work else None, "bytes": work.bytes if work else None,
                              "floor_ms": floor_ms(work, run.ceilings)}
        providers.append({"provider": r.provider, "description": r.description, "device": b.device,
                          "steps": b.steps, "step_ms": b.step_ms, "wall_ms_per_step": b.wall_ms / b.steps if b.wall_ms else None,
                          "rows": rows, "warnings": warnings(b), "trace": str(r.trace)})
    return {"title": run.title, "command": run.command, "device": run.device_name, "mode": run.mode,
            "batch_size": run.batch_size, "steps": run.steps, "warmup": run.warmup, "step_flops": run.step_flops,
            "ceilings": run.ceilings.as_dict() if run.ceilings else None, "environment": run.environment,
            "providers": providers}


def picture(run: ProfileRun, path: Path) -> Path | None:
    """A stacked bar per provider (ms per step by category); None without matplotlib."""
    try:
        from fastresnet.experiments.figures import _pyplot, _save

        plt = _pyplot()
    except ImportError:
        return None
    device = run.results[0].breakdown.device
    present = cat.row_order({c for r in run.results for c in r.breakdown.time_ms})
    fused = [c for c in present if cat.is_fused(c)]
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.7 * len(run.results)))
    names = [r.provider for r in run.results][::-1]
    lefts = [0.0] * len(names)
    for category in present:
        widths = [r.breakdown.row_ms(category) for r in run.results][::-1]
        colour = COLOURS.get(category) or FUSED_COLOURS[fused.index(category) % len(FUSED_COLOURS)]
        ax.barh(names, widths, left=lefts, color=colour, label=label(category, device),
                hatch="//" if cat.is_fused(category) else None, edgecolor="white", linewidth=0.5)
        lefts = [left + w for left, w in zip(lefts, widths)]
    for y, (r, total) in enumerate(zip(run.results[::-1], lefts)):
        ax.text(total, y, f"  {total:,.2f} ms  ({run.batch_size / (total * 1e-3):,.0f} img/s)", va="center", fontsize=8)
    ax.set_xlim(0, max(lefts) * 1.3)
    ax.set_xlabel("ms per step")
    ax.set_title(f"{run.title} on {run.device_name}", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path


def write_outputs(run: ProfileRun, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for r in run.results:
        tsv = r.trace.parent / "kernels.tsv"
        tsv.write_text(kernels_tsv(r.breakdown))
    written["profile.md"] = out_dir / "profile.md"
    written["profile.md"].write_text(markdown(run))
    written["profile.json"] = out_dir / "profile.json"
    written["profile.json"].write_text(json.dumps(as_json(run), indent=2) + "\n")
    png = picture(run, out_dir / "profile.png")
    if png is not None:
        written["profile.png"] = png
    return written
