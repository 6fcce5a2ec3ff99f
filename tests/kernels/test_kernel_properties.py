"""Every Triton product against its pure-PyTorch reference over drawn shapes that are not tile multiples, tiles,
block sizes, token counts, sparsities and dtypes, on CPU through the Triton interpreter (tiny shapes: it is slow).
test_triton_kernels.py and test_block_backend.py pin a few fixed cases; these draw the rest."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spdf.kernels import pack, reference, sddmm, spmm, spmm_t
from spdf.kernels.block import block_linear
from spdf.kernels.ops import triton_interpreted

pytestmark = pytest.mark.skipif(not triton_interpreted(), reason="needs triton imported with TRITON_INTERPRET=1")

# fp32: the same sums in another order (fp32 accumulation both ways). bf16 operands, fp32 accumulation, one bf16
# rounding of the result: 2**-8 relative, a little more where terms cancel.
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


@settings(max_examples=20, deadline=None)
@given(shape=st.tuples(st.integers(1, 70), st.integers(1, 70)),
       tile=st.tuples(st.sampled_from([16, 32]), st.sampled_from([16, 32, 64])), tokens=st.integers(1, 140),
       sparsity=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1), dtype=DTYPES)
def test_tile_kernels_match_the_reference(shape, tile, tokens, sparsity, seed, dtype):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) >= sparsity
    g = torch.Generator().manual_seed(seed + 1)
    layout, values = pack(torch.randn(shape, generator=g).to(dtype), mask, tile)
    x, dy = torch.randn(tokens, shape[1], generator=g).to(dtype), torch.randn(tokens, shape[0], generator=g).to(dtype)
    bias = torch.randn(shape[0], generator=g).to(dtype)
    vf = values.float()
    for actual, expected in ((spmm(x, values, layout, bias, impl="triton"),
                              reference.spmm(x.float(), vf, layout, bias.float())),
                             (spmm_t(dy, values, layout, impl="triton"), reference.spmm_t(dy.float(), vf, layout)),
                             (sddmm(dy, x, layout, impl="triton"), reference.sddmm(dy.float(), x.float(), layout))):
        assert actual.dtype == dtype
        torch.testing.assert_close(actual.float(), expected, **TOLERANCE[dtype])


@settings(max_examples=12, deadline=None)
@given(block=st.sampled_from([16, 32, 64]), grid=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       tokens=st.integers(1, 140), sparsity=st.floats(0.0, 0.9), seed=st.integers(0, 2**31 - 1), dtype=DTYPES)
def test_block_kernels_match_the_reference_for_every_block_size(block, grid, tokens, sparsity, seed, dtype):
    # Blocks of 16 and 32 are narrower than every launch configuration's sub-block: the kernels read past each block
    # (garbage, silently) until the configurations were cut down to the block
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(grid, generator=g) >= sparsity
    blocks[0, 0] = True
    mask = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)
    shape = tuple(mask.shape)
    layout, values = pack(torch.randn(shape, generator=g).to(dtype), mask, (block, block))
    x = torch.randn(tokens, shape[1], generator=g).to(dtype).requires_grad_()
    bias = torch.randn(shape[0], generator=g).to(dtype).requires_grad_()
    dy = torch.randn(tokens, shape[0], generator=g).to(dtype)
    results = {}
    for impl in ("block", "reference"):
        leaves = (x.detach().clone().requires_grad_(), values.clone().requires_grad_(),
                  bias.detach().clone().requires_grad_())
        y = block_linear(leaves[0], leaves[1], layout, leaves[2], dict.fromkeys(("fwd", "dx", "dw"), impl))
        y.backward(dy)
        results[impl] = [y.detach(), *(leaf.grad for leaf in leaves)]
    for actual, expected in zip(results["block"], results["reference"]):
        torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCE[dtype])
