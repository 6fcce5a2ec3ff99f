"""The tiled compressed sparse format shared by every kernel in ``spdf.kernels``.

A weight ``W`` of shape ``(N, K)`` (``nn.Linear`` orientation: out x in) is cut into tiles of
``TILE_N x TILE_K`` (default 64 x 64; ``N`` and ``K`` need not be multiples, edge tiles are partial).
Only *non-empty* tiles are stored, numbered ``t = 0 .. T-1`` in tile-row-major order. The non-zero values live in
ONE contiguous vector ``values`` (the trainable parameter), tile-major, and row-major inside a tile.

Index tensors (all ``int32`` except ``offsets``):

``bitmap``      ``(T, TILE_N, WPR)``: bit ``k % 32`` of word ``k // 32`` in row ``n`` of tile ``t`` is set iff element
                ``(n, k)`` of the tile is a non-zero. ``WPR = ceil(TILE_K / 32)`` words per tile row.
``word_offsets`` ``(T, TILE_N, WPR)``: number of non-zeros of tile ``t`` before word ``(n, w)`` in row-major order
                (exclusive prefix count over the tile's bitmap words).
``offsets``     ``(T + 1,)`` int64: start of tile ``t`` in ``values``; ``offsets[T] == nnz``.
``row_ptr``     ``(n_tile_rows + 1,)`` and ``col_idx`` ``(T,)``: CSR over tiles. The tiles of tile-row ``r`` are
                ``t = row_ptr[r] .. row_ptr[r+1]-1`` and tile ``t`` sits in tile-column ``col_idx[t]``. Used by
                ``Y = X W^T`` (spmm), one program per (token block, tile-row).
``col_ptr``     ``(n_tile_cols + 1,)``, ``row_idx`` ``(T,)``, ``t_perm`` ``(T,)``: the transposed (CSC) index. Entry
                ``j`` of tile-column ``c`` (``col_ptr[c] <= j < col_ptr[c+1]``) is tile ``t_perm[j]``, in tile-row
                ``row_idx[j]``. Used by ``dX = dY W`` (spmm_t).

Finding a non-zero's place in ``values`` needs no scan: for element ``(n, k)`` of tile ``t`` with word
``b = bitmap[t, n, k // 32]`` the index is ``offsets[t] + word_offsets[t, n, k // 32] + popcount(b & ((1 << k % 32) - 1))``
-- a few integer ops per element, all lanes independent (a SWAR popcount: no cross-thread cumsum, and it runs
under the Triton interpreter too). The index overhead is ``TILE_N * WPR * 8`` bytes per non-empty tile (1 KiB for a
64 x 64 tile, 0.25 bytes per weight slot) plus the tile-level indices, so a 75%-sparse fp32 layer stores about
1.06 bytes per weight slot instead of 4.

The layout holds only index tensors plus Python ints (shape, tile, nnz); ``values`` travel separately so that a
module can make them an ``nn.Parameter`` and register each index tensor as a buffer (see ``TiledLayout.tensors``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FIELDS = ("bitmap", "word_offsets", "offsets", "row_ptr", "col_idx", "col_ptr", "row_idx", "t_perm")


@dataclass(frozen=True)
class TiledLayout:
    bitmap: torch.Tensor
    word_offsets: torch.Tensor
    offsets: torch.Tensor
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    col_ptr: torch.Tensor
    row_idx: torch.Tensor
    t_perm: torch.Tensor
    shape: tuple[int, int]
    tile: tuple[int, int]
    nnz: int

    # ---- derived sizes --------------------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        """(number of tile-rows, number of tile-columns)."""
        return math.ceil(self.shape[0] / self.tile[0]), math.ceil(self.shape[1] / self.tile[1])

    @property
    def n_nonempty_tiles(self) -> int:
        return self.col_idx.numel()

    @property
    def density(self) -> float:
        n = self.shape[0] * self.shape[1]
        return self.nnz / n if n else 0.0

    @property
    def device(self) -> torch.device:
        return self.bitmap.device

    # ---- tensors in and out ---------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Index tensors by name, in a fixed order (register each as a buffer)."""
        return {name: getattr(self, name) for name in FIELDS}

    @classmethod
    def from_tensors(cls, tensors, shape, tile, nnz: int | None = None) -> "TiledLayout":
        """Rebuild a layout from ``tensors()`` (a dict, or a sequence in ``FIELDS`` order). Pass ``nnz`` (e.g.
        ``values.numel()``) to avoid reading ``offsets[-1]`` back from the device."""
        if not isinstance(tensors, dict):
            tensors = dict(zip(FIELDS, tensors))
        nnz = int(tensors["offsets"][-1]) if nnz is None else int(nnz)
        return cls(**{n: tensors[n] for n in FIELDS}, shape=tuple(int(s) for s in shape),
                   tile=tuple(int(s) for s in tile), nnz=nnz)

    def to(self, device) -> "TiledLayout":
        return TiledLayout(**{n: t.to(device) for n, t in self.tensors().items()},
                           shape=self.shape, tile=self.tile, nnz=self.nnz)

    # ---- dense views ----------------------------------------------------------------------------------------
    def tile_mask(self) -> torch.Tensor:
        """``(T, TILE_N, TILE_K)`` bool: the non-zero pattern of every stored tile."""
        shifts = torch.arange(32, device=self.device, dtype=torch.int32)
        bits = (self.bitmap.unsqueeze(-1) >> shifts) & 1  # (T, TN, WPR, 32)
        return bits.flatten(-2)[..., : self.tile[1]].bool()

    def tile_coords(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tile-row, tile-column) of every stored tile, int64."""
        # output_size: the count is known on the host, so on CUDA no device sync is needed (the block products call
        # this every backward)
        rows = torch.repeat_interleave(torch.arange(self.grid[0], device=self.device), self.row_ptr.diff().long(),
                                       output_size=self.n_nonempty_tiles)
        return rows, self.col_idx.long()

    def slot_mask(self) -> torch.Tensor:
        """``(n_tile_rows, n_tile_cols, TILE_N, TILE_K)`` bool over every tile slot, empty tiles included. Its
        row-major order is the order of ``values`` (empty slots hold no bits), so boolean indexing and
        ``masked_scatter`` with it move ``values`` in and out of a tiled dense tensor in one pass."""
        (gr, gc), (tn, tk) = self.grid, self.tile
        slots = torch.zeros(gr * gc, tn, tk, dtype=torch.bool, device=self.device)
        rows, cols = self.tile_coords()
        slots.index_copy_(0, rows * gc + cols, self.tile_mask())
        return slots.view(gr, gc, tn, tk)

    def mask(self) -> torch.Tensor:
        """Dense ``(N, K)`` bool mask of the non-zeros."""
        return untile(self, self.slot_mask())


def untile(layout: TiledLayout, tiled: torch.Tensor) -> torch.Tensor:
    """``(gr, gc, TN, TK)`` -> dense ``(N, K)`` (drops the edge padding), contiguous in a storage of its own size:
    a cropped view would carry the padding's memory along and its strides into optimizers (fused AdamW)."""
    (n, k), (tn, tk), (gr, gc) = layout.shape, layout.tile, layout.grid
    dense = tiled.permute(0, 2, 1, 3).reshape(gr * tn, gc * tk)
    return dense if (n, k) == (gr * tn, gc * tk) else dense[:n, :k].clone(memory_format=torch.contiguous_format)


