"""On a GPU: every implementation of the block backend's three products (spdf's compiled block kernels, its tile
kernels, torch's BSR kernels, stanford-stk) against the reference, and a block-backend training step. Skipped
without CUDA; benchmarks/gpu_check.sh runs them."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import spdf
from spdf.kernels import pack
from spdf.kernels.block import product
from spdf.sparsity import Block
from spdf.sparsity.block import set_block_products

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


@pytest.mark.parametrize("impl", IMPLS)
def test_a_block_backend_training_step_matches_the_masked_backend(impl):
    losses = {}
    previous = set_block_products(fwd=impl, dx=impl, dw=impl)
    try:
        for backend in ("masked", "block"):
            torch.manual_seed(0)
            with torch.device("cuda"):
                model = spdf.GPT(spdf.GPTConfig(name="t", n_layer=2, n_head=4, d_model=256, d_ff=1024, n_ctx=64,
                                                vocab_size=128))
            sp = spdf.sparsify(model, 0.75, init=Block(128), backend=backend)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            sp.attach(opt)
            idx = torch.randint(0, 128, (4, 65), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
            out = []
            for _ in range(3):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    _, loss = model(idx[:, :-1], idx[:, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad()
                out.append(loss.item())
            losses[backend] = out
    finally:
        set_block_products(**previous)
    torch.testing.assert_close(losses["block"], losses["masked"], rtol=2e-2, atol=2e-2)
