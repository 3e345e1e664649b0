"""Whether an error moves the expected way from each net to the next, and whether the seeds decide it.

A finding such as "each deeper ResNet has lower training error" is a chain of steps between nets.
Each step is a difference of errors (each error the mean over the net's seeds) set against a
bound: 0 for "lower", or a margin for "higher by more than the margin". One seed cannot tell a
real step from the noise of training; with several, a step is decided when its difference lies
further than SPREADS standard errors from the bound, the standard error of a difference of two
means being sqrt(std_a^2 / n_a + std_b^2 / n_b) over the nets' seeds.
"""

from __future__ import annotations

import math

from .tables import seed_count

SPREADS = 2.0  # about 95% on a normal spread; with 3 seeds a step must clear the noise by a wide margin


def standard_error(a: dict, b: dict, key: str) -> float | None:
    """The standard error of b[key] - a[key], both means over their seeds (runs.over_seeds); None for one seed."""
    na, nb = seed_count(a), seed_count(b)
    if min(na, nb) < 2:
        return None
    return math.sqrt(a[f"{key}_std"] ** 2 / na + b[f"{key}_std"] ** 2 / nb)


def trend(summaries: list[dict], key: str, rises_by: float | None = None) -> dict:
    """Whether summaries' `key` falls at every step (rises_by None) or rises by more than `rises_by`
    points, and whether the seeds decide that (decided_over its steps)."""
    bound = 0.0 if rises_by is None else rises_by
    steps = []
    for a, b in zip(summaries, summaries[1:]):
        difference = b[key] - a[key]
        error = standard_error(a, b, key)
        steps.append({
            "difference": difference,
            "standard_error": error,
            "holds": difference > bound if rises_by is not None else difference < bound,
            "decided": None if error is None else abs(difference - bound) > SPREADS * error,
        })
    return {"steps": steps, "holds": bool(steps) and all(s["holds"] for s in steps), "decided": decided_over(steps)}


def decided_over(parts: list[dict]) -> bool | None:
    """Whether parts (each with "holds" and "decided") decide their conjunction: one that holds is
    decided when every part is; one that fails, when some failing part is. None where that turns on a
    part with a single seed."""
    if not parts:
        return None
    if all(p["holds"] for p in parts):
        decisions = [p["decided"] for p in parts]
        return False if False in decisions else None if None in decisions else True
    decisions = [p["decided"] for p in parts if not p["holds"]]
    return True if True in decisions else None if None in decisions else False


def verdict_word(holds: bool, decided: bool | None) -> str:
    """shown / not shown, or why the runs do not decide it."""
    if decided is None:
        return f"{'shown' if holds else 'not shown'} on one seed (its spread not measured)"
    if not decided:
        return "not decided: within the seeds' spread"
    return "shown" if holds else "not shown"


def steps_text(t: dict) -> str:
    """The steps as "+1.20 ± 0.30, -0.40": difference, and its standard error where the seeds give one."""
    return ", ".join(f"{s['difference']:+.2f}" + (f" ± {s['standard_error']:.2f}" if s["standard_error"] is not None
                                                  else "") for s in t["steps"])