def tiled_view(layout: TiledLayout, dense: torch.Tensor) -> torch.Tensor:
    """Dense ``(N, K)`` -> zero-padded ``(gr, gc, TN, TK)`` view of its tiles."""
    (n, k), (tn, tk), (gr, gc) = layout.shape, layout.tile, layout.grid
    padded = torch.nn.functional.pad(dense, (0, gc * tk - k, 0, gr * tn - n))
    return padded.view(gr, tn, gc, tk).permute(0, 2, 1, 3)


def gather_values(layout: TiledLayout, dense: torch.Tensor) -> torch.Tensor:
    """The entries of a dense ``(N, K)`` tensor at the layout's non-zeros, in ``values`` order."""
    return tiled_view(layout, dense)[layout.slot_mask()]


def _check_tile(tile) -> tuple[int, int]:
    tile = tuple(int(t) for t in tile)
    if len(tile) != 2 or min(tile) < 1:
        raise ValueError(f"tile must be two positive ints (TILE_N, TILE_K), got {tile}")
    return tile


def pack(weight: torch.Tensor, mask: torch.Tensor, tile=(64, 64)) -> tuple[TiledLayout, torch.Tensor]:
    """Compress ``weight`` at the True entries of ``mask`` into ``(layout, values)``.

    ``values`` has ``weight``'s dtype and device and holds exactly ``weight[mask]`` in tile-major order. A masked
    entry whose weight value is 0.0 is still stored (the mask, not the value, defines the pattern).
    """
    if weight.dim() != 2 or mask.shape != weight.shape:
        raise ValueError(f"pack needs a 2-D weight and a mask of the same shape, got {tuple(weight.shape)} and "
                         f"{tuple(mask.shape)}")
    tn, tk = _check_tile(tile)
    n, k = weight.shape
    gr, gc = math.ceil(n / tn), math.ceil(k / tk)
    dev = weight.device
    mask = mask.to(device=dev, dtype=torch.bool)
    padded = torch.nn.functional.pad(mask, (0, gc * tk - k, 0, gr * tn - n))
    all_tiles = padded.view(gr, tn, gc, tk).permute(0, 2, 1, 3)  # (gr, gc, tn, tk)
    nonempty = all_tiles.any(-1).any(-1)  # (gr, gc)
    rows, cols = nonempty.nonzero(as_tuple=True)  # row-major: CSR order
    tmask = all_tiles[rows, cols]  # (T, tn, tk)
    T = rows.numel()

    wpr = math.ceil(tk / 32)
    bits = torch.nn.functional.pad(tmask, (0, wpr * 32 - tk)).view(T, tn, wpr, 32).to(torch.int64)
    words = (bits << torch.arange(32, device=dev)).sum(-1)  # < 2**32, fits int64
    bitmap = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    word_counts = bits.sum(-1).view(T, tn * wpr)  # (T, tn * wpr), row-major words
    word_offsets = (word_counts.cumsum(-1) - word_counts).view(T, tn, wpr).to(torch.int32)
    tile_counts = word_counts.sum(-1)
    offsets = torch.zeros(T + 1, dtype=torch.int64, device=dev)
    offsets[1:] = tile_counts.cumsum(0)

    row_ptr = torch.zeros(gr + 1, dtype=torch.int32, device=dev)
    row_ptr[1:] = nonempty.sum(1).cumsum(0)
    t_perm = torch.argsort(cols * gr + rows)  # stable order: by tile-column, then tile-row
    col_ptr = torch.zeros(gc + 1, dtype=torch.int32, device=dev)
    col_ptr[1:] = nonempty.sum(0).cumsum(0)

    layout = TiledLayout(bitmap=bitmap.contiguous(), word_offsets=word_offsets.contiguous(), offsets=offsets,
                         row_ptr=row_ptr, col_idx=cols.to(torch.int32), col_ptr=col_ptr,
                         row_idx=rows[t_perm].to(torch.int32), t_perm=t_perm.to(torch.int32),
                         shape=(n, k), tile=(tn, tk), nnz=int(offsets[-1]))
    values = gather_values(layout, weight.detach()).contiguous()
    return layout, values


def unpack(layout: TiledLayout, values: torch.Tensor) -> torch.Tensor:
    """Dense ``(N, K)`` weight with ``values`` at the layout's non-zeros and zeros elsewhere (differentiable)."""
    if values.shape != (layout.nnz,):
        raise ValueError(f"values must have shape ({layout.nnz},) for this layout, got {tuple(values.shape)}")
    slots = layout.slot_mask()
    tiled = torch.zeros(slots.shape, dtype=values.dtype, device=values.device).masked_scatter(slots, values)
    return untile(layout, tiled)
