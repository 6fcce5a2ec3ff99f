"""What every family's forward does around its blocks: turn the decoding arguments (a KV cache, an attention mask
over left-padded rows, position ids) into positions and an attention mask, and shape the result (logits with the
loss, or with the cache).

Training calls `model(idx, targets)`: no mask (plain causal attention), positions 0..T-1, a loss ignoring -100.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def decoding_inputs(idx: torch.Tensor, targets: torch.Tensor | None, kv_cache, attention_mask: torch.Tensor | None,
                    positions: torch.Tensor | None, n_ctx: int) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """(past, positions, mask) for a forward of `idx` (B, T) after `kv_cache.length` cached positions.

    positions default to counting from each row's first real token (left padding) or from the cache length; the mask
    is None on the plain causal path (nothing cached, no padding)."""
    B, T = idx.shape
    past = kv_cache.length if kv_cache is not None else 0
    if kv_cache is not None and targets is not None:
        raise ValueError("pass either targets (training) or kv_cache (decoding), not both")
    if positions is None:
        if attention_mask is not None:  # left padding: a row's first real token is position 0
            positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, past:]
        else:
            if past + T > n_ctx:
                raise ValueError(f"sequence of {past + T} tokens is longer than the model's context ({n_ctx})")
            positions = torch.arange(past, past + T, device=idx.device)
    mask = None if past == 0 and attention_mask is None else decoding_mask(attention_mask, B, past, T, idx.device)
    return past, positions, mask


def decoding_mask(attention_mask: torch.Tensor | None, B: int, past: int, T: int,
                  device: torch.device) -> torch.Tensor:
    """(B, 1, T, past + T) bool: new token t sees key j if j is not after it and j is a real token. A padding
    position also sees itself: a query with no key at all would give NaN, which would reach real tokens."""
    S = past + T
    query_at = torch.arange(past, S, device=device)[:, None]
    key_at = torch.arange(S, device=device)[None, :]
    causal = key_at <= query_at
    if attention_mask is None:
        return causal.expand(B, 1, T, S)
    real = attention_mask.bool()[:, None, None, :]
    return causal & (real | (key_at == query_at))


def lm_result(logits: torch.Tensor, targets: torch.Tensor | None, kv_cache):
    """(logits, kv_cache) when decoding, else (logits, mean cross-entropy over targets that are not -100, or None)."""
    if kv_cache is not None:
        return logits, kv_cache
    if targets is None:
        return logits, None
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
    return logits, loss
