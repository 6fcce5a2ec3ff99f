"""Saving and restoring sparse models: model state dicts (masks travel as buffers), spdf.load_state_dict's
sparse/dense guard, and the Sparsifier's own compact (bit-packed) state."""
import io

import pytest
import torch

import spdf
from spdf.sparsity import sparse_layers
from spdf.sparsity.bitpack import pack_bits, unpack_bits


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)  # weights_only (torch's default): no pickled code in our checkpoints


def logits(model, idx):
    model.eval()
    with torch.no_grad():
        return model(idx)[0]


def masks_of(model):
    return {n: l.weight_mask.clone() for n, l in sparse_layers(model).items()}


def trained_sparse(make_gpt, seed=0, steps=2):
    model = make_gpt(seed=seed)
    sp = spdf.sparsify(model, sparsity=0.75, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sp.attach(opt)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 128, (2, 9), generator=g)
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
    return model, sp


# ---- model.state_dict() -----------------------------------------------------------------------------------------
def test_model_state_dict_round_trips_into_a_model_sparsified_with_another_seed(make_gpt, batch):
    src, _ = trained_sparse(make_gpt, seed=0)
    state = roundtrip(src.state_dict())
    dst = make_gpt(seed=5)
    sp = spdf.sparsify(dst, sparsity=0.75, seed=1)
    before = masks_of(dst)
    dst.load_state_dict(state)
    src_masks = masks_of(src)
    assert any(not torch.equal(before[n], src_masks[n]) for n in before), "seeds gave the same masks: test is void"
    for name, mask in masks_of(dst).items():
        assert torch.equal(mask, src_masks[name]), name
    idx, _ = batch
    assert torch.equal(logits(dst, idx), logits(src, idx))
    # Training continues with the loaded masks, not the ones the seed made.
    dst.train()
    opt = torch.optim.AdamW(dst.parameters(), lr=1e-2)
    sp.attach(opt)
    dst(idx, batch[1])[1].backward()
    opt.step()
    for name, layer in sparse_layers(dst).items():
        assert (layer.weight.grad[~src_masks[name]] == 0).all(), name
        assert (layer.weight[~src_masks[name]] == 0).all(), name


def test_spdf_load_state_dict_refuses_sparse_checkpoint_into_dense_model(make_gpt, batch):
    src, _ = trained_sparse(make_gpt)
    state = roundtrip(src.state_dict())
    dense = make_gpt(seed=9)
    with pytest.raises(ValueError, match="checkpoint is sparse but the model is dense"):
        spdf.load_state_dict(dense, state)
    assert not sparse_layers(dense)
    spdf.load_state_dict(dense, state, densify_model=True)
    assert not sparse_layers(dense)
    assert torch.equal(logits(dense, batch[0]), logits(src, batch[0]))


def test_spdf_load_state_dict_refuses_dense_checkpoint_into_sparse_model(make_gpt, batch):
    src = make_gpt(seed=3)
    state = roundtrip(src.state_dict())
    model = make_gpt(seed=4)
    spdf.sparsify(model, sparsity=0.5)
    with pytest.raises(ValueError, match="checkpoint is dense but the model is sparse"):
        spdf.load_state_dict(model, state)
    assert len(sparse_layers(model)) == 8  # the refusal changed nothing
    spdf.load_state_dict(model, state, densify_model=True)
    assert not sparse_layers(model)
    assert torch.equal(logits(model, batch[0]), logits(src, batch[0]))


def test_spdf_load_state_dict_sparse_into_sparse(make_gpt, batch):
    src, _ = trained_sparse(make_gpt)
    dst = make_gpt(seed=1)
    spdf.sparsify(dst, sparsity=0.75, seed=3)
    spdf.load_state_dict(dst, roundtrip(src.state_dict()))
    assert torch.equal(logits(dst, batch[0]), logits(src, batch[0]))


