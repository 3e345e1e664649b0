"""A torch.profiler trace (its Chrome JSON) turned into time per category.

The window is the profiled steps, from the start of the first `ProfilerStep#` to the end of
the last; the profile synchronizes the device before the first and inside the last, so on a
GPU the window runs from an idle device to an idle device.

On a GPU the window is read on the device timeline: every kernel, memcpy and memset is a
slice (time where several streams overlap is split evenly between the kernels running), and
the time no kernel runs is device idle, counted as data loading while the main thread waits
for the next batch, else as host idle between kernels (Python, launches, syncs). On a CPU the
window is read on the main thread: each op's self time is a slice, and the time inside no op
is host time (Python). Either way the rows add up to the window exactly; `wall_ms`, measured
with the host clock around the same steps, is the check that the window is the whole step.
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from fastresnet.profiling import categories as cat
from fastresnet.profiling.work import Work, estimate

HOST_CATEGORIES = ("cpu_op", "user_annotation")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
STEP_PREFIX = "ProfilerStep#"
UNCOVERED_SHARE = 0.05  # a category's work is known when ops with an estimate cover 95% of its time


@dataclass
class HostEvent:
    name: str
    start: float  # microseconds, the trace's clock
    end: float
    args: dict
    parent: "HostEvent | None" = None
    children: list = field(default_factory=list)

    def stack(self) -> list["HostEvent"]:
        """This event and its ancestors, outermost first."""
        chain, event = [], self
        while event is not None:
            chain.append(event)
            event = event.parent
        return chain[::-1]


class HostThread:
    """One thread's host events, nested by time (an op inside another is its child)."""

    def __init__(self, events: list[HostEvent]):
        self.events = sorted(events, key=lambda e: (e.start, -(e.end - e.start)))
        self.starts = [e.start for e in self.events]
        open_events: list[HostEvent] = []
        for event in self.events:
            while open_events and open_events[-1].end <= event.start:
                open_events.pop()
            if open_events:
                parent = open_events[-1]
                event.end = min(event.end, parent.end)  # rounding in the trace must not break nesting
                event.parent = parent
                parent.children.append(event)
            open_events.append(event)
        self.roots = [e for e in self.events if e.parent is None]

    def innermost_at(self, t: float) -> HostEvent | None:
        i = bisect.bisect_right(self.starts, t) - 1
        event = self.events[i] if i >= 0 else None
        while event is not None and event.end <= t:
            event = event.parent
        return event


@dataclass
class Breakdown:
    """Time per category over `steps` profiled steps, with the work done where it is known."""

    device: str  # "cuda" or "cpu": which timeline the window was read on
    steps: int
    window_ms: float  # the profiled window, all steps
    wall_ms: float | None = None  # host clock around the same steps (set by the caller)
    time_ms: dict[str, float] = field(default_factory=dict)  # per category, all steps
    work: dict[str, Work] = field(default_factory=dict)  # per category, per step; absent = unknown
    # category -> name -> [ms, calls, decided by]: the host stack's part that gave the category
    # (categories.classify), None for time no name was classified for (device idle, Python)
    names: dict[str, dict[str, list]] = field(default_factory=dict)

    @property
    def step_ms(self) -> float:
        return self.window_ms / self.steps

    def row_ms(self, category: str) -> float:
        return self.time_ms.get(category, 0.0) / self.steps

    def rows_total_ms(self) -> float:
        return sum(self.time_ms.values()) / self.steps

    def top_names(self, category: str, n: int = 10) -> list[tuple[str, float, int]]:
        """(name, ms per step, calls per step) of a category's largest kernels or ops."""
        found = self.names.get(category, {})
        ranked = sorted(found.items(), key=lambda item: -item[1][0])[:n]
        return [(name, ms / self.steps, count / self.steps) for name, (ms, count, _) in ranked]


class _Tally:
    """Slices into per-category time, names and work (each op's work counted once)."""

    def __init__(self):
        self.time_ms: dict[str, float] = defaultdict(float)
        self.names: dict[str, dict[str, list]] = defaultdict(dict)
        self.units: dict[str, dict[int, Work]] = defaultdict(dict)
        self.uncovered_ms: dict[str, float] = defaultdict(float)
        self.estimates: dict[int, dict[str, Work] | None] = {}

    def add(self, category: str, ms: float, name: str, stack: list[HostEvent], decided_by: list[str] | None) -> None:
        self.time_ms[category] += ms
        entry = self.names[category].setdefault(name, [0.0, 0, decided_by])
        entry[0] += ms
        entry[1] += 1
        unit = self._work_unit(stack, category)
        if unit is not None:
            self.units[category][id(unit)] = self.estimates[id(unit)][category]
        elif not (stack and self._unit_below(stack[-1], category)):
            self.uncovered_ms[category] += ms

    def _work_unit(self, stack: list[HostEvent], category: str) -> HostEvent | None:
        """The outermost op on the stack whose recorded shapes give its work in `category` (the
        outermost, so that aten::batch_norm and the aten::native_batch_norm inside it count once;
        a copy inside a conv's backward is its own unit, the conv has no copy work)."""
        for event in stack:
            key = id(event)
            if key not in self.estimates:
                self.estimates[key] = estimate(event.name, event.args)
            if self.estimates[key] is not None and category in self.estimates[key]:
                return event
        return None

    def _unit_below(self, event: HostEvent, category: str) -> bool:
        """Whether an op inside `event` has work in `category`: then `event`'s own time is its wrapper's
        (aten::conv2d around aten::convolution, autograd's node around aten::convolution_backward)."""
        pending = list(event.children)
        while pending:
            child = pending.pop()
            if id(child) not in self.estimates:
                self.estimates[id(child)] = estimate(child.name, child.args)
            if self.estimates[id(child)] is not None and category in self.estimates[id(child)]:
                return True
            pending.extend(child.children)
        return False

    def work_per_step(self, steps: int) -> dict[str, Work]:
        """Work per category where ops with an estimate (or their wrappers) cover all but
        UNCOVERED_SHARE of its time."""
        known = {}
        for category, units in self.units.items():
            if self.uncovered_ms[category] > UNCOVERED_SHARE * self.time_ms[category]:
                continue
            flops = sum(w.flops for w in units.values()) / steps
            nbytes = sum(w.bytes for w in units.values()) / steps
            known[category] = Work(flops=flops, bytes=nbytes)
        return known


