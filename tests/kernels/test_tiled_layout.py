"""pack/unpack of the tiled compressed format: exact round trips and the documented index invariants."""
import subprocess
import sys

import pytest
import torch

from spdf.kernels import TiledLayout, pack, unpack


def _tile_major_values(weight, mask, tile):
    """Definition of the value order, written the slow obvious way: tiles row-major, then row-major inside."""
    tn, tk = tile
    out = []
    for r0 in range(0, weight.shape[0], tn):
        for c0 in range(0, weight.shape[1], tk):
            w, m = weight[r0:r0 + tn, c0:c0 + tk], mask[r0:r0 + tn, c0:c0 + tk]
            out.append(w[m])
    return torch.cat(out) if out else weight.new_zeros(0)


@pytest.mark.parametrize("shape,tile", [((40, 56), (16, 16)), ((33, 17), (8, 24)), ((70, 130), (64, 64)),
                                        ((64, 128), (64, 64)), ((1, 1), (16, 16)), ((5, 3), (2, 1))])
@pytest.mark.parametrize("sparsity,pattern", [(0.0, "unstructured"), (0.5, "unstructured"), (0.9, "unstructured"),
                                              (1.0, "unstructured"), (0.5, "block")])
def test_round_trip_exact(shape, tile, sparsity, pattern, make_mask):
    weight = torch.randn(shape, dtype=torch.float64)
    mask = make_mask(shape, sparsity, pattern, block=tile[0])
    layout, values = pack(weight, mask, tile)
    assert values.dtype == weight.dtype and values.shape == (int(mask.sum()),)
    assert torch.equal(values, _tile_major_values(weight, mask, tile))
    assert torch.equal(unpack(layout, values), weight * mask)
    assert torch.equal(layout.mask(), mask)
    assert layout.nnz == int(mask.sum())
    assert layout.density == pytest.approx(mask.float().mean().item())
    n_tiles = sum(bool(mask[r:r + tile[0], c:c + tile[1]].any())
                  for r in range(0, shape[0], tile[0]) for c in range(0, shape[1], tile[1]))
    assert layout.n_nonempty_tiles == n_tiles


def test_all_zero_mask_stores_nothing():
    layout, values = pack(torch.randn(40, 56), torch.zeros(40, 56, dtype=torch.bool), (16, 16))
    assert values.numel() == 0 and layout.n_nonempty_tiles == 0 and layout.density == 0.0
    assert torch.equal(unpack(layout, values), torch.zeros(40, 56))
    assert layout.row_ptr.tolist() == [0, 0, 0, 0] and layout.col_ptr.tolist() == [0] * 5


def test_index_invariants(make_mask):
    """CSR and CSC views list the same tiles; offsets/word_offsets agree with the bitmap popcounts."""
    mask = make_mask((70, 130), 0.75, "block", block=16)
    mask[3, 5] = True  # a non-zero in an otherwise possibly empty tile
    layout, values = pack(torch.randn(70, 130), mask, (16, 32))
    rows, cols = layout.tile_coords()
    t = layout.t_perm.long()
    assert torch.equal(rows[t], layout.row_idx.long())
    assert torch.equal(torch.sort(cols[t]).values, cols[t])  # transposed order is by tile-column
    assert torch.equal(torch.sort(t).values, torch.arange(layout.n_nonempty_tiles))
    counts = layout.tile_mask().sum((-1, -2))
    assert torch.equal(layout.offsets[1:] - layout.offsets[:-1], counts)
    tmask = layout.tile_mask()
    flat = torch.nn.functional.pad(tmask, (0, 32 * layout.bitmap.shape[-1] - tmask.shape[-1]))
    word_counts = flat.view(len(tmask), -1, 32).sum(-1)
    expected = (word_counts.cumsum(-1) - word_counts).view_as(layout.word_offsets)
    assert torch.equal(layout.word_offsets.long(), expected)


def test_high_bit_of_bitmap_word():
    """Column 31 of a tile sets the sign bit of an int32 word; it must survive the round trip."""
    mask = torch.zeros(4, 64, dtype=torch.bool)
    mask[:, 31] = mask[:, 63] = mask[0, 0] = True
    weight = torch.randn(4, 64)
    layout, values = pack(weight, mask, (16, 64))
    assert (layout.bitmap < 0).any()
    assert torch.equal(unpack(layout, values), weight * mask)


def test_tensors_from_tensors_and_to(make_mask):
    weight, mask = torch.randn(40, 56), make_mask((40, 56), 0.5, "unstructured")
    layout, values = pack(weight, mask, (16, 16))
    names = list(layout.tensors())
    assert names == ["bitmap", "word_offsets", "offsets", "row_ptr", "col_idx", "col_ptr", "row_idx", "t_perm"]
    again = TiledLayout.from_tensors(layout.tensors(), layout.shape, layout.tile)
    moved = again.to("cpu")
    assert moved.nnz == layout.nnz and moved.shape == (40, 56) and moved.tile == (16, 16)
    assert torch.equal(unpack(moved, values), weight * mask)


def test_unpack_is_differentiable(make_mask):
    mask = make_mask((20, 30), 0.5, "unstructured")
    layout, values = pack(torch.randn(20, 30), mask, (16, 16))
    values.requires_grad_()
    g = torch.randn(20, 30)
    (unpack(layout, values) * g).sum().backward()
    assert torch.equal(values.grad, pack(g, mask, (16, 16))[1])


@pytest.mark.parametrize("bad", [dict(weight=torch.randn(3, 4), mask=torch.ones(4, 3, dtype=torch.bool)),
                                 dict(weight=torch.randn(3, 4), mask=torch.ones(3, 4, dtype=torch.bool), tile=(0, 4))])
def test_pack_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        pack(**bad)


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, spdf.kernels as K\n"
            "assert not K.HAS_TRITON\n"
            "lay, v = K.pack(torch.randn(8, 8), torch.rand(8, 8) > 0.5, (4, 4))\n"
            "y = K.tiled_linear(torch.randn(3, 8), v, lay)\n"
            "assert y.shape == (3, 8)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
