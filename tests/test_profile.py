"""fastresnet.profile: the name tables, the trace reading, the work estimates, and the command on a CPU."""

import inspect
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from fastresnet import profile, train
from fastresnet.errors import EXIT_USER_ERROR
from fastresnet.profiling import categories as cat
from fastresnet.profiling import report
from fastresnet.profiling.timeline import breakdown
from fastresnet.profiling.work import estimate

KERNEL_NAMES = Path(__file__).with_name("profile_kernel_names.tsv")


def _named_rows(text: str) -> list[tuple[str, str, str, list[str]]]:
    """(category, kind, name, decided_by) from a kernels.tsv or tests/profile_kernel_names.tsv."""
    lines = text.splitlines()
    assert lines[0].split("\t")[:4] == ["category", "kind", "name", "decided_by"], lines[0]
    rows = []
    for line in lines[1:]:
        category, kind, name, decided_by = (line.split("\t") + [""])[:4]
        rows.append((category, kind, name, decided_by.split(report.TSV_SEPARATOR) if decided_by else []))
    return rows


def _classified(kind: str, name: str, decided_by: list[str]) -> str:
    return cat.classify(name if kind == "kernel" else None, decided_by)[0]


# --- the name tables


@pytest.mark.parametrize("category, kind, name, decided_by", _named_rows(KERNEL_NAMES.read_text()),
                         ids=lambda v: v[:60] if isinstance(v, str) else None)
def test_recorded_names_get_their_category(category, kind, name, decided_by):
    """The names cuDNN, cuBLAS, CUTLASS, aten, inductor and fastresnet's kernels use (a GPU trace's
    kernels.tsv appends to tests/profile_kernel_names.tsv as it is)."""
    assert _classified(kind, name, decided_by) == category


def test_the_list_covers_every_category_a_gpu_step_has():
    listed = {row[0] for row in _named_rows(KERNEL_NAMES.read_text()) if row[1] == "kernel"}
    assert set(cat.ORDER) - listed == {cat.HOST_GAP}  # host idle is device idle time, never a kernel


def test_every_triton_kernel_that_kernels_launch_is_in_the_table():
    """A kernel added to kernels/ (or renamed) must be added to PROJECT_KERNELS."""
    import triton

    from fastresnet.kernels import bn_act, bn_stats, conv, conv_train
    from fastresnet.kernels.experimental import bn_act as shelf_bn_act
    from fastresnet.kernels.experimental import conv_gemm, conv_train_bwd

    launched = set()
    # launched by name (or as the default of a choice of kernel), or handed to a launcher as its reduction
    pattern = r"(\w+)\)?\[[^\]]+\]\(|reduction=(\w+)"
    for module in (bn_act, bn_stats, conv, conv_train, shelf_bn_act, conv_gemm, conv_train_bwd):
        jitted = {n for n, v in vars(module).items() if isinstance(v, triton.runtime.KernelInterface)}
        launched |= jitted & {name for found in re.findall(pattern, inspect.getsource(module)) for name in found}
    assert launched == set(cat.PROJECT_KERNELS)


def test_project_functions_are_fastresnets_autograd_functions():
    import fastresnet.nn  # noqa: F401  (imports every op, which defines them)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    ours = {c.__name__ for c in subclasses(torch.autograd.Function) if c.__module__.startswith("fastresnet.")}
    assert ours == set(cat.PROJECT_FUNCTIONS)


def test_a_kernel_inside_a_fastresnet_op_counts_under_the_op_whatever_it_is():
    cudnn_wgrad = "sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_kernel"
    assert cat.classify(cudnn_wgrad, ["aten::convolution_backward"])[0] == cat.CONV_WGRAD
    assert cat.classify(cudnn_wgrad, ["fastresnet::conv_stats_backward", "aten::convolution_backward"]) == (
        "fastresnet::conv_stats_backward", ["fastresnet::conv_stats_backward"])


def test_a_gemm_is_what_launched_it():
    gemm = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_kernel"
    assert cat.classify(gemm, ["aten::conv2d", "aten::convolution", "aten::cudnn_convolution"])[0] == cat.CONV_FORWARD
    assert cat.classify(gemm, ["aten::linear", "aten::addmm"])[0] == cat.MATMUL
    assert cat.classify(gemm, [])[0] == cat.MATMUL  # replayed in a CUDA graph: no op on the stack


