"""This rank's micro-batches for a phase, in a deterministic order whose position is saved with checkpoints."""
from __future__ import annotations

import torch

from ..data import FinetuneDataset, PackedDataset, ResumableSampler, pad_collate


def _packed_collate(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack(rows)
    return x[:, :-1], x[:, 1:]


def _finetune_collate(items: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = pad_collate(items, pad_id=pad_id)
    return batch["input_ids"][:, :-1], batch["labels"][:, 1:]


class BatchSource:
    """Micro-batches of (idx, targets) for training, and a fixed slice of the validation split for evaluation."""

    def __init__(self, train, val, seed: int, rank: int, world_size: int, pad_id: int = 0):
        self.train, self.val = train, val
        self.rank, self.world_size = rank, world_size
        self.sampler = ResumableSampler(len(train), seed=seed, rank=rank, world_size=world_size)
        self._indices = None
        if isinstance(train, PackedDataset):
            self.collate = _packed_collate
        elif isinstance(train, FinetuneDataset):
            self.collate = lambda items: _finetune_collate(items, pad_id)
        else:
            raise TypeError(f"unsupported dataset type {type(train).__name__}")

    def _next_index(self) -> int:
        if self._indices is None:
            self._indices = iter(self.sampler)
        for _ in range(2):  # at an epoch's end the sampler moves to the next epoch on the following iter()
            try:
                return next(self._indices)
            except StopIteration:
                self._indices = iter(self.sampler)
        raise RuntimeError("the training split yielded no sequence")

    def next_step(self, accum_steps: int, micro_batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.collate([self.train[self._next_index()] for _ in range(micro_batch_size)])
                for _ in range(accum_steps)]

    def val_batches(self, n_batches: int, batch_size: int = 8):
        """The first n_batches·batch_size·world validation items, this rank's share, in order."""
        mine = list(range(self.rank, len(self.val), self.world_size))[: n_batches * batch_size]
        for start in range(0, len(mine), batch_size):
            yield self.collate([self.val[i] for i in mine[start:start + batch_size]])

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._indices = None
