"""Turn pytest-benchmark JSON files into the markdown table of bench/RESULTS.md.

Each benchmark group (e.g. "resnet50 train step") compares providers measured
in the same run; the provider marked `baseline` is the denominator of the
ratio column. Per-call `images`, `bytes` and `flops` in extra_info become
img/s, GB/s and TFLOP/s, and, given the measured ceilings, a fraction of the
device's copy bandwidth or bf16 matrix rate. Rows whose extra_info carries a
measured dispatch decision ("dispatch": {"choice", "times_ms", ...}, from
bench_conv.py) also get a second table: per group the chosen candidate, the
runner-up and every candidate's time.

    python bench/report.py bench.json [more.json ...] [--ceilings ceilings.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def load_benchmarks(paths: list[str]) -> list[dict]:
    """Every benchmark of every file; a file that is empty or cut short (a stage that ran out
    of time while pytest-benchmark was writing it) is named on stderr and skipped."""
    rows = []
    for path in paths:
        try:
            with open(path) as f:
                rows.extend(json.load(f).get("benchmarks", []))
        except (OSError, ValueError) as err:
            print(f"report: skipping {path}: {err}", file=sys.stderr)
    return rows


def _throughput(extra: dict, seconds: float, ceilings: dict) -> str:
    parts = []
    if extra.get("images"):
        parts.append(f"{extra['images'] / seconds:,.0f} img/s")
    if extra.get("flops"):
        tflops = extra["flops"] / seconds / 1e12
        ceiling = ceilings.get("bf16_matmul_tflops")
        parts.append(f"{tflops:,.1f} TFLOP/s" + (f" ({tflops / ceiling:.0%} of matmul)" if ceiling else ""))
    if extra.get("bytes"):
        gbs = extra["bytes"] / seconds / 1e9
        ceiling = ceilings.get("copy_gbs")
        parts.append(f"{gbs:,.0f} GB/s" + (f" ({gbs / ceiling:.0%} of copy)" if ceiling else ""))
    return ", ".join(parts)


def expand_interleaved(benchmarks: list[dict]) -> list[dict]:
    """A benchmark that timed several providers in interleaved rounds (harness.interleaved) as one row per
    provider, with its median; others as they are."""
    rows = []
    for bench in benchmarks:
        providers = bench.get("extra_info", {}).get("interleaved")
        if not providers:
            rows.append(bench)
            continue
        extra = {k: v for k, v in bench["extra_info"].items() if k != "interleaved"}
        for name, timed in providers.items():
            rows.append({"name": name, "group": bench.get("group"), "stats": {"median": timed["median_s"]},
                         "extra_info": {**extra, "provider": name, "baseline": timed["baseline"]}})
    return rows


def render(benchmarks: list[dict], ceilings: dict) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in expand_interleaved(benchmarks):
        groups[bench.get("group") or bench["name"]].append(bench)
    lines = [
        "| group | provider | median ms | vs baseline | throughput |",
        "|---|---|---:|---:|---|",
    ]
    for group in sorted(groups):
        rows = groups[group]
        baseline = next((r for r in rows if r["extra_info"].get("baseline")), None)
        base_median = baseline["stats"]["median"] if baseline else None
        for row in sorted(rows, key=lambda r: r["stats"]["median"]):
            extra, median = row["extra_info"], row["stats"]["median"]
            ratio = f"{base_median / median:.2f}x" if base_median else "-"
            provider = extra.get("provider", row["name"]) + (" (baseline)" if row is baseline else "")
            if extra.get("dispatch_choice"):  # what a measured dispatch ran, e.g. "fwd triton, bwd eager"
                provider += f" [{extra['dispatch_choice']}]"
            lines.append(
                f"| {group} | {provider} | {median * 1e3:.3f} | {ratio} | {_throughput(extra, median, ceilings)} |"
            )
    return "\n".join(lines)


def render_dispatch(benchmarks: list[dict]) -> str:
    """The per-candidate times behind each measured dispatch choice, or "" when there are none."""
    lines = []
    for bench in sorted(benchmarks, key=lambda b: b.get("group") or b["name"]):
        group = bench.get("group") or bench["name"]
        decision = bench["extra_info"].get("dispatch")
        # bench_fused_blocks: one decision per conv of the block (tile, backward path), keyed by the conv
        per_conv = [(f"{group}: {d['key']}", d) for d in bench["extra_info"].get("conv_dispatch") or []
                    if isinstance(d, dict)]
        for label, decision in [(group, decision)] + per_conv:
            if not isinstance(decision, dict) or not decision.get("times_ms"):
                continue
            times = sorted(decision["times_ms"].items(), key=lambda kv: kv[1])
            best_ms = times[0][1]
            runner_up = f"{times[1][0]} ({times[1][1] / best_ms:.2f}x slower)" if len(times) > 1 else "-"
            every = ", ".join(f"{name} {ms:.3f}" for name, ms in times)
            lines.append(f"| {label} | {decision['choice']} | {runner_up} | {every} |")
    if not lines:
        return ""
    header = ["| group | dispatch choice | runner-up | every candidate (ms, fastest first) |", "|---|---|---|---|"]
    return "\n".join(header + lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--ceilings", help="output of bench/ceilings.py")
    args = parser.parse_args(argv)
    ceilings = {}
    if args.ceilings:
        with open(args.ceilings) as f:
            ceilings = json.load(f)
    env = ceilings.get("environment", {})
    if env:
        print("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    if "copy_gbs" in ceilings:
        print(
            f"Measured ceilings: copy {ceilings['copy_gbs']:,.0f} GB/s, "
            f"bf16 matmul {ceilings['bf16_matmul_tflops']:,.0f} TFLOP/s\n"
        )
    benchmarks = load_benchmarks(args.json)
    print(render(benchmarks, ceilings))
    dispatch_table = render_dispatch(benchmarks)
    if dispatch_table:
        print("\nDispatch decisions (measured on the first call per shape, or read from the disk cache):\n")
        print(dispatch_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
