"""The peers measured in benchmarks/kernel_speed.py compute the product they are timed for: Y = X W^T of the masked W.

The torch-sparse tests run only where the optional `[peers]` extra is installed; CI installs `[dev]`, which does not
include it (a source build of about 20 minutes), so there they are skipped with the import error as the reason.
"""
import importlib.util
from pathlib import Path

import pytest
import torch


def _load_peers():
    # benchmarks/ is a folder of scripts, not a package: load its peers.py by path instead of putting the folder on
    # sys.path for every test module.
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "peers.py"
    spec = importlib.util.spec_from_file_location("spdf_benchmark_peers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peers = _load_peers()
needs_torch_sparse = pytest.mark.skipif(peers.torch_sparse is None, reason=str(peers.TORCH_SPARSE_SKIP))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _case(shape, tokens, sparsity, make_mask, device):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    x = torch.randn(tokens, shape[1], generator=g)
    mask = make_mask(shape, sparsity, "unstructured")
    return w.to(device), mask.to(device), x.to(device)


def _assert_product(y, w, mask, x):
    expected = x @ (w * mask).t()
    assert y.shape == expected.shape
    # fp32 sums of up to 300 terms in another order: relative to the largest output
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@needs_torch_sparse
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("shape,tokens", [((200, 136), 37), ((77, 300), 1), ((130, 65), 129)])
def test_torch_sparse_linear_is_the_masked_dense_product(shape, tokens, sparsity, device, make_mask):
    w, mask, x = _case(shape, tokens, sparsity, make_mask, device)
    lin = peers.TorchSparseLinear(w, mask)
    assert lin.nnz == int(mask.sum())  # stored sparse: only the mask's entries, not a dense matrix in disguise
    _assert_product(lin(x), w, mask, x)
    _assert_product(peers.peer_fns(w, mask, x)["torch_sparse"](), w, mask, x)  # the callable the benchmark times


def test_without_torch_sparse_its_column_is_null_and_the_other_peers_still_run(monkeypatch, make_mask):
    monkeypatch.setattr(peers, "torch_sparse", None)
    monkeypatch.setattr(peers, "TORCH_SPARSE_SKIP", "skipped: torch-sparse not installed (test)")
    w, mask, x = _case((128, 192), 33, 0.75, make_mask, "cpu")
    fns = peers.peer_fns(w, mask, x)
    assert fns["torch_sparse"] is None
    with pytest.raises(RuntimeError, match="torch-sparse not installed"):
        peers.TorchSparseLinear(w, mask)
    _assert_product(fns["csr"](), w, mask, x)
    _assert_product(fns["bsr"](), w, mask, x)  # 128 x 192: whole 64x64 blocks, which torch's BSR requires


class _Unsupported:
    """Stands in for a torch-sparse build that cannot run a case (e.g. compiled without CUDA)."""

    def __init__(self, *args, fail_at_build):
        if fail_at_build:
            raise RuntimeError("Not compiled with CUDA support")

    def __call__(self, x):
        raise RuntimeError("spmm: unsupported dtype")


@pytest.mark.parametrize("fail_at_build", [True, False])
def test_a_case_torch_sparse_cannot_run_is_null_not_an_error(fail_at_build, monkeypatch, make_mask):
    monkeypatch.setattr(peers, "torch_sparse", object())  # installed, whether or not it is here
    monkeypatch.setattr(peers, "TorchSparseLinear", lambda w, m: _Unsupported(w, m, fail_at_build=fail_at_build))
    w, mask, x = _case((64, 64), 5, 0.5, make_mask, "cpu")
    assert peers.torch_sparse_fn(w, mask, x) is None
