"""What every decoding mode shares: left-padded rows, the model call of a step, n-gram bans, stop sequences."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class Rows:
    """Sequences being decoded, one per row: left-padded prompt in the first `prompt_width` columns, then the
    generated tokens. Rows leave (and, in beam search, follow their parent beams) through `select`."""

    tokens: torch.Tensor  # (R, prompt_width + max_new_tokens) long
    pad: torch.Tensor  # (R,) left-padding columns of each row
    limit: torch.Tensor  # (R,) new tokens a row may have: max_new_tokens, fewer where the context would overflow
    ids: torch.Tensor  # (R,) the row's place in the batch it started in
    prompt_width: int

    @classmethod
    def left_padded(cls, prompts: list[list[int]], max_new_tokens: int, n_ctx: int, device) -> "Rows":
        width = max(len(p) for p in prompts)
        tokens = torch.zeros(len(prompts), width + max_new_tokens, dtype=torch.long)
        for r, p in enumerate(prompts):
            tokens[r, width - len(p):width] = torch.tensor(p)
        lengths = torch.tensor([len(p) for p in prompts])
        # A sequence of n_ctx tokens still predicts one more; that last token is never fed back.
        limit = (n_ctx + 1 - lengths).clamp(max=max_new_tokens)
        return cls(tokens.to(device), (width - lengths).to(device), limit.to(device),
                   torch.arange(len(prompts), device=device), width)

    def mask(self, length: int) -> torch.Tensor:
        """(R, length) attention mask: False on left padding."""
        return torch.arange(length, device=self.tokens.device)[None, :] >= self.pad[:, None]

    def select(self, index: torch.Tensor) -> None:
        self.tokens, self.pad = self.tokens.index_select(0, index), self.pad.index_select(0, index)
        self.limit, self.ids = self.limit.index_select(0, index), self.ids.index_select(0, index)


class Runner:
    """The model call of each step: next-token logits for every row, from a KV cache or from the whole sequence."""

    def __init__(self, model: nn.Module, rows: Rows, use_cache: bool):
        self.model = model
        # The last generated token is never fed back, hence the - 1.
        self.cache = model.new_kv_cache(rows.tokens.size(1) - 1) if use_cache else None
        self.padded = bool((rows.pad > 0).any())

    def next_logits(self, rows: Rows, length: int) -> torch.Tensor:
        """Logits (R, V) after the first `length` columns of `rows.tokens`, in float32."""
        mask = rows.mask(length) if self.padded else None
        if self.cache is None or self.cache.length == 0:  # no cache, or the prompt's first pass
            logits, _ = self.model(rows.tokens[:, :length], kv_cache=self.cache, attention_mask=mask,
                                   last_logits_only=True)
        else:
            logits, _ = self.model(rows.tokens[:, length - 1:length], kv_cache=self.cache,
                                   attention_mask=mask if mask is not None else rows.mask(length),
                                   last_logits_only=True)
        return logits[:, -1].float()

    def select(self, index: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.select(index)


def ban_repeated_ngrams(scores: torch.Tensor, seq: torch.Tensor, pad: torch.Tensor, n: int) -> None:
    """Set to -inf, in place, the score of every token that would complete an n-gram already in `seq` (R, L).

    transformers' NoRepeatNGramLogitsProcessor, vectorised, with left padding excluded from the n-grams."""
    L = seq.size(1)
    if L < n:
        return
    windows = seq.unfold(1, n, 1)  # (R, L - n + 1, n): every n-gram so far
    prefix = seq[:, L - n + 1:]  # the last n - 1 tokens: a window starting with them must not be completed again
    starts = torch.arange(windows.size(1), device=seq.device)
    repeat = (windows[:, :, :-1] == prefix[:, None, :]).all(-1) & (starts[None, :] >= pad[:, None])
    repeat &= (L - n + 1 >= pad)[:, None]  # the prefix itself lies in the real tokens
    counts = torch.zeros_like(scores).scatter_add_(1, windows[:, :, -1], repeat.to(scores.dtype))
    scores.masked_fill_(counts > 0, float("-inf"))


def stop_hits(generated: torch.Tensor, token: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """Bool (R,): appending `token` (R,) to the `generated` tokens (R, t) ends them with `stop` (m,)."""
    m, t = stop.numel(), generated.size(1)
    if t + 1 < m:
        return torch.zeros_like(token, dtype=torch.bool)
    hit = token == stop[-1]
    if m > 1:
        hit &= (generated[:, t - m + 1:] == stop[:-1]).all(-1)
    return hit