def load_trace(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the profiler trace {path}: {err}") from None


def breakdown(trace: dict) -> Breakdown:
    """Time per category of the steps in a torch.profiler Chrome trace (see the module docstring)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    steps = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith(STEP_PREFIX)),
                   key=lambda e: e["ts"])
    if not steps:
        raise ValueError("the trace has no ProfilerStep# annotations: it was not recorded by fastresnet.profile")
    window = (steps[0]["ts"], max(e["ts"] + e["dur"] for e in steps))
    threads = _host_threads(events)
    main = threads[steps[0]["tid"]]
    device_events = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    tally = _Tally()
    if device_events:
        _device_slices(tally, device_events, events, threads, main, window)
        device = "cuda"
    else:
        _host_slices(tally, main, window)
        device = "cpu"
    return Breakdown(device=device, steps=len(steps), window_ms=(window[1] - window[0]) / 1e3,
                     time_ms=dict(tally.time_ms), work=tally.work_per_step(len(steps)),
                     names={k: dict(v) for k, v in tally.names.items()})


def _host_threads(events: list[dict]) -> dict:
    by_tid = defaultdict(list)
    for e in events:
        if e.get("cat") in HOST_CATEGORIES:
            by_tid[e["tid"]].append(HostEvent(e["name"], e["ts"], e["ts"] + e["dur"], e.get("args", {})))
    return {tid: HostThread(evs) for tid, evs in by_tid.items()}


def _clip(start: float, end: float, window: tuple[float, float]) -> float:
    return max(0.0, min(end, window[1]) - max(start, window[0]))


def _names(stack: list[HostEvent]) -> list[str]:
    return [e.name for e in stack if not e.name.startswith(STEP_PREFIX)]


def _host_slices(tally: _Tally, main: HostThread, window: tuple[float, float]) -> None:
    """CPU: each op's self time on the main thread; time inside no op is host time."""
    covered = 0.0
    for root in main.roots:
        covered += _clip(root.start, root.end, window)
        pending = [root]
        while pending:
            event = pending.pop()
            pending.extend(event.children)
            self_us = _clip(event.start, event.end, window) - sum(
                _clip(c.start, c.end, window) for c in event.children)
            if self_us <= 0:
                continue
            stack = event.stack()
            names = _names(stack)
            category, decided_by = cat.classify(None, names) if names else (cat.HOST_GAP, None)
            tally.add(category, self_us / 1e3, event.name, stack, decided_by)
    gap = (window[1] - window[0]) - covered
    if gap > 0:
        tally.add(cat.HOST_GAP, gap / 1e3, "(between steps)", [], None)


def _device_slices(tally: _Tally, device_events, events, threads, main: HostThread, window) -> None:
    """GPU: kernels by category (overlaps split evenly), device idle as data loading or host idle."""
    launches = {}
    for e in events:
        if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = e
    classified = []
    for e in device_events:
        launch = launches.get(e.get("args", {}).get("correlation"))
        stack = []
        if launch is not None and launch["tid"] in threads:
            innermost = threads[launch["tid"]].innermost_at(launch["ts"])
            stack = innermost.stack() if innermost is not None else []
        category, decided_by = cat.classify(e["name"], _names(stack))
        classified.append((e["ts"], e["ts"] + e["dur"], category, e["name"], stack, decided_by))

    # Sweep: between consecutive boundaries, the running slices share the time evenly.
    boundaries = sorted({window[0], window[1], *(max(window[0], min(window[1], t))
                                                  for s, e, *_ in classified for t in (s, e))})
    share = [0.0] * len(classified)
    order = sorted(range(len(classified)), key=lambda i: classified[i][0])
    running: set[int] = set()
    nxt = 0
    idle = []
    for left, right in zip(boundaries, boundaries[1:]):
        while nxt < len(order) and classified[order[nxt]][0] <= left:
            running.add(order[nxt])
            nxt += 1
        running = {i for i in running if classified[i][1] > left}
        if not running:
            idle.append((left, right))
            continue
        for i in running:
            share[i] += (right - left) / len(running)
    for i, (_, _, category, name, stack, decided_by) in enumerate(classified):
        tally.add(category, share[i] / 1e3, name, stack, decided_by)

    waits = sorted((e.start, e.end) for e in main.events if e.name == cat.DATA_ANNOTATION)
    for left, right in idle:
        waiting = sum(_clip(s, e, (left, right)) for s, e in waits)
        if waiting > 0:
            tally.add(cat.DATA, waiting / 1e3, "(device idle, waiting for the next batch)", [], None)
        if right - left - waiting > 0:
            tally.add(cat.HOST_GAP, (right - left - waiting) / 1e3, "(device idle)", [], None)