# --- reading a trace: a GPU trace built by hand, every number known


def _event(cat_name, name, ts, dur, tid=1, pid=1, **args):
    return {"ph": "X", "cat": cat_name, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur, "args": args}


def _launch(corr, ts, tid=1):
    return _event("cuda_runtime", "cudaLaunchKernel", ts, 1, tid=tid, correlation=corr)


def _kernel(name, corr, ts, dur, stream=7):
    return _event("kernel", name, ts, dur, tid=stream, pid=0, correlation=corr, stream=stream)


def _shapes(dims, types, concrete):
    return {"Input Dims": dims, "Input type": types, "Concrete Inputs": concrete}


CONV_ARGS = _shapes([[2, 3, 8, 8], [4, 3, 3, 3], [], [], [], [], [], [], []],
                    ["float", "float", "", "ScalarList", "ScalarList", "ScalarList", "Scalar", "ScalarList", "Scalar"],
                    ["", "", "", "[1, 1]", "[1, 1]", "[1, 1]", "False", "[0, 0]", "1"])
CONV_BACKWARD_ARGS = _shapes([[2, 4, 8, 8], [2, 3, 8, 8], [4, 3, 3, 3]] + [[]] * 8,
                             ["float"] * 3 + ["ScalarList"] * 4 + ["Scalar", "ScalarList", "Scalar", "ScalarList"],
                             ["", "", "", "[0]", "[1, 1]", "[1, 1]", "[1, 1]", "False", "[0, 0]", "1",
                              "[True, True, False]"])
BN_ARGS = _shapes([[2, 4, 8, 8], [4], [4], [4], [4], [], [], [], []], ["float"] * 5 + ["Scalar"] * 4,
                  ["", "", "", "", "", "True", "0.1", "1e-05", "True"])
COPY_ARGS = _shapes([[4, 3, 3, 3], [4, 3, 3, 3], []], ["float", "c10::BFloat16", "Scalar"], ["", "", "False"])
CONV_FLOPS = 2 * 2 * 4 * 8 * 8 * 3 * 3 * 3  # per call: batch 2, 4 out, 8x8, 3 in, 3x3
UNKNOWN_KERNEL = "void at::native::distribution_elementwise_grid_stride_kernel<float, 4>(int)"


def gpu_trace(unknown_us: float = 40.0) -> dict:
    """Two steps of 500 us on a GPU, main thread 1, autograd's thread 2, streams 7 and 20."""
    data_wait = cat.DATA_ANNOTATION
    events = [
        _event("user_annotation", "ProfilerStep#1", 0, 500), _event("user_annotation", "ProfilerStep#2", 500, 500),
        # step 1: data (a copy), conv forward, BN (overlapped by an unknown kernel), a fused op, the optimizer
        _event("user_annotation", data_wait, 10, 50), _launch(1, 20), _event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)",
                                                                             30, 20, tid=7, pid=0, correlation=1),
        _event("cpu_op", "aten::conv2d", 65, 60), _event("cpu_op", "aten::convolution", 70, 50, **CONV_ARGS),
        _launch(2, 80), _kernel("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_kernel", 2, 100, 100),
        _event("cpu_op", "aten::batch_norm", 130, 30, **BN_ARGS), _launch(3, 140),
        _kernel("void at::native::batch_norm_collect_statistics_channels_last_kernel<float, float, float, 4>()",
                3, 200, 40),
        _kernel(UNKNOWN_KERNEL, 99, 240 - unknown_us / 2, unknown_us, stream=20),  # no launch event: no stack
        _event("cpu_op", "fastresnet::conv_stats", 170, 20), _launch(4, 175),
        _kernel("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_kernel", 4, 260, 40),
        _event("user_annotation", "Optimizer.step#SGD.step", 300, 100),
        _event("cpu_op", "aten::_foreach_add_", 310, 20), _launch(5, 320),
        _kernel("void at::native::multi_tensor_apply_kernel<TensorListMetadata<2>, BinaryOpListAlphaFunctor>()",
                5, 400, 50),
        # step 2: the backward on autograd's thread: one convolution_backward, a dgrad and a wgrad kernel
        _event("cpu_op", "autograd::engine::evaluate_function: ConvolutionBackward0", 510, 90, tid=2),
        _event("cpu_op", "aten::convolution_backward", 520, 70, tid=2, **CONV_BACKWARD_ARGS),
        _launch(6, 530, tid=2), _launch(7, 540, tid=2),
        _kernel("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_kernel", 6, 540, 60),
        _kernel("sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_kernel", 7, 600, 100),
        # a layout copy of the weight gradient inside the conv's backward: a copy, with its own bytes
        _event("cpu_op", "aten::copy_", 560, 10, tid=2, **COPY_ARGS), _launch(8, 565, tid=2),
        _kernel("void at::native::vectorized_elementwise_kernel<4, at::native::direct_copy_kernel_cuda()>()",
                8, 700, 10),
    ]
    return {"traceEvents": events}


