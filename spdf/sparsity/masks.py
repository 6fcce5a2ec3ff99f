"""Mask makers, the functions behind the mask-method objects of methods.py.

Each mask is a pure function of (seed, parameter name, shape[, weight]).

Masks are made on the CPU from a generator seeded by a stable hash of (seed, name), so every data-parallel rank and
every resumed run builds the same mask without communication. Shapes are in nn.Linear orientation (out, in); the
caller transposes for layers that store their weight the other way round (Hugging Face's Conv1D).
"""
from __future__ import annotations

import hashlib
import math
from typing import Mapping, Sequence

import torch

def check_sparsity(sparsity: float, name: str) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity of {name!r} must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def generator_for(seed: int, name: str) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, name): Python's hash() is salted per process."""
    digest = hashlib.sha256(f"spdf-mask/{seed}/{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def n_zeros(numel: int, sparsity: float) -> int:
    """The exact number of zeros a tensor of `numel` entries gets at `sparsity` (round half to even)."""
    return round(sparsity * numel)


def _keep_indices_mask(numel: int, keep: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[keep] = True
    return mask


def random_mask(shape: Sequence[int], sparsity: float, seed: int, name: str) -> torch.Tensor:
    """The paper's mask: exactly round(s·n) zeros at uniformly random positions."""
    sparsity = check_sparsity(sparsity, name)
    numel = math.prod(shape)
    keep = torch.randperm(numel, generator=generator_for(seed, name))[: numel - n_zeros(numel, sparsity)]
    return _keep_indices_mask(numel, keep).view(*shape)


def magnitude_mask(weight: torch.Tensor, sparsity: float, name: str) -> torch.Tensor:
    """Keep the (1-s)·n entries of largest |w| (ties broken by position, so the count is exact)."""
    sparsity = check_sparsity(sparsity, name)
    if weight is None:
        raise ValueError(f"magnitude masks need the weight of {name!r}")
    flat = weight.detach().float().abs().flatten().cpu()
    keep = torch.topk(flat, flat.numel() - n_zeros(flat.numel(), sparsity), sorted=False).indices
    return _keep_indices_mask(flat.numel(), keep).view(weight.shape)


def nm_mask(shape: Sequence[int], n: int, m: int, seed: int, name: str) -> torch.Tensor:
    """N:M along the input dimension: in every group of m consecutive inputs of a row, n are kept at random."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"N:M sparsity of {name!r} needs integers 0 < n < m, got n={n!r}, m={m!r}")
    out_f, in_f = shape
    if in_f % m:
        raise ValueError(f"N:M sparsity of {name!r}: input dimension {in_f} is not divisible by m={m}")
    scores = torch.rand(out_f, in_f // m, m, generator=generator_for(seed, name))
    keep = scores.topk(n, dim=-1).indices
    mask = torch.zeros(out_f, in_f // m, m, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.view(out_f, in_f)


def block_mask(shape: Sequence[int], sparsity: float, block: int, seed: int, name: str) -> torch.Tensor:
    """Random block×block tiles kept or dropped whole: exactly round(s·#blocks) blocks are zero."""
    sparsity = check_sparsity(sparsity, name)
    out_f, in_f = shape
    if not isinstance(block, int) or block < 1 or out_f % block or in_f % block:
        raise ValueError(f"block sparsity of {name!r}: block size {block!r} must divide the shape {tuple(shape)}")
    rows, cols = out_f // block, in_f // block
    blocks = random_mask((rows, cols), sparsity, seed, name)
    return blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)


def erk_sparsities(shapes: Mapping[str, Sequence[int]], sparsity: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel allocation (Evci et al., RigL) of a global sparsity over layers.

    A layer's density is proportional to (n_in + n_out) / (n_in · n_out); layers whose density would exceed 1 are made
    dense and the rest re-balanced, so the total number of kept weights is (1 - s) · total.
    """
    check_sparsity(sparsity, "erk (global)")
    numel = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = (1.0 - sparsity) * sum(numel.values()) - sum(numel[k] for k in dense)
        scale = budget / sum(raw[k] * numel[k] for k in shapes if k not in dense)
        over = {k for k in shapes if k not in dense and raw[k] * scale > 1.0}
        if not over:
            break
        dense |= over
    return {k: 0.0 if k in dense else min(max(1.0 - raw[k] * scale, 0.0), 0.999999) for k in shapes}
