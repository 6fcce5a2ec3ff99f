"""The three products of a block-sparse linear layer, each with interchangeable implementations, and its autograd op.

The weight is a TiledLayout with tile (B, B) whose stored tiles are all full blocks (see block_kernels.py), so
``values.view(nnzb, B, B)`` with the layout's ``row_ptr``/``col_idx`` is a BSR matrix. Which implementation is fastest
on a GPU is a measurement (benchmarks/kernel_speed.py), so each product is chosen by name:

    reference  unpack, then dense (exact; the CPU path and the test oracle)        fwd, dx, dw
    block      spdf's block kernels (block_kernels.py, autotuned; the interpreter on CPU)  fwd, dx, dw
    tiles      spdf's general tile kernels (triton_kernels.py: bitmaps, any mask)          fwd, dx, dw
    bsr        torch.sparse BSR Triton kernels (bsr_dense_mm, sampled_addmm; CUDA)         fwd, dx, dw
    stk        MegaBlocks' stanford-stk (dds / sdd; CUDA, fp16/bf16, blocks of 128)        fwd, dx, dw

``block_linear(x, values, layout, bias, products)`` takes {"fwd": name, "dx": name, "dw": name}; "auto" is
"reference" off CUDA and, on CUDA, the default below until a GPU measurement picks another.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from . import reference
from .layout import TiledLayout

IMPLS = ("reference", "block", "tiles", "bsr", "stk")
PRODUCTS = ("fwd", "dx", "dw")
CUDA_DEFAULT = "block"  # unmeasured on a GPU so far: benchmarks/kernel_speed.py decides


def resolve(name: str, device: torch.device) -> str:
    if name == "auto":
        return CUDA_DEFAULT if device.type == "cuda" else "reference"
    if name not in IMPLS:
        raise ValueError(f"block product implementation must be one of auto, {', '.join(IMPLS)}; got {name!r}")
    return name


# ---- torch.sparse BSR ------------------------------------------------------------------------------------------
def _bsr(values: torch.Tensor, layout: TiledLayout, transposed: bool = False) -> torch.Tensor:
    b = layout.tile[0]
    blocks = values.view(-1, b, b)
    if not transposed:
        return torch.sparse_bsr_tensor(layout.row_ptr.long(), layout.col_idx.long(), blocks, size=layout.shape)
    n, k = layout.shape
    return torch.sparse_bsr_tensor(layout.col_ptr.long(), layout.row_idx.long(),
                                   blocks[layout.t_perm.long()].transpose(1, 2).contiguous(), size=(k, n))


def _triton_ops():
    from torch.sparse import _triton_ops

    if _triton_ops.bsr_dense_mm is None:
        raise RuntimeError("torch's BSR Triton kernels need CUDA and triton")
    return _triton_ops


def _bsr_times(bsr: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``rows @ bsr^T`` for (tokens, K) `rows`, through bsr_dense_mm (which wants tokens divisible by 16: padded)."""
    tokens = rows.shape[0]
    pad = -tokens % 16
    if pad:
        rows = torch.nn.functional.pad(rows, (0, 0, 0, pad))
    return _triton_ops().bsr_dense_mm(bsr, rows.t()).t()[:tokens]


def bsr_fwd(x, values, layout, bias=None):
    y = _bsr_times(_bsr(values, layout), x)
    return y if bias is None else y + bias


def bsr_dx(dy, values, layout):
    return _bsr_times(_bsr(values, layout, transposed=True), dy)


def bsr_dw(dy, x, layout):
    pattern = _bsr(torch.zeros(layout.nnz, dtype=x.dtype, device=x.device), layout)
    return _triton_ops().sampled_addmm(pattern, dy.t(), x, beta=0.0, alpha=1.0).values().reshape(-1)


