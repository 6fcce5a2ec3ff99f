"""A state dict carries its masks into the layers it loads into: the pattern backends (block, semi_structured) take the
form they share with another backend (compressed, masked) only where its masks are of their pattern, and refuse the
rest before anything changes, as sparsify() and set_mask() do. Properties over shapes that are not tile multiples,
block sizes, sparsities, seeds and dtypes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import spdf
from spdf.sparsity import NM, sparse_layers
from spdf.sparsity.masks import block_mask
from tiny_training import linear_stack

DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


def user_masks(model: nn.Module, make) -> dict[str, torch.Tensor]:
    """{module name: (out, in) mask} for every linear layer, from make(name, shape)."""
    return {name: make(name, tuple(m.weight.shape)) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def sparse(sizes, dtype, backend, masks, tile=(64, 64), seed=0):
    model = linear_stack(sizes, dtype, seed)
    spdf.sparsify(model, init=masks, param_filter=[f"{n}.weight" for n in masks], backend=backend, tile=tile)
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@settings(max_examples=8, deadline=None)
@given(block=st.integers(2, 6), grid=st.lists(st.integers(1, 4), min_size=3, max_size=3),
       sparsity=st.floats(0.0, 0.9), seed=st.integers(0, 2**31 - 1), dtype=DTYPES)
def test_a_compressed_state_loads_into_a_block_model_only_where_its_masks_are_whole_blocks(block, grid, sparsity,
                                                                                           seed, dtype):
    sizes = [block * g for g in grid]
    tile = (block, block)

    def whole_blocks(name, shape):
        mask = block_mask(shape, sparsity, block, seed, name)
        mask[:block, :block] = True  # a layer keeps at least one block (a block layer with none is refused)
        return mask

    blocks = user_masks(linear_stack(sizes, dtype), whole_blocks)
    source = sparse(sizes, dtype, "compressed", blocks, tile, seed=1)
    target = sparse(sizes, dtype, "block", blocks, tile, seed=2)
    target.load_state_dict(source.state_dict())
    x = torch.randn(5, sizes[0]).to(dtype)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))

    # Masks of another pattern (unstructured, with the block layers' own tile) are refused before anything changes:
    # the block products read every stored tile as a full block
    def one_short(name, shape):
        mask = whole_blocks(name, shape)
        mask[0, 1] = False  # the first block is kept: now it is not whole
        return mask

    other = sparse(sizes, dtype, "compressed", user_masks(linear_stack(sizes, dtype), one_short), tile, seed=3)
    before = snapshot(target)
    with pytest.raises(RuntimeError, match=r"0\.values: backend 'block' computes whole blocks: the mask is not made "
                                           r"of whole .*load it into a model sparsified with backend 'compressed'"):
        target.load_state_dict(other.state_dict(), strict=False)
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@settings(max_examples=8, deadline=None)
@given(sizes=st.lists(st.integers(1, 6).map(lambda g: 4 * g), min_size=2, max_size=3),
       seed=st.integers(0, 2**31 - 1), dtype=DTYPES)
def test_a_masked_state_loads_into_a_semi_structured_model_only_where_its_masks_are_2_of_4(sizes, seed, dtype):
    masked = linear_stack(sizes, dtype, seed=1)
    spdf.sparsify(masked, 0.5, init=NM(2, 4), seed=seed, param_filter="*")
    semi = linear_stack(sizes, dtype, seed=2)  # built on CPU (its forward needs CUDA; loading does not)
    spdf.sparsify(semi, 0.5, init=NM(2, 4), seed=seed + 1, backend="semi_structured", param_filter="*")
    semi.load_state_dict(masked.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(semi.state_dict().values(), masked.state_dict().values()))

    # an unstructured mask would be compressed to 2:4 by dropping kept weights, silently: refused
    unstructured = linear_stack(sizes, dtype, seed=3)
    spdf.sparsify(unstructured, 0.75, seed=seed, param_filter="*")  # 1 of 4 kept on average: never 2:4
    before = snapshot(semi)
    with pytest.raises(RuntimeError, match=r"weight_mask: backend 'semi_structured' computes 2:4 masks only: the "
                                           r"mask does not keep exactly 2 of every 4 .*backend 'masked'"):
        semi.load_state_dict(unstructured.state_dict(), strict=False)
    after = semi.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(layer.mask.view(-1, 4).sum(-1).eq(2).all() for layer in sparse_layers(semi).values())
