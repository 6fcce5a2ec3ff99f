"""Pure-PyTorch implementations of the three tiled sparse products (the CPU training path and the test oracle).

They are "unpack, then dense": scattering ``values`` into a dense weight costs O(N*K) memory traffic per call,
small next to the O(tokens*N*K) GEMM, and lets the CPU use its optimised dense GEMM (torch's CPU CSR matmul is
slower than dense at 75% sparsity). Temporaries per call: one dense ``(N, K)`` weight (spmm, spmm_t) or one dense
``(N, K)`` fp32 gradient (sddmm) -- the same size the masked backend keeps permanently, freed right after the call.
All products accumulate in fp32 for bf16/fp16 inputs (CPU GEMMs do) and return the input dtype.
"""
from __future__ import annotations

import torch

from .layout import TiledLayout, gather_values, unpack


def spmm(x: torch.Tensor, values: torch.Tensor, layout: TiledLayout, bias: torch.Tensor | None = None):
    """``Y = X W^T (+ bias)`` for 2-D ``x`` of shape ``(tokens, K)``; returns ``(tokens, N)``."""
    w = unpack(layout, values.to(x.dtype))
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def spmm_t(dy: torch.Tensor, values: torch.Tensor, layout: TiledLayout) -> torch.Tensor:
    """``dX = dY W`` for ``dy`` of shape ``(tokens, N)``; returns ``(tokens, K)``."""
    return dy @ unpack(layout, values.to(dy.dtype))


def sddmm(dy: torch.Tensor, x: torch.Tensor, layout: TiledLayout) -> torch.Tensor:
    """``(dY^T X)`` sampled at the layout's non-zeros, shaped and ordered like ``values``, in ``x``'s dtype."""
    dw = dy.float().t() @ x.float()  # full dense fp32 temporary, freed on return
    return gather_values(layout, dw).to(x.dtype)