def tune_bsr(x: torch.Tensor, values: torch.Tensor, layout: TiledLayout) -> None:
    """Tune torch's BSR kernel launch parameters for this device and shape (kept in torch's in-memory table, so
    later bsr products in this process use them): the forward's and dX's shapes."""
    from torch.sparse._triton_ops_meta import tune_bsr_dense_addmm

    for bsr, dense in ((_bsr(values, layout), x.t()),
                       (_bsr(values, layout, transposed=True),
                        torch.zeros(x.shape[0], layout.shape[0], dtype=x.dtype, device=x.device).t())):
        out = torch.empty(bsr.shape[0], dense.shape[1], dtype=x.dtype, device=x.device)
        tune_bsr_dense_addmm(out, bsr, dense.contiguous(), beta=0, alpha=1, store=True)


# ---- stanford-stk (MegaBlocks) ------------------------------------------------------------------------------------
def _stk_matrix(values: torch.Tensor, layout: TiledLayout):
    try:
        import stk
    except ImportError as e:
        raise RuntimeError("the stk block product needs the stanford-stk package (pip install 'spdf[gpu]')") from e
    b = layout.tile[0]
    rows = layout.tile_coords()[0].to(torch.int16)
    return stk.Matrix(layout.shape, values.view(-1, b, b), rows, layout.col_idx.to(torch.int16),
                      layout.row_ptr.to(torch.int32), layout.row_idx.to(torch.int16), layout.col_ptr.to(torch.int32),
                      layout.t_perm.to(torch.int32))


def stk_fwd(x, values, layout, bias=None):
    import stk

    y = stk.ops.dds(x, _stk_matrix(values, layout).t())
    return y if bias is None else y + bias


def stk_dx(dy, values, layout):
    import stk

    return stk.ops.dds(dy, _stk_matrix(values, layout))


def stk_dw(dy, x, layout):
    import stk

    topo = _stk_matrix(torch.empty(layout.nnz, dtype=x.dtype, device=x.device), layout)
    return stk.ops.sdd(dy.t(), x, topo).data.reshape(-1)


# ---- dispatch ------------------------------------------------------------------------------------------------------
def kernels(name: str) -> SimpleNamespace:
    """spmm, spmm_t and sddmm of implementation `name` (the interface ops.py dispatches to)."""
    if name == "reference":
        return SimpleNamespace(spmm=reference.spmm, spmm_t=reference.spmm_t, sddmm=reference.sddmm)
    if name == "block":
        from . import block_kernels as bk

        return SimpleNamespace(spmm=bk.spmm, spmm_t=bk.spmm_t, sddmm=bk.sddmm)
    if name == "tiles":
        from . import triton_kernels as tk

        return SimpleNamespace(spmm=tk.spmm, spmm_t=tk.spmm_t, sddmm=tk.sddmm)
    if name == "bsr":
        return SimpleNamespace(spmm=bsr_fwd, spmm_t=bsr_dx, sddmm=bsr_dw)
    return SimpleNamespace(spmm=stk_fwd, spmm_t=stk_dx, sddmm=stk_dw)


def product(which: str, name: str):
    """The function computing product `which` ("fwd", "dx" or "dw") with implementation `name`."""
    return getattr(kernels(name), ("spmm", "spmm_t", "sddmm")[PRODUCTS.index(which)])


def block_linear(x: torch.Tensor, values: torch.Tensor, layout: TiledLayout, bias: torch.Tensor | None = None,
                 products: dict[str, str] | None = None) -> torch.Tensor:
    """``y = x W^T + bias`` computing only the kept blocks in all three products; differentiable in x, values, bias.
    The autograd op is ops.tiled_linear's (autocast, torch.compile and FLOP counting as for the compressed backend),
    with one implementation per product."""
    from .ops import tiled_linear

    impls = [resolve((products or {}).get(p, "auto"), x.device) for p in PRODUCTS]
    return tiled_linear(x, values, layout, bias, impl=":".join("triton" if i == "tiles" else i for i in impls))
