"""Run the Triton kernels on CPU through the Triton interpreter.

TRITON_INTERPRET is read when triton decorates its own and our ``@triton.jit`` functions, i.e. when triton is first
imported. If another test module imported triton earlier (torch.compile, spdf.kernels via spdf), the interpreter
cannot be switched on any more and the Triton tests skip with that reason: set TRITON_INTERPRET=1 in the
environment or at the top of the root tests/conftest.py to be safe.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


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
