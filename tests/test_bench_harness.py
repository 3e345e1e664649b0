"""The benchmark harness: `--benchmark` gates the benchmarks, pytest-benchmark's
own options still work, and the report turns medians into ratios."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402


def _pytest_bench(*args, smoke="1"):
    """A GPU benchmark file; on a CPU tiny, through Triton's interpreter (FASTRESNET_BENCH_SMOKE=1)."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "bench/bench_models.py", "-q", "-p", "no:cacheprovider",
         "-k", "resnet20 and forward", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "FASTRESNET_BENCH_SMOKE": smoke},
    )


def test_benchmarks_are_skipped_without_the_flag():
    result = _pytest_bench()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped" in result.stdout and "passed" not in result.stdout


def test_benchmark_flag_runs_them_and_pytest_benchmark_options_still_work(tmp_path):
    out = tmp_path / "bench.json"
    result = _pytest_bench("--benchmark", f"--benchmark-json={out}", "--benchmark-columns=median")
    assert result.returncode == 0, result.stdout + result.stderr
    benchmarks = json.loads(out.read_text())["benchmarks"]
    assert [b["extra_info"]["provider"] for b in benchmarks] == ["fastresnet"]
    assert benchmarks[0]["extra_info"]["images"] > 0 and benchmarks[0]["stats"]["median"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU's benchmark run")
def test_on_a_cpu_the_gpu_benchmarks_wait_for_the_smoke_switch():
    result = _pytest_bench("--benchmark", "-rs", smoke="0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" not in result.stdout and "on a CPU bench_cpu.py measures" in result.stdout


def _bench(group, provider, median, baseline=False, **extra):
    return {"name": provider, "group": group, "stats": {"median": median},
            "extra_info": {"provider": provider, "baseline": baseline, **extra}}


def test_report_gives_ratios_against_the_baseline_of_each_group():
    table = report.render(
        [
            _bench("g", "eager", 2.0, baseline=True, images=100),
            _bench("g", "fused", 0.5, images=100, bytes=1e9),
            _bench("h", "alone", 1.0),
        ],
        {"copy_gbs": 4.0},
    )
    assert "| g | eager (baseline) | 2000.000 | 1.00x | 50 img/s |" in table
    assert "| g | fused | 500.000 | 4.00x | 200 img/s, 2 GB/s (50% of copy) |" in table
    assert "| h | alone | 1000.000 | - |" in table


def test_report_skips_an_empty_json_file_and_names_it(tmp_path, capsys):
    empty, good = tmp_path / "empty.json", tmp_path / "good.json"
    empty.write_text("")
    good.write_text(json.dumps({"benchmarks": [_bench("g", "eager", 1.0, baseline=True)]}))
    assert [b["name"] for b in report.load_benchmarks([str(empty), str(good)])] == ["eager"]
    err = capsys.readouterr().err
    assert "skipping" in err and "empty.json" in err


def test_report_lists_the_candidate_times_behind_each_dispatch_choice():
    decision = {"choice": "triton:128x128x64w8s4", "source": "measured",
                "times_ms": {"cudnn_fused": 0.25, "triton:128x128x64w8s4": 0.2, "triton:64x128x64w4s4": 0.3}}
    rows = [_bench("conv a", "fastresnet", 0.2, dispatch=decision), _bench("conv a", "triton", 0.3),
            _bench("conv b", "fastresnet", 0.1, dispatch={"choice": None, "times_ms": {}, "source": "no GPU"})]
    table = report.render_dispatch(rows)
    assert "| conv a | triton:128x128x64w8s4 | cudnn_fused (1.25x slower) |" in table
    assert "triton:128x128x64w8s4 0.200, cudnn_fused 0.250, triton:64x128x64w4s4 0.300 |" in table
    assert "conv b" not in table  # nothing was measured there
    assert report.render_dispatch(rows[1:]) == ""


def test_report_lists_each_conv_decision_of_a_fused_block():
    conv_dispatch = [
        {"key": "conv_stats_tile:64x64k3x3", "choice": "triton:128x64x64w8s4", "source": "measured",
         "times_ms": {"triton:128x64x64w4s4": 0.5, "triton:128x64x64w8s4": 0.4}},
        {"key": "conv_wgrad_tile:64x64k3x3", "choice": "wgrad:64x64x64w4s4", "source": "disk cache", "times_ms": {}},
    ]
    table = report.render_dispatch([_bench("block", "fused_triton", 1.0, conv_dispatch=conv_dispatch)])
    assert "| block: conv_stats_tile:64x64k3x3 | triton:128x64x64w8s4 | triton:128x64x64w4s4 (1.25x slower) |" in table
    assert "conv_wgrad_tile" not in table  # no times recorded for it


def test_interleaved_providers_become_one_row_each():
    """harness.interleaved stores every provider's median in one benchmark; the report gives each a row,
    with its ratio to the baseline measured in the same rounds."""
    bench = _bench("cpu g", "interleaved rounds", 9.0, images=10,
                   interleaved={"eager": {"median_s": 2.0, "baseline": True}, "fast": {"median_s": 1.0,
                                                                                        "baseline": False}})
    table = report.render([bench], {})
    assert "| cpu g | eager (baseline) | 2000.000 | 1.00x | 5 img/s |" in table
    assert "| cpu g | fast | 1000.000 | 2.00x | 10 img/s |" in table and "interleaved rounds" not in table
