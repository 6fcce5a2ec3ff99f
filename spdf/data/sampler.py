"""A deterministic, resumable, data-parallel order over dataset indices."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .errors import DataError


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Indices of epoch e: a permutation drawn from (seed, e), cut to a multiple of world_size, every
    world_size-th one from `rank` on. So ranks see disjoint, equally many indices, and the order depends only on
    (seed, epoch, rank, world_size) - never on when the run was started or stopped.

    Each `iter()` yields the rest of the current epoch, from `offset` on, then moves to the next epoch.
    `state_dict()` records {"epoch", "offset", "seed", "world_size", "shuffle"}; `load_state_dict()` restores
    it, after which iteration continues exactly where the saved sampler stood.

    `draw()` gives one index at a time, crossing into the next epoch when one ends; it moves the same position.

    `offset` counts indices yielded. A DataLoader with num_workers=0 draws indices only when a batch is consumed;
    with workers it draws ahead, so pass the number of samples this rank really consumed in the current epoch:
    `state_dict(consumed=...)`.
    """

    def __init__(self, dataset_len: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size) with world_size >= 1, got rank={rank!r}, "
                            f"world_size={world_size!r}")
        if dataset_len < world_size:
            raise DataError(f"dataset of {dataset_len} sequences is too small for {world_size} data-parallel ranks")
        self.dataset_len, self.seed, self.rank, self.world_size = int(dataset_len), int(seed), rank, world_size
        self.shuffle = bool(shuffle)
        self.epoch, self.offset = 0, 0
        self._epoch_cache: tuple[int, np.ndarray] | None = None  # (epoch, its indices), for draw()

    def __len__(self) -> int:
        """Indices per rank per epoch (the first, resumed epoch yields `len(self) - offset`)."""
        return self.dataset_len // self.world_size

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's indices of `epoch`, in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.dataset_len)
        else:
            order = np.arange(self.dataset_len)
        return order[: len(self) * self.world_size][self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)
        while self.offset < len(indices):
            self.offset += 1
            yield int(indices[self.offset - 1])
        self.epoch, self.offset = self.epoch + 1, 0

    def draw(self) -> int:
        """The next index of this rank's order, starting the next epoch when the current one is used up."""
        if self.offset >= len(self):
            self.epoch, self.offset = self.epoch + 1, 0
        if self._epoch_cache is None or self._epoch_cache[0] != self.epoch:
            self._epoch_cache = (self.epoch, self.epoch_indices(self.epoch))
        self.offset += 1
        return int(self._epoch_cache[1][self.offset - 1])

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (DistributedSampler's verb)."""
        self.epoch, self.offset = int(epoch), 0

    def state_dict(self, consumed: int | None = None) -> dict:
        offset = self.offset if consumed is None else int(consumed)
        return {"epoch": self.epoch, "offset": offset, "seed": self.seed, "world_size": self.world_size,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world_size", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"sampler state has {key}={state[key]!r} but this run has {getattr(self, key)!r}; "
                                f"resume with the same {key}")
        if not 0 <= state["offset"] <= len(self):
            raise DataError(f"sampler offset {state['offset']} is outside this epoch's [0, {len(self)}]")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
