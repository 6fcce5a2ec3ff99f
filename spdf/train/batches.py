"""This rank's micro-batches for a phase, in a deterministic order whose position is saved with checkpoints."""
from __future__ import annotations

import hashlib
import json

import torch

from ..data import DataError, FinetuneDataset, PackedDataset, ResumableSampler, pad_collate
from ..data.mixture import MixedDataset, MixtureSampler


def _packed_collate(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack(rows)
    return x[:, :-1], x[:, 1:]


def _finetune_collate(items: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = pad_collate(items, pad_id=pad_id)
    return batch["input_ids"][:, :-1], batch["labels"][:, 1:]


def data_identity(dataset) -> dict:
    """What a phase's training data is: the sampler's saved position indexes its rows, so a phase resumes only on
    the same rows. A packed split by its size and the sha256 of its recorded chunk checksums (None for a cache entry
    of an older spdf, which recorded none), a fine-tuning task by the sha256 of its tokenized rows, a mixture by its
    sources'."""
    if isinstance(dataset, MixedDataset):
        return {"parts": {name: data_identity(part) for name, part in dataset.parts.items()}}
    if isinstance(dataset, PackedDataset):
        return {"tokens": dataset.n_tokens, "content": dataset.content}
    return {"rows": hashlib.sha256(json.dumps(dataset.rows).encode()).hexdigest()}


def same_data(saved: dict, ours: dict) -> bool:
    """Whether two data_identity()s are of the same rows; a packed split's content is compared where both know it
    (the same corpus in an older cache entry and a rebuilt one has the same size and rows)."""
    if "parts" in saved or "parts" in ours:
        return (saved.keys() == ours.keys() and saved["parts"].keys() == ours["parts"].keys()
                and all(same_data(saved["parts"][n], ours["parts"][n]) for n in saved["parts"]))
    if "tokens" in saved and "tokens" in ours:
        return saved["tokens"] == ours["tokens"] and (
            saved["content"] is None or ours["content"] is None or saved["content"] == ours["content"])
    return saved == ours


class BatchSource:
    """Micro-batches of (idx, targets) for training, and a fixed slice of the validation split for evaluation.

    A MixedDataset (a pre-training mixture) is drawn from by a MixtureSampler, and its validation slice is in the
    mixture's proportions; tokens_by_source() then counts the tokens drawn from each source."""

    def __init__(self, train, val, seed: int, rank: int, world_size: int, pad_id: int = 0,
                 vocab_size: int | None = None):
        self.train, self.val, self.vocab_size = train, val, vocab_size
        self._identity: dict | None = None
        self.rank, self.world_size = rank, world_size
        if isinstance(train, MixedDataset):
            self.sampler = MixtureSampler(train, seed=seed, rank=rank, world_size=world_size)
        else:
            self.sampler = ResumableSampler(len(train), seed=seed, rank=rank, world_size=world_size)
        if isinstance(train, (PackedDataset, MixedDataset)):
            self.collate = _packed_collate
        elif isinstance(train, FinetuneDataset):
            self.collate = lambda items: _finetune_collate(items, pad_id)
        else:
            raise TypeError(f"unsupported dataset type {type(train).__name__}")

    def next_step(self, accum_steps: int, micro_batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self._in_vocab(self.collate([self.train[self.sampler.draw()] for _ in range(micro_batch_size)]),
                               self.train, "training") for _ in range(accum_steps)]

    def _in_vocab(self, batch: tuple[torch.Tensor, torch.Tensor], dataset, split: str):
        """`batch`, if every input id is inside the model's vocabulary; the embedding would raise an IndexError
        (or, on a GPU, a device-side assert) on one outside it. One max over a CPU batch, negligible per step."""
        idx = batch[0]
        if self.vocab_size is not None and idx.numel() and int(idx.max()) >= self.vocab_size:
            where = getattr(dataset, "path", None) or ", ".join(
                str(getattr(part, "path", part)) for part in getattr(dataset, "parts", {}).values())
            raise DataError(f"token id {int(idx.max())} in the {split} data ({where}) is outside the model's "
                            f"vocabulary of {self.vocab_size} tokens: the data was not made with this run's "
                            f"tokenizer, or is damaged; delete that data cache entry and run again")
        return batch

    def val_batches(self, n_batches: int, batch_size: int = 8):
        """The first n_batches·batch_size·world validation items, this rank's share, in order."""
        wanted = n_batches * batch_size * self.world_size
        order = self.val.interleaved(wanted) if isinstance(self.val, MixedDataset) else range(len(self.val))
        mine = list(order[self.rank::self.world_size])[: n_batches * batch_size]
        for start in range(0, len(mine), batch_size):
            yield self._in_vocab(self.collate([self.val[i] for i in mine[start:start + batch_size]]), self.val,
                                 "validation")

    def tokens_by_source(self) -> dict[str, int] | None:
        """Input tokens all ranks have drawn from each source of a mixture in this phase (None: not a mixture)."""
        if not isinstance(self.sampler, MixtureSampler):
            return None
        return {name: rows * self.train.seq_len for name, rows in self.sampler.rows_by_source().items()}

    @property
    def identity(self) -> dict:
        if self._identity is None:  # computed once, when first saved or checked
            self._identity = data_identity(self.train)
        return self._identity

    def state_dict(self) -> dict:
        return {**self.sampler.state_dict(), "data": self.identity}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        saved = state.pop("data", None)  # a checkpoint of an older spdf records none
        if saved is not None and not same_data(saved, self.identity):
            raise DataError("the training data of this phase is not what its checkpoint was trained on (a corpus or "
                            "task file changed, or its cache entry was rebuilt from other data): resuming would not "
                            "continue the run; restore the data, or train it in another run_dir")
        self.sampler.load_state_dict(state)
