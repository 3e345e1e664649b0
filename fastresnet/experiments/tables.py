"""Writing results: markdown tables and JSON, atomically, beside the figures."""

from __future__ import annotations

import json
import math
from pathlib import Path


def fmt(value, digits: int = 2) -> str:
    """A table cell: numbers with `digits` decimals, None or NaN as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def seed_count(summary: dict) -> int:
    """How many seeds a net's summary stands for: 1 unless runs.over_seeds combined several."""
    return len(summary.get("seeds", ())) or 1


def over_seeds_cell(summary: dict, key: str = "final_test_error") -> str:
    """A net's error as the paper gives it over several runs, "best (mean +- std)"; one run: its value."""
    if seed_count(summary) < 2:
        return fmt(summary[key])
    return f"{fmt(summary[key + '_best'])} ({fmt(summary[key])} ± {fmt(summary[key + '_std'])})"


def error_header(summary: dict, kind: str) -> str:
    """The header of over_seeds_cell's column of `kind` ("train" or "test") errors."""
    seeds = seed_count(summary)
    return f"{kind} error %" if seeds < 2 else f"{kind} error %, best (mean ± std) of {seeds} seeds"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def by_epoch_tables(summaries: list[dict], labels: list[str]) -> str:
    """Training and test error by epoch, a column per net, as markdown: where the curves of Figure 6 part
    and meet, in numbers. Over several seeds a net's column is the mean over its seeds (runs.over_seeds)."""
    seed_counts = {seed_count(s) for s in summaries}
    note = ""
    if max(seed_counts) > 1:
        note = f" (mean over {max(seed_counts)} seeds)" if len(seed_counts) == 1 else " (mean over each net's seeds)"
    epochs = sorted({row["epoch"] for s in summaries for row in s["by_epoch"]})
    lrs = {row["epoch"]: row["lr"] for row in summaries[0]["by_epoch"]}
    text = ""
    for kind, caption in (("train_error", "Training error % by epoch, the mean of its logged windows"),
                          ("test_error", "Test error % after each epoch")):
        cells = [{row["epoch"]: row[kind] for row in s["by_epoch"]} for s in summaries]
        rows = [[e, lr_cell(lrs.get(e))] + [c.get(e) for c in cells] for e in epochs]
        text += f"\n{caption}{note}:\n\n" + markdown_table(["epoch", "lr at its end"] + labels, rows)
    return text


def lr_cell(lr: float | None) -> str:
    return "-" if lr is None else f"{lr:g}"


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    """The first table in `text` as a list of {header: cell} (used by the tests and by readers)."""
    lines = []
    for line in map(str.strip, text.splitlines()):
        if line.startswith("|"):
            lines.append(line)
        elif lines:  # the first table ended
            break
    if len(lines) < 2:
        return []
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    headers = cells[0]
    return [dict(zip(headers, row)) for row in cells[2:]]


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def read_json_if_any(path: Path):
    """The JSON object in `path`, or None where there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def publish(folder: Path, result: dict, text: str, figure: Path, say) -> dict:
    """Write an experiment's table.md and results.json beside its figure, print the table and
    where all three went, and record the paths in `result["outputs"]`."""
    table = write_text(folder / "table.md", text)
    numbers = write_json(folder / "results.json", result)
    say(text)
    say(f"figure: {figure}\nnumbers: {numbers}\ntable: {table}")
    result["outputs"] = {"figure": str(figure), "json": str(numbers), "table": str(table)}
    return result
