"""Memory as the process holds it (issue 19): a sparsified model keeps nothing alive that it does not refer to.

The compressed backend once left every original dense weight and its dense bool mask alive for the life of the
process: the masked layer it was built from hooked the weight with a bound method, a cycle through the tensor's C++
hook table that Python's gc cannot break. These tests walk every live tensor (benchmarks/memory.py's live_storages)."""
from __future__ import annotations

import gc
import math
import sys
from pathlib import Path

import pytest
import torch

import spdf
from spdf.sparsity import SparseLinear, sparse_layers
from spdf.sparsity.compressed import CompressedSparseLinear

# benchmarks/memory.py, with benchmarks/ on sys.path only while it imports (its kernels.py would shadow Hugging
# Face's `kernels` package for every later test)
_BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
sys.path.insert(0, _BENCHMARKS)
try:
    from memory import live_bytes, live_storages
finally:
    sys.path.remove(_BENCHMARKS)

# Shapes chosen so that no non-sparse tensor has a sparse weight's shape (in either orientation).
SHAPE = dict(n_layer=2, n_head=2, d_model=64, d_ff=256, n_ctx=32, vocab_size=200)
TILE = (16, 16)


def _model() -> spdf.GPT:
    torch.manual_seed(0)
    return spdf.GPT(spdf.GPTConfig(name="live", **SHAPE))


def _ids(cls) -> set[int]:
    """Objects of exactly `cls` alive now (other tests' objects may still be alive: only new ones count)."""
    gc.collect()
    return {id(o) for o in gc.get_objects() if type(o) is cls}


def _dense_sized(shapes: set) -> list[torch.Tensor]:
    gc.collect()
    return [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and not o.is_meta
            and (tuple(o.shape) in shapes or tuple(o.shape)[::-1] in shapes)]


def _compressed_formula(layer: CompressedSparseLinear) -> int:
    """What the tiled layout says a layer stores (kernels/spdf_kernels/layout.py): the non-zeros, a bitmap word and
    a word offset (4 bytes each) per 32 columns of each row of each non-empty tile, the bias; the tile-level CSR/CSC
    indices are left out of the formula (a few ints per tile)."""
    tn, tk = layer.tile
    tiles = layer.tile_col_idx.numel()
    index = tiles * tn * math.ceil(tk / 32) * 8
    bias = layer.bias.numel() * layer.bias.element_size() if layer.bias is not None else 0
    return layer.values.numel() * layer.values.element_size() + index + bias


def test_compressed_sparsify_keeps_no_dense_copy_alive_and_holds_what_the_format_says():
    model = _model()
    shapes = {tuple(m.weight.shape) for m in spdf.sparsify(_model(), 0.75, seed=0).layers.values()}
    gc.collect()
    dense_nonsparse = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                          if tuple(p.shape) not in shapes)
    baseline_without_model = {k: v for k, v in live_storages().items()}
    for p in model.parameters():  # the model's own storages are measured, not baselined
        baseline_without_model.pop((str(p.device), p.untyped_storage().data_ptr()), None)

    twins = _ids(SparseLinear)
    spdf.sparsify(model, 0.75, seed=0, backend="compressed", tile=TILE)
    gc.collect()
    assert not _dense_sized(shapes), "a dense-sized tensor (an original weight or a mask) is still alive"
    assert not _ids(SparseLinear) - twins, "a masked twin is still alive"
    layers = sparse_layers(model).values()
    formula = sum(_compressed_formula(layer) for layer in layers)
    sparse_live = live_bytes(baseline_without_model) - dense_nonsparse
    assert abs(sparse_live - formula) <= 0.10 * formula, (sparse_live, formula)
    dense_sparse_layers = sum(math.prod(s) * 4 for s in shapes) * 2  # two blocks
    assert sparse_live < 0.5 * dense_sparse_layers  # control: the leak held 1.25x of this


@pytest.mark.parametrize("backend", ["masked", "compressed"])
def test_nothing_outlives_a_dropped_model_after_training_and_densify(backend):
    idx = torch.randint(0, SHAPE["vocab_size"], (2, 17))
    models = _ids(spdf.GPT)
    baseline = live_storages()
    model = _model()
    sp = spdf.sparsify(model, 0.75, seed=0, backend=backend, tile=TILE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    sp.attach(opt)
    model(idx[:, :-1], idx[:, 1:])[1].backward()  # the logits are not kept: their graph would hold the weights
    opt.step()
    spdf.densify(model)
    del model, sp, opt
    assert live_bytes(baseline) == 0
    assert not _ids(spdf.GPT) - models


def test_a_discarded_masked_layer_frees_its_weight_and_mask():
    """The layer's gradient hook holds it weakly: layer, weight and mask are freed with it (the hook left on a weight
    the user still holds is inert)."""
    gc.collect()
    baseline = live_storages()
    model = torch.nn.Sequential(torch.nn.Linear(64, 48))
    spdf.sparsify(model, 0.5, seed=0)
    weight = model[0].weight
    del model
    assert live_bytes(baseline) == weight.numel() * 4  # only the weight the test holds
    weight.sum().backward()  # the dead layer's hook does nothing
    assert torch.equal(weight.grad, torch.ones_like(weight))