def test_a_gpu_trace_is_split_into_categories_that_add_up_to_the_window():
    b = breakdown(gpu_trace())
    assert (b.device, b.steps, b.window_ms) == ("cuda", 2, pytest.approx(1.0))
    expected_us = {  # totals over both steps
        cat.DATA: 20 + 30,  # the loader's copy, and device idle during the data wait ([10, 30) and [50, 60))
        cat.CONV_FORWARD: 100,
        cat.BN_ACT: 20 + 10,  # [220, 240) shared with the unknown kernel on stream 20
        cat.OTHER: 10 + 20,
        "fastresnet::conv_stats": 40,  # a cuDNN kernel, counted under the fused op that launched it
        cat.OPTIMIZER: 50,
        cat.CONV_DGRAD: 60,
        cat.CONV_WGRAD: 100,
        cat.COPIES: 10,
        cat.HOST_GAP: (10 + 40 + 100 + 50) + (40 + 290),
    }
    assert {k: round(v * 1e3, 6) for k, v in b.time_ms.items()} == expected_us
    assert b.rows_total_ms() == pytest.approx(b.step_ms)
    assert b.top_names(cat.OTHER) == [(UNKNOWN_KERNEL, pytest.approx(0.015), 0.5)]


def test_work_comes_from_the_recorded_shapes_and_is_unknown_elsewhere():
    b = breakdown(gpu_trace())
    assert b.work[cat.CONV_FORWARD].flops == CONV_FLOPS / 2  # one conv in two steps
    assert b.work[cat.CONV_DGRAD].flops == b.work[cat.CONV_WGRAD].flops == CONV_FLOPS / 2
    assert b.work[cat.BN_ACT].bytes == (2 * 2048 + 4 * 16) / 2  # x read once and y written once, plus 4 vectors
    assert b.work[cat.COPIES].bytes == 108 * (4 + 2) / 2  # fp32 written, bf16 read; the conv has no copy work
    for unknown in ("fastresnet::conv_stats", cat.OTHER, cat.HOST_GAP, cat.DATA):
        assert unknown not in b.work


def test_a_wrappers_own_time_does_not_hide_the_work_inside_it():
    """On a CPU, aten::conv2d's own time (a preempted thread lands anywhere) wraps aten::convolution."""
    events = [_event("user_annotation", "ProfilerStep#1", 0, 100), _event("cpu_op", "aten::conv2d", 0, 100),
              _event("cpu_op", "aten::convolution", 90, 10, **CONV_ARGS)]
    b = breakdown({"traceEvents": events})
    assert (b.device, b.time_ms) == ("cpu", {cat.CONV_FORWARD: pytest.approx(0.1)})
    assert b.work[cat.CONV_FORWARD].flops == CONV_FLOPS


def test_kernels_tsv_rows_give_their_category_back():
    b = breakdown(gpu_trace())
    rows = _named_rows(report.kernels_tsv(b))
    assert {row[2] for row in rows} >= {UNKNOWN_KERNEL, "Memcpy HtoD (Pinned -> Device)"}
    for category, kind, name, decided_by in rows:
        assert _classified(kind, name, decided_by) == category, name


