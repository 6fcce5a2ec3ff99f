"""Weighted mixtures of packed corpora: which source each next training row comes from, deterministically and
resumably.

Weights are shares of *tokens*. Every packed row holds the same seq_len + 1 tokens whatever its source, so a share of
tokens is a share of rows; weights are relative (normalised to sum to 1).

The order of sources follows the deficit rule of Megatron-LM's blended datasets: the next row comes from the source
whose count of rows so far lags its weight the most (the largest weight·(n+1) − rows, ties to the source listed
first). At every point each source's count differs from weight·n by less than one row, and the order is a pure function
of the weights and the number of rows drawn: no random numbers, and resuming needs only the per-source counts. Within
a source, rows come in the order of its own ResumableSampler (seeded by the phase seed and the source's name), epoch
after epoch: a small source repeats while a large one is still in its first epoch. Data-parallel ranks take turns in
this one order (MixtureSampler).
"""
from __future__ import annotations

import bisect
import math

import torch

from .errors import DataError
from .sampler import ResumableSampler
from .sources import stable_fraction


def normalised_weights(weights: dict[str, float]) -> dict[str, float]:
    """The weights scaled to sum to 1, in the given order; a weight that is not a positive finite number is refused."""
    if not weights:
        raise DataError("a mixture needs at least one source")
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise DataError(f"mixture weight of source '{name}' must be a positive number, got {weight!r}")
    total = sum(weights.values())
    return {name: weight / total for name, weight in weights.items()}


class DeficitSchedule:
    """The source of each next row: the one furthest behind its weight (see the module docstring)."""

    def __init__(self, weights: dict[str, float], rows: dict[str, int] | None = None):
        self.weights = normalised_weights(weights)
        self.rows = {name: int((rows or {}).get(name, 0)) for name in self.weights}

    def next(self, among=None) -> str:
        """Choose the next row's source (among the named ones only, if given) and count it."""
        n = sum(self.rows.values())
        names = [name for name in self.weights if among is None or name in among]
        name = max(names, key=lambda s: (self.weights[s] * (n + 1) - self.rows[s], -names.index(s)))
        self.rows[name] += 1
        return name


class MixedDataset(torch.utils.data.Dataset):
    """Named datasets with their weights, read as one: index = the source's offset + the row in that source."""

    def __init__(self, parts: dict[str, torch.utils.data.Dataset], weights: dict[str, float]):
        if list(parts) != list(weights):
            raise DataError(f"mixture sources {list(weights)} and datasets {list(parts)} differ")
        self.parts, self.weights = dict(parts), normalised_weights(weights)
        self.names = list(parts)
        for name, part in self.parts.items():
            if len(part) == 0:
                raise DataError(f"mixture source '{name}' has no rows")
        seq_lens = {getattr(part, "seq_len", None) for part in self.parts.values()}
        if len(seq_lens) != 1:
            raise DataError(f"mixture sources have rows of different lengths: {sorted(map(str, seq_lens))}")
        (self.seq_len,) = seq_lens
        self.offsets, total = {}, 0
        for name in self.names:
            self.offsets[name] = total
            total += len(self.parts[name])
        self._starts = list(self.offsets.values())
        self._len = total

    def __len__(self) -> int:
        return self._len

    def locate(self, i: int) -> tuple[str, int]:
        """(source name, row in that source) of mixed index i."""
        if not 0 <= i < self._len:
            raise IndexError(f"row {i} out of range for a mixture of {self._len} rows")
        name = self.names[bisect.bisect_right(self._starts, i) - 1]
        return name, i - self.offsets[name]

    def __getitem__(self, i: int):
        name, row = self.locate(int(i))
        return self.parts[name][row]

    def interleaved(self, count: int) -> list[int]:
        """The first `count` mixed indices in mixture proportions, each source's rows in their own order (0, 1, …);
        a source that runs out drops out and the others go on (for a fixed validation slice)."""
        schedule, left = DeficitSchedule(self.weights), {name: len(part) for name, part in self.parts.items()}
        out: list[int] = []
        while len(out) < count and any(left.values()):
            name = schedule.next(among={s for s, n in left.items() if n})
            out.append(self.offsets[name] + len(self.parts[name]) - left[name])
            left[name] -= 1
        return out


def source_seed(seed: int, name: str) -> int:
    """The sampler seed of source `name` in a phase seeded `seed`: two sources never share a permutation."""
    return int(stable_fraction(f"{seed}/{name}") * 2**62)


class MixtureSampler:
    """ResumableSampler's drawing protocol (draw, state_dict, load_state_dict) over a MixedDataset, for one rank.

    The order is global: global row g (of all ranks together) comes from the deficit schedule's g-th choice, and from
    that source's next row in its own permutation; rank r takes the global rows g ≡ r (mod world_size), as
    ResumableSampler splits a single corpus. So N processes draw exactly the global batches of one process (any N
    whose batches divide alike), each source's rows are split between ranks without overlap within an epoch, and
    the counts are global counts. Every rank follows the whole order (a few integer operations per global row) and
    keeps its own rows."""

    def __init__(self, dataset: MixedDataset, seed: int, rank: int = 0, world_size: int = 1):
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size) with world_size >= 1, got rank={rank!r}, "
                            f"world_size={world_size!r}")
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.samplers = {name: ResumableSampler(len(part), seed=source_seed(seed, name))
                         for name, part in dataset.parts.items()}
        self.schedule = DeficitSchedule(dataset.weights)

    def draw(self) -> int:
        """This rank's next row: the one of the next round of world_size global rows that falls to it."""
        for r in range(self.world_size):
            name = self.schedule.next()
            row = self.samplers[name].draw()
            if r == self.rank:
                mine = self.dataset.offsets[name] + row
        return mine

    def rows_by_source(self) -> dict[str, int]:
        """Rows all ranks together have drawn from each source."""
        return dict(self.schedule.rows)

    def state_dict(self) -> dict:
        return {"weights": dict(self.schedule.weights), "rows": self.rows_by_source(),
                "sources": {name: sampler.state_dict() for name, sampler in self.samplers.items()}}

    def load_state_dict(self, state: dict) -> None:
        if "weights" not in state:
            raise DataError("the checkpoint's data position is of a single-source phase, but this phase is a "
                            "mixture; resume with the recipe that wrote it")
        saved = {name: round(w, 12) for name, w in state["weights"].items()}
        if saved != {name: round(w, 12) for name, w in self.schedule.weights.items()}:
            raise DataError(f"the checkpoint was written with mixture weights {state['weights']}, this run has "
                            f"{self.schedule.weights}; resume with the same mixture")
        for name, sampler in self.samplers.items():
            sampler.load_state_dict(state["sources"][name])
        # from the dataset's weights, as in __init__: normalising the schedule's own weights again could move them by
        # a rounding error and flip a tie between two sources
        self.schedule = DeficitSchedule(self.dataset.weights, state["rows"])
