"""Sparse kernels for SPDF: a tiled compressed format, Triton kernels and their pure-PyTorch references.

- ``pack(weight, mask, tile) -> (layout, values)``, ``unpack(layout, values) -> dense`` (``layout.py``)
- ``spmm`` (Y = X W^T + b), ``spmm_t`` (dX = dY W), ``sddmm`` (dW at the mask) with ``impl="auto"|"triton"|"reference"``
- ``tiled_linear(x, values, layout, bias)``: the autograd op (``torch.ops.spdf.tiled_linear``)
- ``spdf.kernels.reference``: the pure-PyTorch products (the CPU path)

Imports only torch (and triton when it is installed: ``HAS_TRITON``).
"""
from . import reference
from .layout import TiledLayout, pack, unpack
from .ops import HAS_TRITON, sddmm, spmm, spmm_t, tiled_linear

__all__ = ["TiledLayout", "pack", "unpack", "tiled_linear", "spmm", "spmm_t", "sddmm", "HAS_TRITON", "reference"]
