"""Hyper-parameter schedules counted in optimizer steps, and when masks are updated.

A schedule moves a value from `initial` to `final` between steps `begin` and `end` along a shape; before `begin` it
is `initial`, after `end` it is `final`. Constant is a schedule too, so every hyper-parameter of an algorithm is a
schedule (a plain number becomes Constant).

    Cosine(0.3, 0.0, begin=0, end=3584)   # RigL's drop fraction: 0.3 decaying to 0 over a half period of 3584
    Cubic(0.0, 0.75, begin=0, end=600)    # GMP's sparsity (Zhu & Gupta 2017): fast at first, then flattening
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    initial: float
    final: float
    begin: int = 0
    end: int = 1

    def __post_init__(self):
        if self.end <= self.begin:
            raise ValueError(f"{type(self).__name__} schedule needs end > begin, got begin={self.begin}, "
                             f"end={self.end}")

    def shape(self, p: float) -> float:
        """Fraction of the way from initial to final at progress p in [0, 1]."""
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        # The ends are returned as given: initial + (final - initial) can miss `final` by an ulp (0.05 + (0.22 - 0.05)
        # is 0.21999999999999997), and GMP's last update would then round its zero count to one less than the target's
        if step <= self.begin:
            return self.initial
        if step >= self.end:
            return self.final
        return self.initial + (self.final - self.initial) * self.shape((step - self.begin) / (self.end - self.begin))


class Constant(Schedule):
    def __init__(self, value: float):
        super().__init__(value, value, 0, 1)

    def shape(self, p):
        return 0.0


class Linear(Schedule):
    def shape(self, p):
        return p


class Cosine(Schedule):
    def shape(self, p):
        return (1 - math.cos(math.pi * p)) / 2


class Cubic(Schedule):
    def shape(self, p):
        return 1 - (1 - p) ** 3


SCHEDULES = {"constant": Constant, "linear": Linear, "cosine": Cosine, "cubic": Cubic}


def as_schedule(value) -> Schedule:
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"a hyper-parameter must be a number or a Schedule, got {value!r}")
    return Constant(float(value))


def ramp(kind: str, initial: float, final: float, begin: int, end: int) -> Schedule:
    """The schedule named `kind` from initial to final over [begin, end] (recipes name schedules by kind)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; allowed: {', '.join(SCHEDULES)}")
    return Constant(initial) if kind == "constant" else SCHEDULES[kind](initial, final, begin, end)


@dataclass(frozen=True)
class UpdateSchedule:
    """Masks change after optimizer step t (1-based) when begin < t, (t - begin) % every == 0 and t <= stop."""

    every: int = 100
    begin: int = 0
    stop: int | None = None

    def __post_init__(self):
        if not (isinstance(self.every, int) and self.every >= 1):
            raise ValueError(f"mask updates need every >= 1 optimizer steps, got {self.every!r}")
        if self.begin < 0 or (self.stop is not None and self.stop <= self.begin):
            raise ValueError(f"mask updates need 0 <= begin < stop, got begin={self.begin}, stop={self.stop}")

    def __call__(self, step: int) -> bool:
        return step > self.begin and (step - self.begin) % self.every == 0 and (self.stop is None or step <= self.stop)

    def last_at_or_before(self, step: int) -> int | None:
        """The last update step at or before `step`, or None (closed form: schedules of millions of steps)."""
        last = min(step, step if self.stop is None else self.stop)
        last = self.begin + self.every * ((last - self.begin) // self.every)
        return last if last > self.begin else None

    def steps_until(self, steps: int) -> range:
        """The update steps among optimizer steps 1..steps."""
        end = steps if self.stop is None else min(steps, self.stop)
        return range(self.begin + self.every, end + 1, self.every)
