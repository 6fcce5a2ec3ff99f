"""Every backend given the same masks trains like the masked one, over drawn shapes that are not tile multiples,
tiles, sparsities, seeds and dtypes (test_compressed.py and test_block_backend.py pin one shape each): the same
outputs and AdamW trajectory, the exact per-tensor zero count, densify() bit for bit with gradients reaching the
formerly masked weights, and state dicts that round trip exactly into a model sparsified with another seed."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import spdf
from spdf.sparsity.masks import block_mask, n_zeros
from tiny_training import linear_stack

# fp32: the backends compute the same sums in another order (unpacked GEMM vs dense GEMM over exact zeros), so they
# agree to rounding, and three AdamW steps (lr 1e-2) cannot amplify that past 1e-4. bf16 weights: one rounding step
# of bf16 (2**-8 relative) per operation, a few of them.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def train(model, opt, widths, dtype, steps=3) -> list[torch.Tensor]:
    outputs = []
    for i in range(steps):
        x = torch.randn(2, 3, widths[0], generator=torch.Generator().manual_seed(i)).to(dtype)
        y = model(x)
        y.float().square().mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        outputs.append(y.detach())
    return outputs


def check_densify_and_round_trip(model, sparsify_again, widths, dtype):
    x = torch.randn(2, 5, widths[0], generator=torch.Generator().manual_seed(99)).to(dtype)
    state = copy.deepcopy(model.state_dict())
    other = linear_stack(widths, dtype, seed=5)
    sparsify_again(other)
    other.load_state_dict(state)
    with torch.no_grad():
        y = model(x)
        assert torch.equal(other(x), y)
    assert all(torch.equal(value, state[key]) for key, value in other.state_dict().items())
    masks = {name: layer.mask.clone() for name, layer in spdf.sparsity.sparse_layers(model).items()}
    spdf.densify(model)
    assert torch.equal(model(x), y)
    model(x).float().square().sum().backward()
    for name, mask in masks.items():  # formerly masked weights learn
        assert not (~mask).any() or (model.get_submodule(name).weight.grad[~mask] != 0).any(), name


@settings(max_examples=10, deadline=None)
@given(widths=st.lists(st.integers(1, 40), min_size=2, max_size=3), sparsity=st.floats(0.0, 0.95),
       seed=st.integers(0, 2**31 - 1), tile=st.tuples(st.integers(1, 20), st.integers(1, 40)),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_compressed_trains_like_masked_with_exact_counts_densify_and_round_trip(widths, sparsity, seed, tile, dtype):
    runs = {}
    for backend in ("masked", "compressed"):
        model = linear_stack(widths, dtype)
        try:
            sp = spdf.sparsify(model, sparsity, seed=seed, backend=backend, tile=tile, param_filter="*")
        except ValueError as e:  # a layer left with no weight at all: the compressed backend refuses it
            assert backend == "compressed" and "keeps none" in str(e)
            return
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        sp.attach(opt)
        runs[backend] = (model, sp, train(model, opt, widths, dtype))
    for a, b in zip(runs["compressed"][2], runs["masked"][2]):
        torch.testing.assert_close(a, b, **TOLERANCE[dtype])
    masked, compressed = runs["masked"][1].layers, runs["compressed"][1].layers
    for name, layer in compressed.items():
        assert torch.equal(layer.mask, masked[name].mask), name
        assert int((~layer.mask).sum()) == n_zeros(layer.mask.numel(), sparsity), name
        assert int(torch.count_nonzero(layer.dense_weight())) <= layer.nnz, name
        torch.testing.assert_close(layer.dense_weight(), masked[name].dense_weight(), **TOLERANCE[dtype])
    for backend, (model, _, _) in runs.items():
        check_densify_and_round_trip(model, lambda m: spdf.sparsify(
            m, sparsity, seed=seed + 1, backend=backend, tile=tile, param_filter="*"), widths, dtype)


@settings(max_examples=6, deadline=None)
@given(block=st.integers(1, 5), grid=st.lists(st.integers(1, 4), min_size=2, max_size=3),
       sparsity=st.floats(0.0, 0.9), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_block_trains_like_masked_with_the_same_blocks(block, grid, sparsity, seed, dtype):
    widths = [block * g for g in grid]

    def masks():
        out = {}
        for name, module in linear_stack(widths, dtype).named_modules():
            if isinstance(module, nn.Linear):
                mask = block_mask(tuple(module.weight.shape), sparsity, block, seed, name)
                mask[:block, :block] = True  # a block layer keeps at least one block
                out[name] = mask
        return out

    def sparsify(model, backend):
        given = masks()
        return spdf.sparsify(model, init=given, param_filter=[f"{n}.weight" for n in given], backend=backend,
                             tile=(block, block))

    runs = {}
    for backend in ("masked", "block"):
        model = linear_stack(widths, dtype)
        sp = sparsify(model, backend)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        sp.attach(opt)
        runs[backend] = (model, sp, train(model, opt, widths, dtype))
    for a, b in zip(runs["block"][2], runs["masked"][2]):
        torch.testing.assert_close(a, b, **TOLERANCE[dtype])
    for name, layer in runs["block"][1].layers.items():
        assert torch.equal(layer.mask, runs["masked"][1].layers[name].mask) and layer.tile == (block, block), name
    check_densify_and_round_trip(runs["block"][0], lambda m: sparsify(m, "block"), widths, dtype)
