"""Triton kernels for the tiled sparse format: kernel -> launch-parameter choice -> Python wrapper.

"Load as sparse, compute as dense": every program expands a stored tile's non-zeros into a dense register tile
(bitmap words + popcounts give each non-zero's index in ``values``, see ``layout.py``) and feeds it to
``tl.dot`` so tensor cores do the multiply-adds. All-zero tiles are never visited. Accumulation is fp32.

Requirements of the Triton path: TILE_N and TILE_K are powers of two >= 16 (``tl.arange``/``tl.dot`` shapes),
``values`` and the activations share one dtype (fp32, bf16 or fp16). The wrappers take 2-D activations.
This module imports triton at import time; ``spdf.kernels`` guards that import.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import TiledLayout


@triton.jit
def _popcount(v):
    """Set bits of each uint32 (SWAR; no libdevice so it also runs in the interpreter)."""
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return (v * 0x01010101) >> 24


@triton.jit
def _tile_index(bitmap_ptr, word_off_ptr, offsets_ptr, t,
                TILE_N: tl.constexpr, TILE_K: tl.constexpr, WPR: tl.constexpr):
    """Index into ``values`` of every position of stored tile ``t`` and whether that position is a non-zero."""
    rn = tl.arange(0, TILE_N)
    rk = tl.arange(0, TILE_K)
    word = (t * TILE_N + rn[:, None]) * WPR + rk[None, :] // 32
    bits = tl.load(bitmap_ptr + word).to(tl.uint32, bitcast=True)
    shift = (rk % 32).to(tl.uint32)[None, :]
    below = bits & ((tl.full((1, TILE_K), 1, tl.uint32) << shift) - 1)  # bits to the left of k in its word
    idx = tl.load(offsets_ptr + t) + tl.load(word_off_ptr + word).to(tl.int64) + _popcount(below).to(tl.int64)
    return idx, ((bits >> shift) & 1) != 0


@triton.jit
def _spmm_kernel(x_ptr, values_ptr, bias_ptr, y_ptr,
                 bitmap_ptr, word_off_ptr, offsets_ptr, row_ptr_ptr, col_idx_ptr,
                 M, N, K, stride_xm, stride_xk, stride_ym, stride_yn,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr,
                 WPR: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    tr = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, TILE_K)
    acc = tl.zeros((BLOCK_M, TILE_N), dtype=tl.float32)
    start = tl.load(row_ptr_ptr + tr)
    end = tl.load(row_ptr_ptr + tr + 1)
    for t in range(start, end):
        cols = tl.load(col_idx_ptr + t) * TILE_K + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (cols[None, :] < K), other=0.0)
        idx, present = _tile_index(bitmap_ptr, word_off_ptr, offsets_ptr, t, TILE_N, TILE_K, WPR)
        w = tl.load(values_ptr + idx, mask=present, other=0.0)
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    rn = tr * TILE_N + tl.arange(0, TILE_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _spmm_t_kernel(dy_ptr, values_ptr, dx_ptr,
                   bitmap_ptr, word_off_ptr, offsets_ptr, col_ptr_ptr, row_idx_ptr, t_perm_ptr,
                   M, N, K, stride_dym, stride_dyn, stride_dxm, stride_dxk,
                   BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr,
                   WPR: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    tc = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, TILE_N)
    acc = tl.zeros((BLOCK_M, TILE_K), dtype=tl.float32)
    start = tl.load(col_ptr_ptr + tc)
    end = tl.load(col_ptr_ptr + tc + 1)
    for j in range(start, end):
        t = tl.load(t_perm_ptr + j)
        rows = tl.load(row_idx_ptr + j) * TILE_N + rn
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rows[None, :] * stride_dyn,
                     mask=(rm[:, None] < M) & (rows[None, :] < N), other=0.0)
        idx, present = _tile_index(bitmap_ptr, word_off_ptr, offsets_ptr, t, TILE_N, TILE_K, WPR)
        w = tl.load(values_ptr + idx, mask=present, other=0.0)
        if UPCAST:
            dy, w = dy.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    rk = tc * TILE_K + tl.arange(0, TILE_K)
    tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit
def _sddmm_kernel(dy_ptr, x_ptr, out_ptr,
                  bitmap_ptr, word_off_ptr, offsets_ptr, col_idx_ptr, row_idx_ptr, t_perm_ptr,
                  M, N, K, stride_dym, stride_dyn, stride_xm, stride_xk, stride_out_split,
                  chunks_per_split,
                  BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr,
                  WPR: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    j = tl.program_id(0)  # transposed order: neighbouring programs share a tile-column of X (L2 reuse)
    split = tl.program_id(1)
    t = tl.load(t_perm_ptr + j)
    rows = tl.load(row_idx_ptr + j) * TILE_N + tl.arange(0, TILE_N)
    cols = tl.load(col_idx_ptr + t) * TILE_K + tl.arange(0, TILE_K)
    acc = tl.zeros((TILE_N, TILE_K), dtype=tl.float32)
    m0 = split * chunks_per_split * BLOCK_M
    for c in range(0, chunks_per_split):
        rm = m0 + c * BLOCK_M + tl.arange(0, BLOCK_M)
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rows[None, :] * stride_dyn,
                     mask=(rm[:, None] < M) & (rows[None, :] < N), other=0.0)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (cols[None, :] < K), other=0.0)
        if UPCAST:
            dy, x = dy.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=PRECISION)
    idx, present = _tile_index(bitmap_ptr, word_off_ptr, offsets_ptr, t, TILE_N, TILE_K, WPR)
    tl.store(out_ptr + split * stride_out_split + idx, acc.to(out_ptr.dtype.element_ty), mask=present)


# ---- launch parameters ------------------------------------------------------------------------------------------
def block_m(tokens: int, dtype: torch.dtype) -> int:
    """Token block: as small as the token count allows (decode), up to 128 (64 for fp32, register pressure)."""
    cap = 64 if dtype == torch.float32 else 128
    return max(16, min(cap, triton.next_power_of_2(max(tokens, 1))))


def _num_warps(bm: int, tile) -> int:
    return 8 if bm * max(tile) >= 128 * 64 else 4


def _num_stages(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    major, _ = torch.cuda.get_device_capability(device)
    return 3 if major >= 8 else 2  # Ampere/Hopper have cp.async pipelining


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"  # match torch's fp32 matmul default
    return "tf32"  # ignored by tl.dot for 16-bit inputs


def _upcast(dtype: torch.dtype) -> bool:
    """The Triton interpreter (3.x) computes bf16 ``tl.dot`` wrongly (bf16 bits are read as integers), so
    interpreted runs upcast bf16 operands to fp32 right before the dot; compiled kernels never do."""
    return dtype == torch.bfloat16 and type(_spmm_kernel).__name__ == "InterpretedFunction"


def check_supported(layout: TiledLayout, *tensors: torch.Tensor) -> None:
    tn, tk = layout.tile
    for s in (tn, tk):
        if s < 16 or s & (s - 1):
            raise ValueError(f"the Triton path needs power-of-two tiles >= 16, got {layout.tile}")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.bfloat16, torch.float16}:
        raise ValueError(f"the Triton path needs one dtype among fp32/bf16/fp16, got {sorted(map(str, dtypes))}")


def _wpr(layout: TiledLayout) -> int:
    return layout.bitmap.shape[-1] if layout.bitmap.dim() == 3 else (layout.tile[1] + 31) // 32


# ---- wrappers -----------------------------------------------------------------------------------------------
def spmm(x: torch.Tensor, values: torch.Tensor, layout: TiledLayout, bias: torch.Tensor | None = None):
    check_supported(layout, x, values)
    (n, k), (tn, tk) = layout.shape, layout.tile
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    bm = block_m(m, x.dtype)
    grid = (triton.cdiv(m, bm), layout.grid[0])
    _spmm_kernel[grid](x, values, bias if bias is not None else y, y,
                       layout.bitmap, layout.word_offsets, layout.offsets, layout.row_ptr, layout.col_idx,
                       m, n, k, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                       HAS_BIAS=bias is not None, BLOCK_M=bm, TILE_N=tn, TILE_K=tk, WPR=_wpr(layout),
                       PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype), num_warps=_num_warps(bm, layout.tile),
                       num_stages=_num_stages(x.device))
    return y


def spmm_t(dy: torch.Tensor, values: torch.Tensor, layout: TiledLayout) -> torch.Tensor:
    check_supported(layout, dy, values)
    (n, k), (tn, tk) = layout.shape, layout.tile
    m = dy.shape[0]
    dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
    if m == 0:
        return dx
    bm = block_m(m, dy.dtype)
    grid = (triton.cdiv(m, bm), layout.grid[1])
    _spmm_t_kernel[grid](dy, values, dx,
                         layout.bitmap, layout.word_offsets, layout.offsets, layout.col_ptr, layout.row_idx,
                         layout.t_perm, m, n, k, dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
                         BLOCK_M=bm, TILE_N=tn, TILE_K=tk, WPR=_wpr(layout), PRECISION=_precision(dy.dtype), UPCAST=_upcast(dy.dtype),
                         num_warps=_num_warps(bm, layout.tile), num_stages=_num_stages(dy.device))
    return dx


def sddmm(dy: torch.Tensor, x: torch.Tensor, layout: TiledLayout) -> torch.Tensor:
    """Masked ``dY^T X`` straight into the ``values`` layout. Deterministic: when there are too few tiles to fill
    the GPU, tokens are split across programs that write separate fp32 partial rows, summed afterwards."""
    check_supported(layout, dy, x)
    (n, k), (tn, tk) = layout.shape, layout.tile
    m, T = x.shape[0], layout.n_nonempty_tiles
    if T == 0 or m == 0:
        return torch.zeros(layout.nnz, dtype=x.dtype, device=x.device)
    bm = 64 if m >= 64 else max(16, triton.next_power_of_2(m))
    chunks = triton.cdiv(m, bm)
    splits = max(1, min(chunks // 4, triton.cdiv(2 * _sm_count(x.device), T)))
    per_split = triton.cdiv(chunks, splits)
    splits = triton.cdiv(chunks, per_split)
    out = torch.empty(splits, layout.nnz, dtype=torch.float32 if splits > 1 else x.dtype, device=x.device)
    _sddmm_kernel[(T, splits)](dy, x, out,
                               layout.bitmap, layout.word_offsets, layout.offsets, layout.col_idx, layout.row_idx,
                               layout.t_perm, m, n, k, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
                               out.stride(0), per_split,
                               BLOCK_M=bm, TILE_N=tn, TILE_K=tk, WPR=_wpr(layout), PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype),
                               num_warps=_num_warps(bm, layout.tile), num_stages=_num_stages(x.device))
    return out[0] if splits == 1 else out.sum(0).to(x.dtype)
