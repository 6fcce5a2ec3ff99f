"""Learning-rate schedules: linear warm-up, then cosine, linear or constant decay to min_lr_ratio · peak."""
from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based) of `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown LR decay {decay!r}; allowed: cosine, linear, constant")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape
