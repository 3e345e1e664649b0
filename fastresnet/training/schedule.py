"""The learning-rate schedule, per optimizer step, in plain Python.

The lr of a step is computed on the host from the step number (no tensors,
no syncs); only the plateau rule and the error-based warm-up need a metric,
and they get it at evaluation or logging time, when it is on the host anyway.

Phases: warm-up (linear from warmup_lr to lr, or constant at warmup_lr, for
`warmup` steps and/or until the training error falls below a threshold, as
the paper does for ResNet-110), then the main schedule over the remaining
steps: constant, step (divide by lr_decay at each milestone), cosine (to
min_lr), or plateau (divide by lr_decay when the test error stops improving).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class ScheduleSpec:
    peak_lr: float  # after linear batch scaling
    total_steps: int
    kind: str  # constant, step, cosine, plateau
    milestones: tuple[int, ...]  # steps
    decay: float
    min_lr: float
    warmup_steps: int  # 0 = no step-count limit
    warmup_kind: str  # linear, constant
    warmup_lr: float
    warmup_until_train_error: float  # percent; 0 = off
    plateau_patience: int  # evaluations
    plateau_threshold: float  # percentage points


class LRSchedule:
    def __init__(self, spec: ScheduleSpec):
        self.spec = spec
        self.warmup_done_at: int | None = None if self._has_warmup() else 0
        self.plateau_decays = 0
        self.best_error = math.inf
        self.evals_since_best = 0

    def _has_warmup(self) -> bool:
        return self.spec.warmup_steps > 0 or self.spec.warmup_until_train_error > 0

    def lr_at(self, step: int) -> float:
        s = self.spec
        if self.warmup_done_at is None:
            if s.warmup_steps > 0 and step >= s.warmup_steps:
                self.warmup_done_at = s.warmup_steps
            else:
                return self._warmup_lr(step)
        return self._main_lr(step)

    def _warmup_lr(self, step: int) -> float:
        s = self.spec
        if s.warmup_kind == "constant" or s.warmup_steps <= 0:
            return s.warmup_lr
        return s.warmup_lr + (s.peak_lr - s.warmup_lr) * step / s.warmup_steps

    def _main_lr(self, step: int) -> float:
        s = self.spec
        if s.kind == "constant":
            return s.peak_lr
        if s.kind == "step":
            passed = sum(step >= m for m in s.milestones)
            return s.peak_lr / s.decay**passed
        if s.kind == "plateau":
            return s.peak_lr / s.decay**self.plateau_decays
        if s.kind == "cosine":
            start = self.warmup_done_at or 0
            span = max(1, s.total_steps - start)
            progress = min(1.0, max(0.0, (step - start) / span))
            return s.min_lr + (s.peak_lr - s.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        raise ValueError(f"unknown schedule {s.kind!r}")

    def observe_train_error(self, step: int, error_percent: float) -> bool:
        """Ends an error-based warm-up once the training error is below its threshold; True if it ended."""
        s = self.spec
        if self.warmup_done_at is None and s.warmup_until_train_error > 0 and error_percent < s.warmup_until_train_error:
            self.warmup_done_at = step
            return True
        return False

    def observe_test_error(self, error_percent: float) -> bool:
        """The plateau rule; True when the lr was just divided."""
        if self.spec.kind != "plateau":
            return False
        if error_percent < self.best_error - self.spec.plateau_threshold:
            self.best_error = error_percent
            self.evals_since_best = 0
            return False
        self.evals_since_best += 1
        if self.evals_since_best >= self.spec.plateau_patience:
            self.plateau_decays += 1
            self.evals_since_best = 0
            self.best_error = min(self.best_error, error_percent)
            return True
        return False

    def state_dict(self) -> dict:
        return {
            "warmup_done_at": -1 if self.warmup_done_at is None else self.warmup_done_at,
            "plateau_decays": self.plateau_decays,
            "best_error": self.best_error,
            "evals_since_best": self.evals_since_best,
        }

    def load_state_dict(self, state: dict) -> None:
        done = state["warmup_done_at"]
        self.warmup_done_at = None if done < 0 else done
        self.plateau_decays = state["plateau_decays"]
        self.best_error = state["best_error"]
        self.evals_since_best = state["evals_since_best"]
