"""Other libraries' ways to compute Y = X W^T with a masked weight, measured beside spdf's kernels (kernel_speed.py).

- ``torch.sparse`` (inside torch): W as CSR and as 64x64 BSR;
- ``torch-sparse`` (PyG's package, the optional ``[peers]`` extra): W as a ``torch_sparse.SparseTensor``.

This lives in benchmarks/, not in ``spdf.kernels``: the kernels may import only torch and triton, and torch-sparse
is a measured comparison, not a dependency. Each peer yields a zero-argument callable computing the product, or
None when it cannot run the case (package absent, dtype or device unsupported), so a missing peer is a null in the
results and one "skipped" line, never a crash.
"""
from __future__ import annotations

import warnings

import torch


def _import_torch_sparse():
    try:
        import torch_sparse
    except (ImportError, OSError) as e:  # OSError: a compiled extension built against another torch
        return None, (f"skipped: torch-sparse not installed ({type(e).__name__}: {e}); the [peers] extra "
                      "builds it from source, see benchmarks/README.md")
    return torch_sparse, None


torch_sparse, TORCH_SPARSE_SKIP = _import_torch_sparse()


class TorchSparseLinear:
    """Y = X W^T with the masked W held as a ``torch_sparse.SparseTensor`` (CSR inside), built once like a packed
    weight. SparseTensor multiplies only sparse @ dense, so the product is taken as (W X^T)^T."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor):
        if torch_sparse is None:
            raise RuntimeError(TORCH_SPARSE_SKIP)
        row, col = mask.nonzero(as_tuple=True)  # the mask's own pattern: a kept weight that happens to be 0 stays
        self.weight = torch_sparse.SparseTensor(row=row, col=col, value=weight[row, col],
                                                sparse_sizes=tuple(weight.shape), is_sorted=True)

    @property
    def nnz(self) -> int:
        return self.weight.nnz()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight @ x.t().contiguous()).t()


def torch_sparse_fn(weight, mask, x):
    """Zero-argument callable for ``X W^T`` through torch-sparse, or None when it is absent or cannot run this case."""
    if torch_sparse is None:
        return None
    try:  # building on a device the extension was not compiled for already fails (e.g. a CPU-only build on CUDA)
        lin = TorchSparseLinear(weight, mask)
    except (RuntimeError, NotImplementedError, ValueError):
        return None
    return _runs(lambda: lin(x))


def torch_builtin_sparse_fns(weight, mask, x):
    """``{"csr": fn, "bsr": fn}`` for ``X W^T`` via torch.sparse (64x64 blocks for BSR), each None if unsupported.

    X^T is made contiguous once, outside the timed call, as torch.sparse @ dense wants it."""
    ws = (weight * mask).contiguous()
    xt = x.t().contiguous()
    warnings.filterwarnings("ignore", message="Sparse .* support is in beta")
    fns = {}
    for name, convert in (("csr", lambda t: t.to_sparse_csr()), ("bsr", lambda t: t.to_sparse_bsr((64, 64)))):
        try:
            sp = convert(ws)
        except (RuntimeError, NotImplementedError, ValueError):
            fns[name] = None
            continue
        fns[name] = _runs(lambda sp=sp: (sp @ xt).t())
    return fns


def _runs(fn):
    """``fn`` if one call succeeds, else None: an unsupported dtype/layout/device is recorded as null, not raised."""
    try:
        fn()
    except (RuntimeError, NotImplementedError, ValueError):
        return None
    return fn


def peer_fns(weight, mask, x):
    """Every peer's callable for this case, keyed by its column name in the results."""
    return {**torch_builtin_sparse_fns(weight, mask, x), "torch_sparse": torch_sparse_fn(weight, mask, x)}
