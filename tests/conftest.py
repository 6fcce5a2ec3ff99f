"""Shared fixtures: a seeded tiny GPT and token batches for it."""
import pytest
import torch

import spdf


@pytest.fixture
def make_gpt():
    """Build `tiny-test` (2 layers, width 32, vocab 128, ctx 64) with a fixed init seed."""

    def make(seed: int = 0, **overrides) -> spdf.GPT:
        torch.manual_seed(seed)
        return spdf.GPT.from_name("tiny-test", **overrides)

    return make


@pytest.fixture
def batch():
    """(idx, targets) of shape (2, 16) for `tiny-test`."""
    g = torch.Generator().manual_seed(1234)
    idx = torch.randint(0, 128, (2, 17), generator=g)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
