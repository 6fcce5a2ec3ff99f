"""The SparseLayer protocol: both backends answer it, the decay rule asks it, and no code outside spdf/sparsity
asks which backend a layer is."""
import re
from pathlib import Path

import pytest
import torch

import spdf
from spdf.sparsity import SparseLayer, sparse_layers
from spdf.sparsity.compressed import CompressedSparseLinear
from spdf.train.optim import build_adamw, param_groups
from tiny_training import train_tiny_gpt

REPO = Path(__file__).resolve().parents[2]
TILE = (16, 16)


@pytest.mark.parametrize("backend", ["masked", "compressed"])
def test_both_backends_are_sparse_layers_and_their_weights_decay(make_gpt, backend):
    model = make_gpt()
    spdf.sparsify(model, sparsity=0.75, backend=backend, tile=TILE)
    layers = sparse_layers(model)
    assert len(layers) == 8 and all(isinstance(layer, SparseLayer) for layer in layers.values())
    decay, no_decay = param_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    for layer in layers.values():
        assert all(id(p) in decayed for p in layer.weight_parameters())
        assert layer.bias is None or id(layer.bias) not in decayed
    # every 2-D sparse weight of the masked backend and the 1-D values of the compressed one: same count
    assert len(decay["params"]) == 8 + 2  # + token and position embeddings (the LM head is tied)


def _loop_adamw(model):  # the training loop's own builder: its decay rule asks the layers
    return build_adamw(model, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def test_compressed_and_masked_agree_through_the_real_optimizer_builder_with_weight_decay():
    masked = spdf.sparsity.to_dense_state_dict(train_tiny_gpt("masked", make_optimizer=_loop_adamw)[1].state_dict())
    comp = spdf.sparsity.to_dense_state_dict(train_tiny_gpt("compressed", make_optimizer=_loop_adamw)[1].state_dict())
    assert masked.keys() == comp.keys()
    for key in masked:
        torch.testing.assert_close(comp[key], masked[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize("backend", ["masked", "compressed"])
def test_sparsifier_state_round_trip(make_gpt, backend):
    a, b = make_gpt(seed=0), make_gpt(seed=0)
    sp_a = spdf.sparsify(a, sparsity=0.75, seed=0, backend=backend, tile=TILE)
    sp_b = spdf.sparsify(b, sparsity=0.5, seed=1, backend=backend, tile=TILE)
    sp_b.load_state_dict(sp_a.state_dict())
    for name, layer in sparse_layers(a).items():
        other = sparse_layers(b)[name]
        assert torch.equal(layer.mask, other.mask), name
        assert other.target_sparsity == 0.75
        kept_in_both = layer.mask & (other.dense_weight() != 0)
        assert (other.dense_weight()[~layer.mask] == 0).all(), name  # newly masked entries are zero
        # entries kept before and after keep their value (same init seed for both models)
        assert torch.equal(other.dense_weight()[kept_in_both], layer.dense_weight()[kept_in_both]), name
    assert sp_b.config["seed"] == 0 and sp_b.step == 0


def test_compressed_layout_change_under_an_optimizer_is_refused(make_gpt):
    a, b = make_gpt(), make_gpt()
    sp_a = spdf.sparsify(a, sparsity=0.75, seed=0, backend="compressed", tile=TILE)
    sp_b = spdf.sparsify(b, sparsity=0.75, seed=1, backend="compressed", tile=TILE)
    sp_b.attach(torch.optim.AdamW(b.parameters(), fused=True))
    with pytest.raises(ValueError, match="static"):
        sp_b.load_state_dict(sp_a.state_dict())
    sp_b.load_state_dict(sp_b.state_dict())  # the same masks: nothing to rebuild, accepted


def test_no_code_outside_sparsity_asks_which_backend_a_layer_is():
    backend_words = re.compile(r"weight_mask|tile_bitmap|isinstance\([^)]*Sparse|CompressedSparseLinear|"
                               r"hasattr\([^)]*(mask|dense)")
    offenders = []
    for path in sorted((REPO / "spdf").rglob("*.py")):
        if "sparsity" in path.relative_to(REPO / "spdf").parts:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if backend_words.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_masks_export_and_import_as_plain_tensors(make_gpt):
    a, b = make_gpt(), make_gpt()
    sp_a = spdf.sparsify(a, sparsity=0.75, seed=0)
    sp_b = spdf.sparsify(b, sparsity=0.75, seed=3)
    masks = sp_a.masks()
    assert set(masks) == {f"{n}.weight" for n in sparse_layers(a)}
    assert all(m.dtype == torch.bool and m.shape == a.get_parameter(k).shape for k, m in masks.items())
    sp_b.load_masks(masks)
    assert all(torch.equal(m, sp_b.masks()[k]) for k, m in masks.items())
    with pytest.raises(ValueError, match="no mask given"):
        sp_b.load_masks(dict(list(masks.items())[:2]))


def test_densify_one_module_or_a_glob(make_gpt, batch):
    model = make_gpt()
    spdf.sparsify(model, sparsity=0.75)
    idx, _ = batch
    before = model(idx)[0]
    spdf.densify(model, "transformer.h.0.attn.c_attn")
    assert "transformer.h.0.attn.c_attn" not in sparse_layers(model) and len(sparse_layers(model)) == 7
    spdf.densify(model, "*mlp*")
    assert set(sparse_layers(model)) == {"transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_attn",
                                         "transformer.h.1.attn.c_proj"}
    assert torch.equal(model(idx)[0], before)
    with pytest.raises(ValueError, match="matched no sparse layer"):
        spdf.densify(model, "*mlp*")


def test_attach_hints_once_at_a_slow_cpu_optimizer(make_gpt, recwarn):
    spdf.Sparsifier._hinted = False
    for _ in range(2):
        model = make_gpt()
        sp = spdf.sparsify(model, sparsity=0.5)
        sp.attach(torch.optim.AdamW(model.parameters(), foreach=True))
    hints = [w for w in recwarn if "fused=True" in str(w.message)]
    assert len(hints) == 1
    model = make_gpt()
    spdf.Sparsifier._hinted = False
    spdf.sparsify(model, sparsity=0.5).attach(torch.optim.AdamW(model.parameters(), fused=True))
    assert len([w for w in recwarn if "fused=True" in str(w.message)]) == 1


def test_attach_switches_a_default_cpu_adamw_to_the_fused_kernel_and_keeps_an_explicit_choice(make_gpt, recwarn):
    model = make_gpt()
    sp = spdf.sparsify(model, sparsity=0.5)
    default = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp.attach(default)
    assert all(g["fused"] for g in default.param_groups) and default.defaults["fused"]
    assert not [w for w in recwarn if "fused=True" in str(w.message)]  # nothing to hint at
    for explicit in (dict(foreach=False), dict(fused=False), dict(foreach=True)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **explicit)
        sp.detach()
        sp.attach(opt)
        assert not any(g["fused"] for g in opt.param_groups), explicit
    stepped = torch.optim.AdamW(model.parameters(), lr=1e-3)  # already holds state: left as it is
    model(torch.zeros(1, 4, dtype=torch.long))[0].sum().backward()
    stepped.step()
    sp.detach()
    sp.attach(stepped)
    assert not any(g["fused"] for g in stepped.param_groups)
