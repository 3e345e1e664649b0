"""Run a subject's step under torch.profiler: warm-up steps first, then N profiled steps.

The warm-up steps (torch.compile's compilation, cuDNN's autotuning, the dispatch's first-call
measurements, the allocator's growth) run outside the profiler. Then one step runs under the
profiler's own warm-up (CUPTI's start-up cost) and is dropped, and `steps` steps are recorded.
The device is synchronized before the first recorded step and inside the last one, so the
recorded window runs from an idle device to an idle device, and the host clock measures the
same window (`wall_ms`), the check on the trace's total.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from fastresnet.profiling.categories import DATA_ANNOTATION
from fastresnet.profiling.providers import Subject
from fastresnet.profiling.timeline import Breakdown, breakdown, load_trace


# Kineto, torch.profiler's tracer, logs its start and stop marks (level USDT, 5) and, in a CUDA build on a
# machine without a GPU, "ERROR ... gpuGetDeviceCount failed": noise on a CPU, where it has no device
# activity to tell about, and an ERROR line on a successful run. It reads KINETO_LOG_LEVEL once, when a
# profiler first starts in the process; 6 is above its highest level. A level the user set is kept.
KINETO_SILENT = "6"


def quiet_profiler_on_cpu(device: torch.device) -> None:
    if device.type == "cpu":
        os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_SILENT)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture(subject: Subject, batches, device: torch.device, steps: int, warmup: int, trace_path: Path) -> Breakdown:
    """Profile `steps` steps of `subject` after `warmup` unprofiled ones; write the Chrome trace."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    for _ in range(warmup):
        subject.step(*next(batches))
    _synchronize(device)

    trace_path.parent.mkdir(parents=True, exist_ok=True)
    quiet_profiler_on_cpu(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = finished = 0.0
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
                 record_shapes=True, on_trace_ready=lambda p: p.export_chrome_trace(str(trace_path))) as prof:
        for i in range(steps + 1):  # step 0 is the profiler's warm-up
            if i == 1:
                started = time.perf_counter()
            with record_function(DATA_ANNOTATION):
                images, labels = next(batches)
            subject.step(images, labels)
            if i in (0, steps):
                _synchronize(device)
            if i == steps:
                finished = time.perf_counter()
            prof.step()
    result = breakdown(load_trace(trace_path))
    result.wall_ms = (finished - started) * 1e3
    if result.steps != steps:
        raise RuntimeError(f"the trace {trace_path} holds {result.steps} steps, {steps} were profiled")
    return result
