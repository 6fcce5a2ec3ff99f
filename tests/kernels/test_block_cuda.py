"""On a GPU: every implementation of the block backend's three products (spdf's compiled block kernels, its tile
kernels, torch's BSR kernels, stanford-stk) against the reference (training steps: tests/sparsity/
test_block_backend.py). Skipped without CUDA; benchmarks/gpu_check.sh runs them."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from spdf.kernels import pack
from spdf.kernels.block import product

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
IMPLS = ["block", "tiles", "bsr",
         pytest.param("stk", marks=pytest.mark.skipif(importlib.util.find_spec("stk") is None,
                                                      reason="stanford-stk is not installed"))]


def _operands(block, shape, tokens, dtype):
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(shape[0] // block, shape[1] // block, generator=g) >= 0.75
    blocks[0, 0] = True
    mask = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)
    layout, values = pack(torch.randn(shape, generator=g).to(dtype), mask, (block, block))
    layout, values = layout.to("cuda"), values.cuda()
    x = torch.randn(tokens, shape[1], generator=g).to("cuda", dtype)
    dy = torch.randn(tokens, shape[0], generator=g).to("cuda", dtype)
    bias = torch.randn(shape[0], generator=g).to("cuda", dtype)
    return layout, values, x, dy, bias


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_each_product_matches_the_reference(impl, block, dtype):
    if impl == "stk" and block != 128:
        pytest.skip("stanford-stk computes 128x128 blocks only")
    layout, values, x, dy, bias = _operands(block, (1024, 512), 300, dtype)
    for which, args in (("fwd", (x, values, layout, bias)), ("dx", (dy, values, layout)), ("dw", (dy, x, layout))):
        got = product(which, impl)(*args)
        want = product(which, "reference")(*args)
        assert got.shape == want.shape, which
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=0.5, msg=f"{impl} {which}")
