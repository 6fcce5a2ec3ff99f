"""Triton kernels for block-sparse weights: every stored tile is a full B x B block (the `block` backend).

The tiled format (layout.py) with tile (B, B) and a mask made of whole blocks stores each kept block's B*B values
contiguously, row-major, in tile-row-major order: ``values.view(nnzb, B, B)`` is a BSR matrix whose ``row_ptr`` and
``col_idx`` are the layout's. These kernels read that directly -- no bitmap, no popcount: a kept block is a dense
B x B operand of ``tl.dot``, so they are plain GEMM loops over the kept blocks only:

- ``spmm``   Y = X W^T (+ b): one program per (token block, output block-row, output sub-block), over the row's blocks
- ``spmm_t`` dX = dY W:       one program per (token block, input block-column, input sub-block), over the column's
             blocks (the layout's CSC index: ``col_ptr``, ``row_idx``, ``t_perm``)
- ``sddmm``  dW at the kept blocks: one program per (kept block, sub-tile), over all tokens

Launch parameters (token block, inner step, sub-block, warps, stages) are autotuned per shape on a GPU (Hopper wants
128-wide tiles and 3-4 stages; `benchmarks/kernel_speed.py` measures them); under the Triton interpreter one small
configuration runs, so the CPU tests check the arithmetic. Accumulation is fp32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .layout import TiledLayout

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


SUB_BLOCKS = ("BLOCK_N", "BLOCK_K", "BLOCK_J")  # the sizes inside one B x B block


def _cut(configs: list[triton.Config], b: int) -> list[triton.Config]:
    """`configs` with every sub-block size above `b` cut down to `b` (all are powers of two), duplicates dropped."""
    cut = {}
    for config in configs:
        sizes = {key: min(value, b) if key in SUB_BLOCKS else value for key, value in config.kwargs.items()}
        cut.setdefault((tuple(sorted(sizes.items())), config.num_warps, config.num_stages),
                       triton.Config(sizes, num_warps=config.num_warps, num_stages=config.num_stages))
    return list(cut.values())


def _configs(names: tuple[str, ...], choices: list[tuple[int, ...]]) -> list[triton.Config]:
    """Launch configurations to autotune over: (three tile sizes named by `names`, num_warps, num_stages) each. A
    short list, since every one is compiled on first use (~1-2 s each): GEMM-like tiles for Hopper/Ampere, 128-wide
    where the block allows, 3-4 pipeline stages. Under the interpreter, the smallest one only, and that one cut to
    16 for blocks narrower than it (two entries: triton prunes only a list of more than one)."""
    if INTERPRETED:
        smallest = min(choices, key=lambda c: c[:3])
        config = triton.Config(dict(zip(names, smallest[:3])), num_warps=4, num_stages=1)
        return [config, *_cut([config], 16)]
    return [triton.Config(dict(zip(names, c[:3])), num_warps=c[3], num_stages=c[4]) for c in choices]


# (BLOCK_M tokens, BLOCK_N output features, BLOCK_K inner step, warps, stages); BLOCK_N > B is pruned
MATMUL_CONFIGS = _configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), [
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 64, 32, 4, 4),
    (64, 64, 64, 4, 4)])
# (BLOCK_M token step, BLOCK_N block rows, BLOCK_J block columns, warps, stages)
SDDMM_CONFIGS = _configs(("BLOCK_M", "BLOCK_N", "BLOCK_J"), [
    (64, 128, 128, 8, 3), (32, 128, 128, 8, 4), (64, 128, 64, 4, 3), (64, 64, 64, 4, 3), (32, 64, 64, 4, 4)])


def _prune(configs, named_args, **kwargs):
    """Sub-blocks and inner steps must divide the block size (all are powers of two: at most B). A block narrower than
    every configuration (16 or 32: the smallest sub-blocks are 32 and 64) gets them cut down to B; a configuration
    wider than the block read past it, into the next block's values or beyond the tensor (garbage, silently). Under
    the interpreter the first that fits, so nothing is benchmarked."""
    b = named_args["B"] if "B" in named_args else kwargs["B"]
    kept = [c for c in configs if all(c.kwargs.get(key, 1) <= b for key in SUB_BLOCKS)] or _cut(configs, b)
    return kept[:1] if INTERPRETED else kept


PRUNE = {"early_config_prune": _prune}


@triton.autotune(configs=MATMUL_CONFIGS,
                 key=["M", "N", "K", "B"], prune_configs_by=PRUNE)
@triton.jit
def _spmm_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, row_ptr, col_idx, M, N, K, sxm, sxk, sym, syn,
                 HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, B: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, r, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # inside the block row
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start, end = tl.load(row_ptr + r), tl.load(row_ptr + r + 1)
    for t in range(start, end):
        c = tl.load(col_idx + t)
        for kk in range(0, B, BLOCK_K):
            x = tl.load(x_ptr + offs_m[:, None] * sxm + (c * B + kk + offs_k)[None, :] * sxk,
                        mask=offs_m[:, None] < M, other=0.0)
            w = tl.load(w_ptr + t * B * B + offs_n[:, None] * B + (kk + offs_k)[None, :])
            if UPCAST:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc)
    cols = r * B + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * sym + cols[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=offs_m[:, None] < M)


@triton.autotune(configs=MATMUL_CONFIGS,
                 key=["M", "N", "K", "B"], prune_configs_by=PRUNE)
@triton.jit
def _spmm_t_kernel(dy_ptr, w_ptr, dx_ptr, col_ptr, row_idx, t_perm, M, N, K, sdm, sdn, sxm, sxk,
                   UPCAST: tl.constexpr, B: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # BLOCK_N: sub-block of the input features this program writes; BLOCK_K: step over the block's output rows
    pid_m, c, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start, end = tl.load(col_ptr + c), tl.load(col_ptr + c + 1)
    for j in range(start, end):
        t, r = tl.load(t_perm + j), tl.load(row_idx + j)
        for kk in range(0, B, BLOCK_K):
            dy = tl.load(dy_ptr + offs_m[:, None] * sdm + (r * B + kk + offs_k)[None, :] * sdn,
                         mask=offs_m[:, None] < M, other=0.0)
            w = tl.load(w_ptr + t * B * B + (kk + offs_k)[:, None] * B + offs_n[None, :])
            if UPCAST:
                dy, w = dy.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(dy, w, acc)
    cols = c * B + offs_n
    tl.store(dx_ptr + offs_m[:, None] * sxm + cols[None, :] * sxk, acc.to(dx_ptr.dtype.element_ty),
             mask=offs_m[:, None] < M)


@triton.autotune(configs=SDDMM_CONFIGS,
                 key=["M", "N", "K", "B"], prune_configs_by=PRUNE)
@triton.jit
def _sddmm_kernel(dy_ptr, x_ptr, out_ptr, tile_row, col_idx, M, N, K, sdm, sdn, sxm, sxk,
                  UPCAST: tl.constexpr, B: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    t, pid_i, pid_j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r, c = tl.load(tile_row + t), tl.load(col_idx + t)
    offs_i = pid_i * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    acc = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        dy = tl.load(dy_ptr + offs_m[:, None] * sdm + (r * B + offs_i)[None, :] * sdn, mask=offs_m[:, None] < M,
                     other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * sxm + (c * B + offs_j)[None, :] * sxk, mask=offs_m[:, None] < M,
                    other=0.0)
        if UPCAST:
            dy, x = dy.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(tl.trans(dy), x, acc)
    tl.store(out_ptr + t * B * B + offs_i[:, None] * B + offs_j[None, :], acc.to(out_ptr.dtype.element_ty))


# ---- wrappers (2-D activations; `values` in the layout's order, one dtype for all operands) ---------------------
def _upcast(dtype: torch.dtype) -> bool:
    # the Triton interpreter computes bf16 tl.dot wrongly (triton_kernels.py says the same): fp32 there
    return dtype == torch.bfloat16 and INTERPRETED


def check_block_layout(layout: TiledLayout) -> int:
    b, b2 = layout.tile
    n, k = layout.shape
    if b != b2 or b < 16 or b & (b - 1) or n % b or k % b or layout.nnz != layout.n_nonempty_tiles * b * b:
        raise ValueError(f"the block kernels need square power-of-two blocks >= 16 that divide the shape and are "
                         f"all full, got tile {layout.tile}, shape {layout.shape}, {layout.nnz} values in "
                         f"{layout.n_nonempty_tiles} tiles")
    return b


def spmm(x: torch.Tensor, values: torch.Tensor, layout: TiledLayout, bias: torch.Tensor | None = None):
    b = check_block_layout(layout)
    (n, k), m = layout.shape, x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), n // b, b // meta["BLOCK_N"])  # noqa: E731
    _spmm_kernel[grid](x, values, bias if bias is not None else y, y, layout.row_ptr, layout.col_idx, m, n, k,
                       x.stride(0), x.stride(1), y.stride(0), y.stride(1), HAS_BIAS=bias is not None,
                       UPCAST=_upcast(x.dtype), B=b)
    return y


def spmm_t(dy: torch.Tensor, values: torch.Tensor, layout: TiledLayout) -> torch.Tensor:
    b = check_block_layout(layout)
    (n, k), m = layout.shape, dy.shape[0]
    dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
    if m == 0:
        return dx
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), k // b, b // meta["BLOCK_N"])  # noqa: E731
    _spmm_t_kernel[grid](dy, values, dx, layout.col_ptr, layout.row_idx, layout.t_perm, m, n, k,
                         dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1), UPCAST=_upcast(dy.dtype), B=b)
    return dx


def sddmm(dy: torch.Tensor, x: torch.Tensor, layout: TiledLayout) -> torch.Tensor:
    b = check_block_layout(layout)
    (n, k), m = layout.shape, x.shape[0]
    tiles = layout.n_nonempty_tiles
    out = torch.zeros(tiles * b * b, dtype=x.dtype, device=x.device)
    if tiles == 0:
        return out
    tile_row = layout.tile_coords()[0].to(torch.int32)
    grid = lambda meta: (tiles, b // meta["BLOCK_N"], b // meta["BLOCK_J"])  # noqa: E731
    _sddmm_kernel[grid](dy, x, out, tile_row, layout.col_idx, m, n, k, dy.stride(0), dy.stride(1), x.stride(0),
                        x.stride(1), UPCAST=_upcast(x.dtype), B=b)
    return out
