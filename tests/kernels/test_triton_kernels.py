"""Every Triton kernel against its pure-PyTorch reference, on CPU through the Triton interpreter.

Small tiles (16x16, plus one 32x64 case with two bitmap words per row) on shapes that are not tile multiples.
"""
import pytest
import torch

from spdf.kernels.ops import triton_interpreted
from spdf.kernels import pack, reference, sddmm, spmm, spmm_t

pytestmark = pytest.mark.skipif(not triton_interpreted(),
                                reason="needs triton imported with TRITON_INTERPRET=1")

SHAPE = (40, 56)  # (out, in): 2.5 x 3.5 tiles of 16x16
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _case(shape, tile, sparsity, pattern, dtype, tokens, make_mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = make_mask(shape, sparsity, pattern, block=tile[0], seed=seed)
    layout, values = pack(torch.randn(shape, generator=g).to(dtype), mask, tile)
    x = torch.randn(tokens, shape[1], generator=g).to(dtype)
    dy = torch.randn(tokens, shape[0], generator=g).to(dtype)
    bias = torch.randn(shape[0], generator=g).to(dtype)
    return layout, values, x, dy, bias


def _close(actual, expected, dtype):
    """Triton vs an fp32 reference on the same (possibly bf16-rounded) inputs."""
    assert actual.dtype == dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["unstructured", "block"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("tokens", [1, 17, 130])
def test_three_products_match_reference(tokens, sparsity, pattern, dtype, make_mask):
    layout, values, x, dy, bias = _case(SHAPE, (16, 16), sparsity, pattern, dtype, tokens, make_mask)
    vf = values.float()
    _close(spmm(x, values, layout, bias, impl="triton"), reference.spmm(x.float(), vf, layout, bias.float()), dtype)
    _close(spmm(x, values, layout, None, impl="triton"), reference.spmm(x.float(), vf, layout), dtype)
    _close(spmm_t(dy, values, layout, impl="triton"), reference.spmm_t(dy.float(), vf, layout), dtype)
    dv = sddmm(dy, x, layout, impl="triton")
    assert dv.shape == values.shape
    _close(dv, reference.sddmm(dy.float(), x.float(), layout), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_wide_tiles_two_bitmap_words(dtype, make_mask):
    """TILE_K = 64: two int32 words per tile row, including the sign bit."""
    layout, values, x, dy, bias = _case((45, 100), (32, 64), 0.5, "unstructured", dtype, 20, make_mask, seed=1)
    assert layout.bitmap.shape[-1] == 2
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.float16 else TOL[torch.float32]
    vf = values.float()
    torch.testing.assert_close(spmm(x, values, layout, bias, impl="triton").float(),
                               reference.spmm(x.float(), vf, layout, bias.float()), **tol)
    torch.testing.assert_close(spmm_t(dy, values, layout, impl="triton").float(),
                               reference.spmm_t(dy.float(), vf, layout), **tol)
    torch.testing.assert_close(sddmm(dy, x, layout, impl="triton").float(),
                               reference.sddmm(dy.float(), x.float(), layout), **tol)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_empty_layer_gives_bias_and_zeros(impl, dtype):
    """Sparsity 1.0 (no stored tile): Y is the bias alone, dX zeros, dW an empty values gradient."""
    layout, values = pack(torch.randn(SHAPE).to(dtype), torch.zeros(SHAPE, dtype=torch.bool), (16, 16))
    assert values.numel() == 0
    x, dy, bias = torch.randn(5, SHAPE[1]).to(dtype), torch.randn(5, SHAPE[0]).to(dtype), torch.randn(SHAPE[0]).to(dtype)
    assert torch.equal(spmm(x, values, layout, bias, impl=impl), bias.expand(5, SHAPE[0]))
    assert torch.equal(spmm(x, values, layout, None, impl=impl), torch.zeros(5, SHAPE[0], dtype=dtype))
    assert torch.equal(spmm_t(dy, values, layout, impl=impl), torch.zeros(5, SHAPE[1], dtype=dtype))
    dv = sddmm(dy, x, layout, impl=impl)
    assert dv.shape == (0,) and dv.dtype == dtype


def test_sddmm_token_split_is_summed(make_mask):
    """One stored tile and many tokens: the kernel splits tokens over programs and sums fp32 partials."""
    layout, values, x, dy, _ = _case((16, 16), (16, 16), 0.5, "unstructured", torch.float32, 600, make_mask)
    assert layout.n_nonempty_tiles == 1
    torch.testing.assert_close(sddmm(dy, x, layout, impl="triton"), reference.sddmm(dy, x, layout),
                               atol=1e-3, rtol=1e-4)


def test_non_contiguous_activations(make_mask):
    layout, values, x, dy, bias = _case(SHAPE, (16, 16), 0.5, "unstructured", torch.float32, 17, make_mask)
    xt = torch.randn(SHAPE[1], 17).t()  # strided view
    dyt = torch.randn(SHAPE[0], 17).t()
    torch.testing.assert_close(spmm(xt, values, layout, bias, impl="triton"),
                               reference.spmm(xt, values, layout, bias), **TOL[torch.float32])
    torch.testing.assert_close(spmm_t(dyt, values, layout, impl="triton"),
                               reference.spmm_t(dyt, values, layout), **TOL[torch.float32])
    torch.testing.assert_close(sddmm(dyt, xt, layout, impl="triton"),
                               reference.sddmm(dyt, xt, layout), **TOL[torch.float32])


def test_triton_path_rejects_unsupported(make_mask):
    layout, values = pack(torch.randn(20, 20), make_mask((20, 20), 0.5, "unstructured"), (8, 8))
    with pytest.raises(ValueError, match="power-of-two tiles"):
        spmm(torch.randn(3, 20), values, layout, impl="triton")
    layout, values = pack(torch.randn(20, 20), make_mask((20, 20), 0.5, "unstructured"), (16, 16))
    with pytest.raises(ValueError, match="one dtype"):
        spmm(torch.randn(3, 20, dtype=torch.bfloat16), values, layout, impl="triton")
