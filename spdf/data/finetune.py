"""Prompt/completion examples → token rows whose loss is on the completion only, and their padding collate.

A row holds prompt tokens, then the completion's tokens and EOS; `labels` equals `input_ids` on the completion and
EOS and is -100 on the prompt (and on padding). Like a packed pre-training row, a row feeds the model as
inputs = input_ids[:, :-1] and targets = labels[:, 1:], so one training step serves both phases.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import DataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One task input. `references` are all acceptable outputs (evaluation scores against all of them, training
    uses one row per reference); `completion` is the first of them. Texts are bare: see `join_target`."""
    prompt: str
    completion: str
    references: list[str] = field(default_factory=list)

    def targets(self) -> list[str]:
        return self.references or [self.completion]


def join_target(prompt: str, text: str) -> str:
    """The completion text as it follows the prompt: a space after a prompt ending in, e.g., "Summary:"."""
    return text if not prompt or prompt[-1].isspace() or text[:1].isspace() else " " + text


def truncate_pair(prompt_ids: list[int], completion_ids: list[int], max_len: int) -> tuple[list[int], int]:
    """(prompt + completion ids cut to max_len, number of prompt ids kept).

    The completion keeps at most max_len - 1 tokens (its head; at least one prompt token stays as context), then
    the prompt gives up tokens from its middle: its head (a task's instruction, a function's `def` line) keeps a
    quarter of the prompt's budget and its tail (the cue and context right before the completion) the rest.
    """
    if max_len < 2:
        raise DataError(f"max_len must be >= 2 (a prompt token and a completion token), got {max_len}")
    completion_ids = completion_ids[: max_len - 1]
    keep = max_len - len(completion_ids)
    if len(prompt_ids) > keep:
        head = keep // 4
        prompt_ids = prompt_ids[:head] + prompt_ids[len(prompt_ids) - (keep - head):]
    return prompt_ids + completion_ids, len(prompt_ids)


class FinetuneDataset(torch.utils.data.Dataset):
    """Tokenized rows of examples: one per (example, reference), each at most `max_len` tokens.

    tokenizer: anything with `encode(str) -> list[int]` and `eos_id` (a spdf.data TextTokenizer). max_len: the
    row length, i.e. the model's block size + 1. Items are {"input_ids", "labels"} LongTensors of equal length.
    """

    def __init__(self, examples, tokenizer, max_len: int):
        self.max_len = int(max_len)
        self.rows: list[tuple[list[int], int]] = []
        for ex in examples:
            prompt_ids = tokenizer.encode(ex.prompt)
            for text in ex.targets():
                completion_ids = tokenizer.encode(join_target(ex.prompt, text)) + [tokenizer.eos_id]
                self.rows.append(truncate_pair(prompt_ids, completion_ids, self.max_len))
        if not self.rows:
            raise DataError("fine-tuning task has no examples for this split; check the task's source and split")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, n_prompt = self.rows[i]
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = input_ids.clone()
        labels[:n_prompt] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels}


def pad_collate(batch: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of FinetuneDataset items to the longest: {"input_ids", "labels", "attention_mask"} [B, T].

    Padding gets `pad_id` in input_ids (irrelevant for a causal model: it only follows the real tokens), -100 in
    labels and 0 in attention_mask. Use functools.partial(pad_collate, pad_id=...) to change the pad id.
    """
    longest = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"]
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
