"""What the run prints: a progress bar on a terminal, plain lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time

BAR_WIDTH = 24  # characters
REDRAW_SECONDS = 0.2  # the bar is redrawn at most this often (printing is not free)


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def train_summary(r: dict) -> str:
    parts = [
        f"loss {r['loss']:.4f}", f"train err {r['error']:.2f}%", f"lr {r['lr']:.4g}",
        f"{_fmt_rate(r['images_per_s'])} img/s (compute {_fmt_rate(r['compute_images_per_s'])}, "
        f"data wait {100 * r['data_wait_fraction']:.0f}%)",
        f"{r['tflops']:.3g} TFLOP/s" + (f" ({100 * r['peak_fraction']:.1f}% of peak)" if r["peak_fraction"] else ""),
        f"mem {r['memory_gib']:.2f} GiB",
    ]
    if r.get("skipped_steps"):
        parts.append(f"{r['skipped_steps']} steps skipped (fp16 overflow)")
    return " | ".join(parts)


class Progress:
    def __init__(self, mode: str, *, enabled: bool, total_steps: int, steps_per_epoch: int, stream=None):
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode if enabled else "off"
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.last_summary = ""
        self.last_draw = 0.0
        self.bar_visible = False

    def tick(self, step: int, epoch: int) -> None:
        if self.mode != "bar":
            return
        now = time.monotonic()
        if now - self.last_draw < REDRAW_SECONDS and step != self.total_steps:
            return
        self.last_draw = now
        filled = int(BAR_WIDTH * step / max(1, self.total_steps))
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        self.stream.write(f"\r\033[K[{bar}] step {step}/{self.total_steps} epoch {epoch + 1} | {self.last_summary}")
        self.stream.flush()
        self.bar_visible = True

    def train_line(self, record: dict, total_steps: int) -> None:
        if self.mode == "off":
            return
        summary = train_summary(record)
        if self.mode == "bar":
            self.last_summary = summary
            return
        self._print(f"step {record['step']}/{total_steps} (epoch {record['epoch']:.2f}) | {summary}")

    def eval_line(self, r: dict) -> None:
        crops = f", {r['crops']} crops" if r.get("crops", 1) > 1 else ""
        self.note(f"test at step {r['step']} (epoch {r['epoch']:.2f}{crops}): top-1 {r['top1']:.2f}% "
                  f"(error {r['top1_error']:.2f}%), top-5 {r['top5']:.2f}%, loss {r['loss']:.4f}, {r['images']} images")

    def note(self, text: str) -> None:
        if self.mode != "off":
            self._print(text)

    def _print(self, text: str) -> None:
        if self.bar_visible:
            self.stream.write("\r\033[K")
            self.bar_visible = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar_visible:
            self.stream.write("\n")
            self.stream.flush()
            self.bar_visible = False
