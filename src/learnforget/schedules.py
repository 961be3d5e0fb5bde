"""Learning-rate schedules: multipliers of the peak learning rate as a function of the step.

``step`` is 0-based: the multiplier for the ``step``-th optimizer update. Every schedule warms
up linearly over ``warmup_steps`` (multiplier ``(step + 1) / warmup_steps``), then:

- ``constant``: 1.
- ``cosine``: half a cosine from 1 down to ``min_lr_ratio`` at ``total_steps`` (the paper's IFT
  runs: 10% warm-up, down to 1% of the peak).
- ``wsd`` (warm-up, stable, decay): 1 until the last ``decay_fraction`` of ``total_steps``, then
  linear down to ``min_lr_ratio`` at ``total_steps``.

A schedule is *length-independent* when its value at a step does not depend on the total
length, so that a longer run can continue from a shorter run's checkpoint (constant: yes;
cosine and wsd: no). Adding a schedule is one :func:`register` entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    fn: Callable[..., float]  # fn(step, warmup_steps, total_steps, min_lr_ratio, decay_fraction)
    length_independent: bool


SCHEDULES: dict[str, ScheduleSpec] = {}


def register(name: str, length_independent: bool):
    def deco(fn):
        SCHEDULES[name] = ScheduleSpec(name, fn, length_independent)
        return fn

    return deco


def _warmup(step: int, warmup_steps: int) -> float | None:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return None


@register("constant", length_independent=True)
def constant(step, warmup_steps=0, total_steps=None, min_lr_ratio=0.0, decay_fraction=0.0) -> float:
    w = _warmup(step, warmup_steps)
    return 1.0 if w is None else w


@register("cosine", length_independent=False)
def cosine(step, warmup_steps=0, total_steps=None, min_lr_ratio=0.0, decay_fraction=0.0) -> float:
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@register("wsd", length_independent=False)
def wsd(step, warmup_steps=0, total_steps=None, min_lr_ratio=0.0, decay_fraction=0.2) -> float:
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = max(warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return 1.0 - (1.0 - min_lr_ratio) * progress


def length_independent(name: str) -> bool:
    """Whether a longer run can continue from a shorter run's checkpoint under this schedule."""
    return _spec(name).length_independent


def _spec(name: str) -> ScheduleSpec:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r} (known: {', '.join(SCHEDULES)})")
    return SCHEDULES[name]


def make_schedule(name: str, *, warmup_steps: int = 0, total_steps: int | None = None,
                  min_lr_ratio: float = 0.0, decay_fraction: float = 0.2) -> Callable[[int], float]:
    """The multiplier function ``step -> float`` of a named schedule, with its settings checked."""
    spec = _spec(name)
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if not spec.length_independent and (total_steps is None or total_steps < 1):
        raise ValueError(f"schedule {name!r} needs total_steps >= 1, got {total_steps!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction must be in [0, 1], got {decay_fraction!r}")

    def multiplier(step: int) -> float:
        return spec.fn(step, warmup_steps, total_steps, min_lr_ratio, decay_fraction)

    return multiplier