def test_a_large_other_is_reported_loudly_with_its_names():
    quiet = breakdown(gpu_trace())
    assert report.warnings(quiet) == []
    loud = breakdown(gpu_trace(unknown_us=150))
    assert loud.row_ms(cat.OTHER) / loud.step_ms > report.OTHER_LIMIT
    (warning,) = report.warnings(loud)
    assert "'other' is" in warning and "distribution_elementwise_grid_stride_kernel" in warning


def test_a_window_that_misses_the_host_clock_is_reported():
    b = breakdown(gpu_trace())
    b.wall_ms = b.window_ms * 1.5
    assert any("host clock" in w for w in report.warnings(b))


def test_a_trace_without_profiler_steps_is_a_clear_error():
    with pytest.raises(ValueError, match="ProfilerStep"):
        breakdown({"traceEvents": [_event("cpu_op", "aten::add", 0, 1)]})


def test_conv_and_matmul_estimates():
    assert estimate("aten::convolution", CONV_ARGS)[cat.CONV_FORWARD].flops == CONV_FLOPS
    strided = dict(CONV_ARGS, **{"Concrete Inputs": ["", "", "", "[2, 2]", "[1, 1]", "[1, 1]", "False", "[0, 0]", "1"]})
    assert estimate("aten::convolution", strided)[cat.CONV_FORWARD].flops == CONV_FLOPS / 4  # 4x4 outputs
    wgrad_only = dict(CONV_BACKWARD_ARGS, **{"Concrete Inputs": CONV_BACKWARD_ARGS["Concrete Inputs"][:10]
                                             + ["[False, True, False]"]})
    work = estimate("aten::convolution_backward", wgrad_only)
    assert (work[cat.CONV_DGRAD].flops, work[cat.CONV_WGRAD].flops) == (0, CONV_FLOPS)
    addmm = _shapes([[10], [8, 64], [64, 10], [], []], ["float", "c10::BFloat16", "c10::BFloat16", "Scalar", "Scalar"],
                    ["", "", "", "1", "1"])
    assert estimate("aten::addmm", addmm)[cat.MATMUL].flops == 2 * 8 * 64 * 10
    assert estimate("aten::convolution", {"Input Dims": [[2, 3]], "Input type": ["float"]}) is None
    assert estimate("aten::softmax", {}) is None


# --- the command on a CPU

