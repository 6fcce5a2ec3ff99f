"""BlockSparseLinear: the "block" backend -- whole B x B blocks kept or dropped, only kept blocks computed.

It is the compressed backend's storage (spdf.kernels' tiled format, only non-zeros stored and trained, the same
state-dict form) with tile (B, B) and a mask made of whole blocks: every stored tile is full, so its values are a BSR
matrix and the products are plain GEMMs over the kept blocks (spdf/kernels/block.py). Masks of any other pattern are
refused: a block layer would store them and compute their zeros, slower than the masked backend and silently not
what "block" promises.

Which implementation computes each product (fwd, dX, dW) is selectable, because the fastest on a GPU is a
measurement: `set_block_products(fwd=..., dx=..., dw=...)` or SPDF_BLOCK_PRODUCTS="fwd=bsr,dx=block,dw=block"
(names in spdf.kernels.block.IMPLS; "auto": the exact reference products on CPU, spdf's block kernels on CUDA).
"""
from __future__ import annotations

import os

import torch

from spdf.kernels.block import IMPLS, PRODUCTS, block_linear

from .compressed import CompressedSparseLinear, stored_layout

BLOCK_SIZES = (64, 128)


def _products_from_env() -> dict[str, str]:
    chosen = dict.fromkeys(PRODUCTS, "auto")
    for item in filter(None, os.environ.get("SPDF_BLOCK_PRODUCTS", "").split(",")):
        key, _, value = item.partition("=")
        chosen.update(_checked({key.strip(): value.strip()}))
    return chosen


def _checked(products: dict[str, str]) -> dict[str, str]:
    for key, value in products.items():
        if key not in PRODUCTS or value not in ("auto", *IMPLS):
            raise ValueError(f"block products: {key}={value} is not one of {', '.join(PRODUCTS)} = auto, "
                             f"{', '.join(IMPLS)}")
    return products


def set_block_products(**products: str) -> dict[str, str]:
    """Choose the implementation of each product for every block layer (fwd, dx, dw); returns the previous choice."""
    previous = dict(BlockSparseLinear.products)
    BlockSparseLinear.products = {**previous, **_checked(products)}
    return previous


def block_problem(mask: torch.Tensor, block: tuple[int, int]) -> str | None:
    """Why `mask` ((out, in) bool) is not made of whole `block` tiles, or None."""
    rows, cols = block
    n, k = mask.shape
    if rows != cols:
        return f"blocks must be square, got {block}"
    if n % rows or k % cols:
        return f"block size {rows} does not divide the weight's shape {(n, k)}"
    counts = mask.reshape(n // rows, rows, k // cols, cols).sum(dim=(1, 3))
    if not bool(((counts == 0) | (counts == rows * cols)).all()):
        return (f"the mask is not made of whole {rows}x{cols} blocks (use sparsity.method 'block' with block_size "
                f"{' or '.join(map(str, BLOCK_SIZES))}, or backend 'masked')")
    if not bool(counts.any()):  # a layer with no weight at all: nothing to train, and its empty tensors do not save
        return (f"the mask keeps none of the weight's {counts.numel()} blocks (the level rounds to all of them): "
                f"lower sparsity.level, use smaller blocks, or leave this layer dense with sparsity.filter")
    return None


class BlockSparseLinear(CompressedSparseLinear):
    backend = "block"
    mask_patterns = {"block": {"block_size": BLOCK_SIZES}}
    products: dict[str, str] = _products_from_env()

    def __init__(self, weight, mask, bias=None, tile=(64, 64), transposed=False, dense_shell=None,
                 target_sparsity=None):
        problem = block_problem(mask, tuple(tile))
        if problem:
            raise ValueError(f"backend 'block' computes whole blocks: {problem}")
        super().__init__(weight, mask, bias, tile=tile, transposed=transposed, dense_shell=dense_shell,
                         target_sparsity=target_sparsity)

    @classmethod
    def build_problem(cls, mask: torch.Tensor, tile: tuple[int, int]) -> str | None:
        problem = block_problem(mask, tile)
        return f"backend 'block' computes whole blocks: {problem}" if problem else None

    @classmethod
    def tile_for(cls, method_settings: dict, tile: tuple[int, int]) -> tuple[int, int]:
        size = method_settings.get("block_size")
        return (size, size) if size else tile

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor, optimizers=()) -> torch.Tensor:
        problem = block_problem(mask, self.tile)
        if problem:
            raise ValueError(f"backend 'block' computes whole blocks: {problem}")
        return super().set_mask(mask, optimizers)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A state dict brings its own layout (the compressed form: a compressed layer's, of any mask). One not made of
        # whole blocks is refused as sparsify() and set_mask() refuse it, before anything of this layer changes: the
        # block products read every stored tile as a full block. Like a size mismatch it goes to error_msgs, which
        # load_state_dict raises, strict or not.
        layout = stored_layout(state_dict, prefix)
        problem = None if layout is None else block_problem(layout.mask(), layout.tile)
        if problem:
            error_msgs.append(f"{prefix}values: backend 'block' computes whole blocks: {problem}; this state dict "
                              f"holds another pattern: load it into a model sparsified with backend 'compressed'")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_linear(x, self.values, self.layout, self.bias, self.products)
