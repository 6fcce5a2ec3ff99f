"""Dispatch (Triton on CUDA, reference on CPU) and the autograd op ``tiled_linear``.

``tiled_linear`` is a ``torch.library.custom_op`` (``spdf::tiled_linear``) with fake kernels and a registered
autograd formula whose backward calls two more custom ops (``spdf::tiled_spmm_t``, ``spdf::tiled_sddmm``), so the
whole thing traces under ``torch.compile`` and ``FlopCounterMode`` counts sparse FLOPs (2 * tokens * nnz per product).
The layout crosses the op boundary as its list of index tensors plus ints (shape, tile, nnz).

``impl``: ``"auto"`` = Triton for CUDA tensors when triton is importable and the tile is supported, else the
reference; ``"triton"`` forces Triton (on CPU tensors this needs ``TRITON_INTERPRET=1`` set before triton was
imported -- the tests do that); ``"reference"`` forces the pure-PyTorch path. The block-sparse products of
``block.py`` (``"block"``, ``"bsr"``, ``"stk"``) serve layouts made of full blocks, and ``tiled_linear`` takes one
implementation per product as ``"fwd:dx:dw"`` (e.g. ``"bsr:block:block"``): the block backend goes through these same
ops, so it traces under ``torch.compile`` and is counted at its sparse FLOPs too.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from . import reference
from .layout import TiledLayout

try:
    from . import triton_kernels as _tk

    HAS_TRITON = True
except ImportError:  # triton is optional: the reference path serves then
    _tk = None
    HAS_TRITON = False

IMPLS = ("auto", "triton", "reference")
BLOCK_IMPLS = ("block", "bsr", "stk")  # block.py's, for layouts of full blocks


def triton_interpreted() -> bool:
    """True when our kernels run under the Triton interpreter (CPU tensors allowed)."""
    return HAS_TRITON and type(_tk._spmm_kernel).__name__ == "InterpretedFunction"


def _backend(impl: str, layout: TiledLayout, device: torch.device):
    if impl in BLOCK_IMPLS:
        from .block import kernels

        return kernels(impl)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS + BLOCK_IMPLS}, got {impl!r}")
    if impl == "reference":
        return reference
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("impl='triton' but triton is not installed")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError("impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                               "before triton is first imported")
        return _tk
    tn, tk = layout.tile
    tile_ok = all(s >= 16 and s & (s - 1) == 0 for s in (tn, tk))
    return _tk if HAS_TRITON and device.type == "cuda" and tile_ok else reference


def spmm(x, values, layout: TiledLayout, bias=None, impl: str = "auto"):
    """``Y = X W^T (+ bias)``, x ``(tokens, K)`` -> ``(tokens, N)``. No autograd (see ``tiled_linear``)."""
    return _backend(impl, layout, x.device).spmm(x, values, layout, bias)


def spmm_t(dy, values, layout: TiledLayout, impl: str = "auto"):
    """``dX = dY W``, dy ``(tokens, N)`` -> ``(tokens, K)``."""
    return _backend(impl, layout, dy.device).spmm_t(dy, values, layout)


def sddmm(dy, x, layout: TiledLayout, impl: str = "auto"):
    """``dY^T X`` at the layout's non-zeros -> vector shaped like ``values``."""
    return _backend(impl, layout, x.device).sddmm(dy, x, layout)


# ---- custom ops ------------------------------------------------------------------------------------------------
def _part(impl: str, product: int) -> str:
    """The implementation of product 0 (forward), 1 (dX) or 2 (dW) in "fwd:dx:dw", or the one `impl` names."""
    return impl.split(":")[product] if ":" in impl else impl


def _layout(index, shape, tile, nnz) -> TiledLayout:
    return TiledLayout.from_tensors(list(index), shape, tile, nnz=nnz)


@torch.library.custom_op("spdf::tiled_linear", mutates_args=())
def _linear_op(x: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor], index: list[torch.Tensor],
               shape: list[int], tile: list[int], impl: str) -> torch.Tensor:
    return spmm(x, values, _layout(index, shape, tile, values.numel()), bias, _part(impl, 0))


@_linear_op.register_fake
def _(x, values, bias, index, shape, tile, impl):
    return x.new_empty(x.shape[0], shape[0])


@torch.library.custom_op("spdf::tiled_spmm_t", mutates_args=())
def _spmm_t_op(dy: torch.Tensor, values: torch.Tensor, index: list[torch.Tensor], shape: list[int],
               tile: list[int], impl: str) -> torch.Tensor:
    return spmm_t(dy, values, _layout(index, shape, tile, values.numel()), _part(impl, 1))


@_spmm_t_op.register_fake
def _(dy, values, index, shape, tile, impl):
    return dy.new_empty(dy.shape[0], shape[1])


@torch.library.custom_op("spdf::tiled_sddmm", mutates_args=())
def _sddmm_op(dy: torch.Tensor, x: torch.Tensor, index: list[torch.Tensor], shape: list[int], tile: list[int],
              nnz: int, impl: str) -> torch.Tensor:
    return sddmm(dy, x, _layout(index, shape, tile, nnz), _part(impl, 2))


@_sddmm_op.register_fake
def _(dy, x, index, shape, tile, nnz, impl):
    return x.new_empty(nnz)


def _setup_context(ctx, inputs, output):
    x, values, bias, index, shape, tile, impl = inputs
    ctx.save_for_backward(x, values, *index)
    ctx.meta = (list(shape), list(tile), impl, bias is not None)


def _backward(ctx, dy):
    x, values, *index = ctx.saved_tensors
    shape, tile, impl, has_bias = ctx.meta
    dy = dy.contiguous()
    dx = _spmm_t_op(dy, values, index, shape, tile, impl) if ctx.needs_input_grad[0] else None
    dv = _sddmm_op(dy, x, index, shape, tile, values.numel(), impl) if ctx.needs_input_grad[1] else None
    db = dy.sum(0) if has_bias and ctx.needs_input_grad[2] else None
    return dx, dv, db, [None] * len(index), None, None, None


_linear_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.spdf.tiled_linear)
def _linear_flops(x_shape, values_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape[:-1]) * values_shape[0]


@register_flop_formula(torch.ops.spdf.tiled_spmm_t)
def _spmm_t_flops(dy_shape, values_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(dy_shape[:-1]) * values_shape[0]


@register_flop_formula(torch.ops.spdf.tiled_sddmm)
def _sddmm_flops(dy_shape, x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape[:-1]) * out_shape[0]


def tiled_linear(x: torch.Tensor, values: torch.Tensor, layout: TiledLayout, bias: torch.Tensor | None = None,
                 impl: str = "auto") -> torch.Tensor:
    """``y = x W^T + bias`` with ``W = unpack(layout, values)``; differentiable in ``x``, ``values`` and ``bias``.

    ``x`` may have any leading dims. Under autocast, ``x``, ``values`` and ``bias`` are cast to the autocast dtype
    (the custom op itself is dtype-agnostic); otherwise ``values``/``bias`` are cast to ``x.dtype``.
    """
    if x.shape[-1] != layout.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the layout expects {layout.shape[1]}")
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    y = _linear_op(x2, values.to(dtype), None if bias is None else bias.to(dtype), list(layout.tensors().values()),
                   list(layout.shape), list(layout.tile), impl)
    return y.reshape(*lead, layout.shape[0])
