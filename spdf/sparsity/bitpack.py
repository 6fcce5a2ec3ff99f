"""Boolean masks ⇄ packed bits (8 mask entries per byte) for compact checkpoints."""
from __future__ import annotations

import torch

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.detach().flatten().cpu().to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    return (flat.view(-1, 8) * _BITS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    if packed.numel() * 8 < numel or packed.dtype != torch.uint8:
        raise ValueError(f"packed mask of {packed.numel()} bytes cannot hold a mask of shape {tuple(shape)}")
    bits = (packed.cpu().view(-1, 1) & _BITS).ne(0).flatten()
    return bits[:numel].view(*shape)
