"""The non-finite guard: a step whose loss or gradient norm is NaN/inf is skipped (no optimizer update, so masks,
weights, optimizer state and the LR schedule stay as they were), and too many in a row stop the run.

Stopping raises NonFiniteTraining before anything is written from the bad state; the last checkpoint is the last
good one. The decision uses flags already reduced over ranks, so every rank skips (or stops) at the same step.
"""
from __future__ import annotations

import sys


class NonFiniteTraining(RuntimeError):
    """Training diverged: `limit` consecutive steps had a non-finite loss or gradient norm (exit code 3)."""


class NonFiniteGuard:
    def __init__(self, phase: str, limit: int):
        self.phase, self.limit, self.in_a_row = phase, limit, 0

    def skip(self, bad: bool, step: int) -> bool:
        """Record the outcome of the step that would become `step`; True if it must be skipped."""
        if not bad:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        print(f"spdf: [{self.phase}] step {step}: non-finite loss or gradient norm; step skipped "
              f"({self.in_a_row} of at most {self.limit} in a row)", file=sys.stderr, flush=True)
        if self.in_a_row >= self.limit:
            raise NonFiniteTraining(
                f"[{self.phase}] training diverged: {self.limit} steps in a row had a non-finite loss or gradient "
                f"norm at step {step}; nothing was saved from that state. Lower the learning rate (or raise "
                f"phases.{self.phase}.optimizer.max_nonfinite_steps) and run again: it resumes from the last "
                f"checkpoint")
        return True
