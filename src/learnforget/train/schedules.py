"""Learning-rate schedules: multipliers of the peak learning rate as a function of the step.

``step`` is 0-based: the multiplier for the ``step``-th optimizer update. Every schedule warms
up linearly over ``warmup_steps`` (multiplier ``(step + 1) / warmup_steps``), then follows its
*trunk*:

- ``constant``: 1.
- ``inverse_sqrt``: ``sqrt(w / (step + 1))`` with ``w = max(1, warmup_steps)`` (the paper's CPT).
- ``wsd`` (warm-up, stable, decay): 1.
- ``cosine``: half a cosine from 1 down to ``min_lr_ratio`` at ``total_steps`` (the paper's IFT
  runs: 10% warm-up, down to 1% of the peak).

Schedules with a *cool-down* (``inverse_sqrt`` and ``wsd``) end each run of ``total_steps``
with a linear decay over its last ``cooldown_fraction``: from the trunk's value at the first
cool-down step down to ``min_lr_ratio`` (or that value, if lower) at the last step.

A schedule's *trunk* is length-independent when its value at a step does not depend on the
total length (constant, inverse_sqrt, wsd; not cosine). Then one trunk serves every duration of
a run: a longer duration continues the trunk from where the shorter one's cool-down branched
off (:func:`cooldown_start`), and each evaluated duration gets its own short cool-down branch.
Adding a schedule is one :func:`register` entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    trunk: Callable[..., float]  # trunk(step, warmup_steps, total_steps, min_lr_ratio) after warm-up
    length_independent: bool  # the trunk does not depend on total_steps
    cooldown: bool  # ends with a linear cool-down over the last cooldown_fraction


SCHEDULES: dict[str, ScheduleSpec] = {}


def register(name: str, *, length_independent: bool, cooldown: bool = False):
    def deco(fn):
        SCHEDULES[name] = ScheduleSpec(name, fn, length_independent, cooldown)
        return fn

    return deco


@register("constant", length_independent=True)
def _constant(step, warmup_steps, total_steps, min_lr_ratio) -> float:
    return 1.0


@register("wsd", length_independent=True, cooldown=True)
def _stable(step, warmup_steps, total_steps, min_lr_ratio) -> float:
    return 1.0


@register("inverse_sqrt", length_independent=True, cooldown=True)
def _inverse_sqrt(step, warmup_steps, total_steps, min_lr_ratio) -> float:
    return math.sqrt(max(1, warmup_steps) / (step + 1))


@register("cosine", length_independent=False)
def _cosine(step, warmup_steps, total_steps, min_lr_ratio) -> float:
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def spec(name: str) -> ScheduleSpec:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r} (known: {', '.join(SCHEDULES)})")
    return SCHEDULES[name]


def length_independent(name: str) -> bool:
    """Whether the schedule's trunk is the same whatever the run's length."""
    return spec(name).length_independent


def has_cooldown(name: str, cooldown_fraction: float) -> bool:
    return spec(name).cooldown and cooldown_fraction > 0


def cooldown_start(name: str, total_steps: int, cooldown_fraction: float) -> int:
    """The first step of the cool-down of a run of ``total_steps`` (``total_steps`` when none)."""
    if not has_cooldown(name, cooldown_fraction):
        return total_steps
    return max(0, total_steps - max(1, round(cooldown_fraction * total_steps)))


def make_schedule(name: str, *, warmup_steps: int = 0, total_steps: int | None = None,
                  min_lr_ratio: float = 0.0, cooldown_fraction: float = 0.0) -> Callable[[int], float]:
    """The multiplier function ``step -> float`` of a named schedule, with its settings checked.

    ``total_steps=None`` gives the trunk alone (length-independent schedules only)."""
    s = spec(name)
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if total_steps is None and not s.length_independent:
        raise ValueError(f"schedule {name!r} needs total_steps")
    if total_steps is not None and total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    if not 0.0 <= cooldown_fraction <= 1.0:
        raise ValueError(f"cooldown_fraction must be in [0, 1], got {cooldown_fraction!r}")
    start = None if total_steps is None else cooldown_start(name, total_steps, cooldown_fraction)

    def trunk(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return s.trunk(step, warmup_steps, total_steps, min_lr_ratio)

    def multiplier(step: int) -> float:
        if start is None or step < start or start >= total_steps:
            return trunk(step)
        top = trunk(start)
        end = min(min_lr_ratio, top)
        return top + (end - top) * (step - start + 1) / (total_steps - start)

    return multiplier