TINY = ["--model", "resnet20", "--data.batch_size", "2", "--steps", "2", "--warmup_steps", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny steps on one thread: on a loaded machine, torch's OpenMP threads wait on each other
    for longer than the ops take (a ResNet-20 step at batch 2: 40 ms on one thread, seconds on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_outputs(out: Path, providers: list[str]) -> dict:
    result = json.loads((out / "profile.json").read_text())
    assert [p["provider"] for p in result["providers"]] == providers
    for p in result["providers"]:
        trace = json.loads(Path(p["trace"]).read_text())
        assert any(e.get("name", "").startswith("ProfilerStep#") for e in trace["traceEvents"])
        assert sum(row["ms"] for row in p["rows"].values()) == pytest.approx(p["step_ms"], rel=1e-9)
        assert abs(p["step_ms"] - p["wall_ms_per_step"]) <= max(report.WALL_TOLERANCE * p["wall_ms_per_step"],
                                                                report.WALL_SLACK_MS)
        assert p["rows"][cat.CONV_FORWARD]["ms"] > 0 and (p["rows"][cat.CONV_FORWARD]["flops"] or 0) > 0, p["rows"]
        assert p["rows"].get(cat.OTHER, {"share": 0})["share"] < report.OTHER_LIMIT, p["rows"]
        assert (Path(p["trace"]).parent / "kernels.tsv").is_file()
    png = out / "profile.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "profile.md").read_text()
    assert all(f"## {p}" in md for p in providers) and "| **step** |" in md
    return result


def test_profile_of_resnet20_training_on_the_cpu(tmp_path, capsys):
    assert profile.main(TINY + ["--out", str(tmp_path)]) == 0
    result = _check_outputs(tmp_path, ["fastresnet"])
    rows = result["providers"][0]["rows"]
    assert {cat.CONV_BACKWARD, cat.BN_ACT, cat.OPTIMIZER, cat.HOST_GAP, cat.DATA} <= set(rows)
    assert result["ceilings"]["copy_gbs"] > 0 and rows[cat.CONV_FORWARD]["floor_ms"] > 0
    assert rows[cat.OPTIMIZER]["bytes"] > 0  # SGD with momentum: 5 tensors of the parameters' size


def test_profile_of_a_tiny_torchvision_model_beside_fastresnet(tmp_path):
    args = ["--model", "resnet18", "--data.backend", "synthetic", "--data.image_size", "32", "--data.batch_size", "2",
            "--data.num_classes", "10", "--providers", "torchvision,fastresnet", "--steps", "1", "--warmup_steps", "1",
            "--no_ceilings", "--out", str(tmp_path)]
    assert profile.main(args) == 0
    result = _check_outputs(tmp_path, ["torchvision", "fastresnet"])
    assert result["providers"][0]["description"].startswith("torchvision resnet18, eager")
    assert result["ceilings"] is None


def test_inference_mode(tmp_path):
    assert profile.main(TINY + ["--mode", "inference", "--no_ceilings", "--out", str(tmp_path)]) == 0
    rows = _check_outputs(tmp_path, ["fastresnet"])["providers"][0]["rows"]
    assert cat.CONV_BACKWARD not in rows and cat.OPTIMIZER not in rows


def test_train_profile_writes_into_the_run_directory(tmp_path):
    args = ["--profile", "1", "--model", "resnet20", "--data.batch_size", "2", "--out_dir", str(tmp_path),
            "--run_name", "profiled"]
    assert train.main(args) == 0
    assert (tmp_path / "profiled" / "profile" / "profile.md").is_file()
    assert not (tmp_path / "profiled" / "checkpoint.pt").exists()  # profiled, not trained


@pytest.mark.parametrize("args, message", [
    (["--providers", "torchvision,jax"], "jax unknown"),
    (["--providers", "fastresnet,fastresnet"], "named twice"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--model", "resnet21"], "resnet21"),
    (["--profile", "3"], "here the count is --steps"),
])
def test_bad_options_are_clear_errors(tmp_path, capsys, args, message):
    assert profile.main(args + ["--out", str(tmp_path)]) == EXIT_USER_ERROR
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_gpu_scripts_profile_command_parses():
    """bench/gpu_check.sh's profile stage: ResNet-50 training, batch 256, bf16, both providers."""
    script = (Path(__file__).parents[1] / "bench" / "gpu_check.sh").read_text()
    body = script.split("run_profile() {", 1)[1].split("\n}", 1)[0].replace("\\\n", " ")
    words = shlex.split(body.split("&&", 1)[0])
    args = words[words.index("fastresnet.profile") + 1:]
    cfg, options, resume = profile.parse(args)
    assert (cfg.model, cfg.data.batch_size, cfg.data.image_size, cfg.amp, cfg.fused_blocks, cfg.compile) == (
        "resnet50", 256, 224, "bf16", "on", "default")
    assert options.providers == ("torchvision+compile", "fastresnet") and options.mode == "train"
    assert options.steps <= 5 and resume is None


def test_a_cpu_profile_prints_no_error_line_from_the_profiler(tmp_path):
    """A successful run says nothing that reads like a failure: Kineto's start and stop marks and its
    "gpuGetDeviceCount failed" (a CUDA build without a GPU) are silenced on a CPU. A process of its own:
    Kineto reads its log level once, when a profiler first starts."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-m", "fastresnet.profile", *TINY, "--steps", "1", "--warmup_steps", "0",
                           "--no_ceilings", "--out", str(tmp_path)], env=env, text=True, capture_output=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ms/step" in done.stdout
    noise = [line for line in done.stderr.splitlines() if "ERROR" in line or "USDT" in line]
    assert not noise, "\n".join(noise)


def test_train_profile_needs_a_positive_count(capsys):
    assert train.main(["--profile", "0"]) == EXIT_USER_ERROR
    assert "--profile 0" in capsys.readouterr().err