@pytest.mark.parametrize("saved, loading", [("compressed", "masked"), ("masked", "compressed")])
def test_spdf_load_state_dict_refuses_another_backends_form_even_not_strict(make_gpt, batch, saved, loading):
    # strict=False loaded the biases and kept the model's own sparse weights, silently
    src = make_gpt(seed=0)
    spdf.sparsify(src, sparsity=0.75, seed=0, backend=saved, tile=(16, 16))
    state = roundtrip(src.state_dict())
    model = make_gpt(seed=4)
    spdf.sparsify(model, sparsity=0.75, seed=1, backend=loading, tile=(16, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"stores its sparse layers in the form of backend {saved}, the model's "
                                         f"layers are of backend {loading}: .* densify_model=True"):
        spdf.load_state_dict(model, state, strict=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the refusal changed nothing
    spdf.load_state_dict(model, state, densify_model=True)
    assert not sparse_layers(model)
    assert torch.equal(logits(model, batch[0]), logits(src, batch[0]))


def test_refusal_message_names_the_real_keyword(make_gpt):
    src, _ = trained_sparse(make_gpt, steps=0)
    with pytest.raises(ValueError) as err:
        spdf.load_state_dict(make_gpt(), src.state_dict())
    assert "densify_model=True" in str(err.value)


# ---- Sparsifier.state_dict() --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 8), (7, 9), (96, 32)])
def test_bitpack_round_trip_and_size(shape):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(shape, generator=g) > 0.5
    packed = pack_bits(mask)
    numel = mask.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == -(-numel // 8)
    assert torch.equal(unpack_bits(packed, shape), mask)


def test_unpack_too_few_bytes_is_a_value_error():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), (3, 3))


def test_sparsifier_state_is_bit_packed(make_gpt):
    model = make_gpt()
    sp = spdf.sparsify(model, sparsity=0.75, seed=0)
    state = sp.state_dict()
    assert set(state["layers"]) == set(sparse_layers(model))
    for name, entry in state["layers"].items():
        numel = sparse_layers(model)[name].weight.numel()
        assert entry["bits"].dtype == torch.uint8
        assert entry["bits"].numel() == -(-numel // 8)  # 1/8 of a byte per entry
        assert entry["target"] == 0.75
    assert state["config"]["seed"] == 0 and state["config"]["sparsity"] == 0.75


def test_sparsifier_state_round_trip_restores_masks_in_a_model_with_other_seed(make_gpt):
    a = make_gpt(seed=0)
    sp_a = spdf.sparsify(a, sparsity=0.75, seed=0)
    state = roundtrip(sp_a.state_dict())
    b = make_gpt(seed=0)
    sp_b = spdf.sparsify(b, sparsity=0.5, seed=1)
    opt = torch.optim.Adam(b.parameters(), lr=1e-3)
    sp_b.attach(opt)
    sp_b.load_state_dict(state)
    ma, mb = masks_of(a), masks_of(b)
    for name in ma:
        assert torch.equal(ma[name], mb[name]), name
        layer = sparse_layers(b)[name]
        assert (layer.weight[~ma[name]] == 0).all()
        assert layer.target_sparsity == 0.75
    assert sp_b.config["seed"] == 0
    for row in sp_b.stats():
        assert row["mask_sparsity"] == pytest.approx(0.75) and row["nnz"] <= row["numel"] // 4


def test_sparsifier_state_round_trip_for_conv1d_orientation():
    import torch.nn as nn

    from test_sparsify import TinyHFBlock  # the Conv1D defined there (pytest puts this folder on sys.path)

    torch.manual_seed(0)
    a, b = TinyHFBlock(), TinyHFBlock()
    sp_a, sp_b = spdf.sparsify(a, sparsity=0.5, seed=0), spdf.sparsify(b, sparsity=0.5, seed=7)
    state = sp_a.state_dict()
    assert state["layers"]["c_fc"]["shape"] == [24, 8]  # (out, in), whatever the storage
    sp_b.load_state_dict(state)
    assert torch.equal(a.c_fc.weight_mask, b.c_fc.weight_mask)
    assert isinstance(b.c_fc.weight, nn.Parameter)


def test_sparsifier_state_with_other_layers_is_a_value_error(make_gpt):
    a = make_gpt()
    state = spdf.sparsify(a, sparsity=0.5, param_filter="*mlp*").state_dict()
    b = make_gpt()
    sp_b = spdf.sparsify(b, sparsity=0.5)
    before = masks_of(b)
    with pytest.raises(ValueError, match="does not match the model.*missing"):
        sp_b.load_state_dict(state)
    assert all(torch.equal(before[n], m) for n, m in masks_of(b).items())


def test_sparsifier_state_with_other_shape_is_a_value_error(make_gpt):
    a = make_gpt(d_model=64, n_head=2, d_ff=256)
    state = spdf.sparsify(a, sparsity=0.5).state_dict()
    sp_b = spdf.sparsify(make_gpt(), sparsity=0.5)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn.*shape"):
        sp_b.load_state_dict(state)


def test_sparsifier_state_of_other_version_is_a_value_error(make_gpt):
    sp = spdf.sparsify(make_gpt(), sparsity=0.5)
    state = sp.state_dict()
    state["version"] = 99
    with pytest.raises(ValueError, match="version"):
        sp.load_state_dict(state)


def test_stats_rows(make_gpt):
    model = make_gpt()
    sp = spdf.sparsify(model, sparsity=0.75, overrides={"*mlp.c_fc*": 0.5})
    rows = {r["name"]: r for r in sp.stats()}
    assert len(rows) == 9
    total = rows[spdf.sparsity.TOTAL_ROW]  # the global summary row, weighted by layer size
    assert total["numel"] == sum(r["numel"] for n, r in rows.items() if n != spdf.sparsity.TOTAL_ROW)
    assert total["nnz"] == 2 * (768 + 256 + 2048 + 1024)
    assert total["actual"] == pytest.approx(1 - total["nnz"] / total["numel"])
    attn = rows["transformer.h.0.attn.c_attn"]
    assert attn["shape"] == (96, 32) and attn["numel"] == 3072
    assert attn["target"] == 0.75 and attn["nnz"] == 768 and attn["actual"] == pytest.approx(0.75)
    fc = rows["transformer.h.1.mlp.c_fc"]
    assert fc["target"] == 0.5 and fc["nnz"] == 2048 and fc["actual"] == pytest.approx(0.5)
    # `actual` counts the weight's zeros, not the mask's: an extra zero shows up.
    with torch.no_grad():
        layer = model.transformer.h[0].attn.c_attn
        layer.weight[layer.weight_mask.nonzero()[0].tolist()[0], layer.weight_mask.nonzero()[0].tolist()[1]] = 0.0
    row = {r["name"]: r for r in sp.stats()}["transformer.h.0.attn.c_attn"]
    assert row["nnz"] == 767 and row["mask_sparsity"] == pytest.approx(0.75)
    assert row["actual"] == pytest.approx(1 - 767 / 3072)
