"""The autograd op ``tiled_linear`` against dense ``F.linear`` with the masked weight."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from spdf.kernels.ops import triton_interpreted
from spdf.kernels import pack, reference, tiled_linear, unpack

IMPLS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_interpreted(), reason="needs triton imported with TRITON_INTERPRET=1"))]


def _setup(make_mask, dtype=torch.float32, sparsity=0.75, pattern="unstructured", shape=(40, 56), tile=(16, 16)):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    mask = make_mask(shape, sparsity, pattern, block=tile[0])
    layout, values = pack(weight, mask, tile)
    return weight * mask, mask, layout, values


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sparsity,pattern", [(0.75, "unstructured"), (0.5, "block"), (1.0, "unstructured")])
def test_matches_dense_linear(impl, dtype, bias, sparsity, pattern, make_mask):
    dense_w, mask, layout, values = _setup(make_mask, dtype, sparsity, pattern)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 11, 56, generator=g).to(dtype)
    b = torch.randn(40, generator=g).to(dtype) if bias else None
    gy = torch.randn(3, 11, 40, generator=g).to(dtype)

    xs, vs = x.clone().requires_grad_(), values.clone().requires_grad_()
    bs = b.clone().requires_grad_() if bias else None
    y = tiled_linear(xs, vs, layout, bs, impl=impl)
    y.backward(gy)

    # dense oracle in fp32 on the same (rounded) inputs
    xd, wd = x.float().requires_grad_(), dense_w.float().requires_grad_()
    bd = b.float().requires_grad_() if bias else None
    yd = F.linear(xd, wd, bd)
    yd.backward(gy.float())

    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    assert y.dtype == dtype and y.shape == (3, 11, 40)
    torch.testing.assert_close(y.float(), yd, **tol)
    torch.testing.assert_close(xs.grad.float(), xd.grad, **tol)
    assert vs.grad.shape == values.shape and vs.grad.dtype == dtype
    torch.testing.assert_close(vs.grad.float(), pack(wd.grad, mask, layout.tile)[1], **tol)
    if bias:
        torch.testing.assert_close(bs.grad.float(), bd.grad, **tol)


def test_gradcheck_reference_float64(make_mask):
    _, _, layout, values = _setup(make_mask, torch.float64, shape=(9, 13), tile=(4, 8))
    x = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    values.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, v, b: tiled_linear(x, v, layout, b), (x, values, b))


def test_auto_on_cpu_uses_reference(make_mask):
    _, _, layout, values = _setup(make_mask)
    x = torch.randn(7, 56)
    assert torch.equal(tiled_linear(x, values, layout), reference.spmm(x, values, layout))


def test_flop_counter_counts_sparse_flops(make_mask):
    _, _, layout, values = _setup(make_mask, sparsity=0.75)
    x = torch.randn(2, 9, 56, requires_grad=True)
    values.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        tiled_linear(x, values, layout).sum().backward()
    per_product = 2 * 18 * layout.nnz
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counts == {"spdf.tiled_linear": per_product, "spdf.tiled_spmm_t": per_product,
                      "spdf.tiled_sddmm": per_product}
    assert counter.get_total_flops() == 3 * per_product


def test_autocast_casts_to_autocast_dtype(make_mask):
    _, _, layout, values = _setup(make_mask)
    values.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = tiled_linear(torch.randn(4, 56), values, layout)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert values.grad.dtype == torch.float32  # the fp32 master values get fp32 grads


def test_torch_compile_fullgraph(make_mask):
    dense_w, _, layout, values = _setup(make_mask)
    values.requires_grad_()
    fn = torch.compile(lambda x, v: tiled_linear(x, v, layout).relu().sum(), fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 56)
    fn(x, values).backward()
    expected = F.linear(x, unpack(layout, values.detach()).requires_grad_()).relu().sum()
    torch.testing.assert_close(fn(x, values), expected)
    assert values.grad is not None and values.grad.shape == values.shape


def test_rejects_wrong_feature_count(make_mask):
    _, _, layout, values = _setup(make_mask)
    with pytest.raises(ValueError, match="features"):
        tiled_linear(torch.randn(3, 55), values, layout)
    with pytest.raises(ValueError, match="impl"):
        tiled_linear(torch.randn(3, 56), values, layout, impl="cuda")
