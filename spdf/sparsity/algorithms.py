"""Sparsity algorithms: how masks evolve over training. The Sparsifier runs one after every real optimizer step.

    Static()                                   the paper's: masks fixed at initialisation
    GMP(initial=0.0, every=100, stop=3584)     gradual magnitude pruning (Zhu & Gupta 2017): sparsity rises from
                                               `initial` to each layer's target on a cubic schedule, pruning the
                                               smallest |w| of the kept weights
    SET(drop_fraction=0.3, every=100, ...)     Mocanu et al. 2018: drop the smallest |w|, regrow as many at random
    RigL(drop_fraction=0.3, every=100, ...)    Evci et al. 2020: drop the smallest |w|, regrow where the dense
                                               gradient is largest

Every decision is a pure function of (weights, gradients, step, canonical parameter name, seed): weights and
all-reduced gradients are the same on every rank and random scores come from a generator seeded by (seed, name,
step), so every rank takes the same decision without communication. Drop and grow sets are disjoint (regrowth
candidates are the entries that were masked before the update), regrown weights start at zero, and each tensor keeps
its exact kept count (SET/RigL) or reaches exactly round(s·n) zeros (GMP).
"""
from __future__ import annotations

import torch

from .masks import generator_for, n_zeros
from .schedules import Schedule, UpdateSchedule, as_schedule, ramp


class Algorithm:
    name = "static"
    dynamic = False

    def initial_sparsity(self, target: float) -> float:
        """The sparsity a layer whose target is `target` starts at (its mask is made at this level)."""
        return target

    def is_update_step(self, step: int) -> bool:
        return False

    def update_steps(self, steps: int) -> range:
        """The steps among 1..steps after which the masks change: sparsity_at and needs_dense_grad are constant
        between them (a FLOP projection walks these stretches, not every step)."""
        return range(0)

    def needs_dense_grad(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) must see the dense gradient of sparse weights."""
        return False

    def sparsity_at(self, step: int, target: float) -> float:
        """A layer's sparsity during optimizer step `step` (1-based), for FLOP projections."""
        return target

    def new_mask(self, name: str, layer, step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(new mask, dropped, grown), bool (out, in), for the update after optimizer step `step`."""
        raise NotImplementedError

    def settings(self) -> dict:
        return {"algorithm": self.name}


class Static(Algorithm):
    """Masks chosen once, at sparsify(); never changed."""


class _Dynamic(Algorithm):
    dynamic = True

    def __init__(self, every: int = 100, begin: int = 0, stop: int | None = None):
        self.updates = UpdateSchedule(every, begin, stop)

    def is_update_step(self, step):
        return self.updates(step)

    def update_steps(self, steps):
        return self.updates.steps_until(steps)

    def settings(self):
        u = self.updates
        return {"algorithm": self.name, "every": u.every, "begin": u.begin, "stop": u.stop}


class GMP(_Dynamic):
    name = "gmp"

    def __init__(self, initial: float = 0.0, every: int = 100, begin: int = 0, stop: int | None = None,
                 schedule: str = "cubic"):
        if stop is None:
            raise ValueError("GMP needs the step at which pruning ends (stop)")
        super().__init__(every, begin, stop)
        if not 0.0 <= initial < 1.0:
            raise ValueError(f"GMP's initial sparsity must be in [0, 1), got {initial!r}")
        self.initial, self.schedule = float(initial), schedule
        # The ramp ends at the last update at or before `stop`, so that update reaches the target exactly.
        self.end = begin + every * ((stop - begin) // every)
        if self.end <= begin:
            raise ValueError(f"GMP needs at least one update between begin={begin} and stop={stop} (every={every})")
        ramp(schedule, 0.0, 1.0, begin, self.end)  # an unknown schedule name fails here, not at the first update

    def _level(self, step: int, target: float) -> float:
        start = min(self.initial, target)
        return ramp(self.schedule, start, target, self.updates.begin, self.end)(step)

    def initial_sparsity(self, target):
        return min(self.initial, target)

    def sparsity_at(self, step, target):
        # The mask of step t was set by the last update at or before step t - 1.
        last = self.updates.last_at_or_before(step - 1)
        return self.initial_sparsity(target) if last is None else self._level(last, target)

    def new_mask(self, name, layer, step, seed):
        mask = layer.mask
        zeros = n_zeros(mask.numel(), self._level(step, layer.target_sparsity))
        drop_count = max(zeros - int((~mask).sum()), 0)  # pruned weights stay pruned: the sparsity only rises
        score = layer.dense_weight().detach().abs().float().masked_fill(~mask, float("inf"))
        dropped = _lowest(score, drop_count)
        return mask & ~dropped, dropped, torch.zeros_like(mask)

    def settings(self):
        return {**super().settings(), "initial": self.initial, "schedule": self.schedule}


class _DropAndGrow(_Dynamic):
    """Drop the kept weights of smallest |w| (a fraction of the kept count), grow as many among the masked ones."""

    def __init__(self, drop_fraction: float | Schedule = 0.3, every: int = 100, begin: int = 0,
                 stop: int | None = None):
        super().__init__(every, begin, stop)
        self.drop_fraction = as_schedule(drop_fraction)
        for value in (self.drop_fraction.initial, self.drop_fraction.final):
            _check_fraction(value)

    def grow_scores(self, name: str, layer, step: int, seed: int, candidates: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def new_mask(self, name, layer, step, seed):
        mask = layer.mask
        kept, masked = int(mask.sum()), int((~mask).sum())
        # a fraction above 1 would drop masked entries too (and grow some of them back): counts and disjointness lost
        count = min(round(_check_fraction(self.drop_fraction(step)) * kept), masked)
        score = layer.dense_weight().detach().abs().float().masked_fill(~mask, float("inf"))
        dropped = _lowest(score, count)
        grow_score = self.grow_scores(name, layer, step, seed, ~mask).float().masked_fill(mask, float("-inf"))
        grown = _lowest(-grow_score, count)
        return (mask & ~dropped) | grown, dropped, grown

    def settings(self):
        return {**super().settings(), "drop_fraction": repr(self.drop_fraction)}


class SET(_DropAndGrow):
    name = "set"

    def grow_scores(self, name, layer, step, seed, candidates):
        gen = generator_for(seed, f"{name}/grow@{step}")
        return torch.rand(candidates.shape, generator=gen).to(candidates.device)


class RigL(_DropAndGrow):
    name = "rigl"

    def needs_dense_grad(self, step):
        return self.is_update_step(step)

    def grow_scores(self, name, layer, step, seed, candidates):
        grad = layer.dense_grad
        if grad is None:
            raise ValueError(f"RigL needs the dense gradient of {name!r} on update step {step}, but it has none "
                             f"(is the sparsifier attached to the optimizer that steps this weight?)")
        return grad.abs()


def _check_fraction(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"drop_fraction is a fraction of the kept weights, in [0, 1]; got {value!r}")
    return value


def _lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Bool tensor marking the `count` entries of lowest score (ties broken the same way on every rank)."""
    out = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if count > 0:
        out[torch.topk(score.flatten(), count, largest=False, sorted=False).indices] = True
    return out.view(score.shape)


ALGORITHMS = {cls.name: cls for cls in (Static, GMP, SET, RigL)}
