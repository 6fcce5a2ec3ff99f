"""Fixtures of the kernel tests.

Triton's CPU interpreter (TRITON_INTERPRET=1) is chosen in the root tests/conftest.py, before triton is first
imported; the Triton-on-CPU tests skip with that reason where it could not be switched on.
"""
import pytest
import torch


def _mask(shape, sparsity, pattern, block=16, seed=0):
    """Bool mask with about ``sparsity`` zeros: ``unstructured`` (exact count) or ``block`` (block x block blocks
    aligned to the tile grid, each kept with probability 1 - sparsity)."""
    g = torch.Generator().manual_seed(seed)
    n, k = shape
    if pattern == "unstructured":
        keep = round((1 - sparsity) * n * k)
        mask = torch.zeros(n * k, dtype=torch.bool)
        mask[torch.randperm(n * k, generator=g)[:keep]] = True
        return mask.view(n, k)
    gr, gc = -(-n // block), -(-k // block)
    blocks = torch.rand(gr, gc, generator=g) >= sparsity
    return blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k].contiguous()


@pytest.fixture
def make_mask():
    return _mask
