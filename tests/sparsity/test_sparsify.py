"""sparsify(): which weights it picks (default filter, globs, '!', per-pattern levels, overrides), its errors, and
models other than ours (nn.Sequential, a GPT-2-style Conv1D defined here, without transformers)."""
import warnings

import pytest
import torch
import torch.nn as nn

import spdf
from spdf.sparsity import NM, Block, SparseLinear, sparse_layers

PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def targets(model):
    return {name: layer.target_sparsity for name, layer in sparse_layers(model).items()}


def test_default_filter_selects_exactly_the_four_projections_per_block(make_gpt):
    model = make_gpt()
    spdf.sparsify(model, sparsity=0.5, seed=0)
    expected = {f"transformer.h.{i}.{p}" for i in range(2) for p in PROJECTIONS}
    assert set(sparse_layers(model)) == expected
    assert all(isinstance(model.get_submodule(n), SparseLinear) for n in expected)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight
    assert type(model.transformer.wte) is nn.Embedding and type(model.transformer.wpe) is nn.Embedding
    assert set(targets(model).values()) == {0.5}
    # Norms, embeddings and biases are untouched: no zero was added to any of them.
    for name, p in model.named_parameters():
        if name.endswith("bias") or "ln_" in name or "wte" in name or "wpe" in name:
            if "ln_" in name and name.endswith("weight"):
                assert (p == 1).all(), name
            elif not name.endswith("bias"):
                assert (p != 0).all(), name
    mask_keys = [k for k in model.state_dict() if k.endswith("weight_mask")]
    assert sorted(mask_keys) == sorted(f"{n}.weight_mask" for n in expected)


def test_sparsify_zeroes_exactly_the_masked_entries_and_keeps_the_rest(make_gpt):
    model = make_gpt(seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spdf.sparsify(model, sparsity=0.75, seed=0)
    for name, layer in sparse_layers(model).items():
        w0 = before[f"{name}.weight"]
        assert torch.equal(layer.weight[layer.weight_mask], w0[layer.weight_mask])
        assert (layer.weight[~layer.weight_mask] == 0).all()
        assert int((~layer.weight_mask).sum()) == round(0.75 * w0.numel())
    # Parameters names are those of the dense model: optimizers and checkpoints line up.
    assert {n for n, _ in model.named_parameters()} == set(before)


def test_glob_filter_selects_only_matches(make_gpt):
    model = make_gpt()
    spdf.sparsify(model, sparsity=0.5, param_filter="*mlp*")
    assert set(sparse_layers(model)) == {f"transformer.h.{i}.mlp.{k}" for i in range(2) for k in ("c_fc", "c_proj")}


def test_list_filter_with_exclusion(make_gpt):
    model = make_gpt()
    spdf.sparsify(model, sparsity=0.5, param_filter=["*", "!*c_proj*", "!transformer.h.1.*"])
    assert set(sparse_layers(model)) == {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"}


def test_dict_filter_sets_per_pattern_sparsity_and_none_means_default(make_gpt):
    model = make_gpt()
    spdf.sparsify(model, sparsity=0.25, param_filter={"*attn.c_attn*": 0.5, "*mlp*": 0.75, "*attn.c_proj*": None})
    got = targets(model)
    assert len(got) == 8
    for name, level in got.items():
        expected = 0.5 if "c_attn" in name else 0.75 if "mlp" in name else 0.25
        assert level == expected, name
        layer = model.get_submodule(name)
        assert int((~layer.weight_mask).sum()) == round(expected * layer.weight_mask.numel())


def test_overrides_win_over_the_filter_levels(make_gpt):
    model = make_gpt()
    spdf.sparsify(model, sparsity=0.75, overrides={"transformer.h.0.*": 0.5, "*mlp.c_proj*": 0.0})
    got = targets(model)
    assert got["transformer.h.0.attn.c_attn"] == 0.5
    assert got["transformer.h.1.attn.c_attn"] == 0.75
    assert got["transformer.h.1.mlp.c_proj"] == 0.0
    assert model.transformer.h[1].mlp.c_proj.weight_mask.all()


@pytest.mark.parametrize("param_filter", ["*lm_head*", "*wte*", ["nothing*"], {"*ln_1*": 0.5}, "*bias"])
def test_filter_matching_no_linear_weight_is_a_value_error(make_gpt, param_filter):
    model = make_gpt()
    with pytest.raises(ValueError, match="matched no linear weight"):
        spdf.sparsify(model, sparsity=0.5, param_filter=param_filter)
    assert not sparse_layers(model)


def test_override_matching_no_linear_weight_names_overrides(make_gpt):
    model = make_gpt()
    with pytest.raises(ValueError, match=r"^overrides pattern '\*nomatch\*' matched no linear weight"):
        spdf.sparsify(model, sparsity=0.5, overrides={"*nomatch*": 0.25})
    assert not sparse_layers(model)


def test_filter_whose_matches_are_all_excluded_is_a_value_error(make_gpt):
    with pytest.raises(ValueError, match="selected no weight"):
        spdf.sparsify(make_gpt(), sparsity=0.5, param_filter=["*mlp*", "!*mlp*"])


def test_filter_of_only_exclusions_is_a_value_error(make_gpt):
    with pytest.raises(ValueError, match="no include pattern"):
        spdf.sparsify(make_gpt(), sparsity=0.5, param_filter=["!*mlp*"])


def test_override_matching_nothing_is_a_value_error(make_gpt):
    with pytest.raises(ValueError, match=r"\*nope\*"):
        spdf.sparsify(make_gpt(), sparsity=0.5, overrides={"*nope*": 0.1})


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "a", True])
def test_bad_sparsity_is_a_value_error_naming_the_key(make_gpt, bad):
    model = make_gpt()
    with pytest.raises(ValueError, match="'sparsity'"):
        spdf.sparsify(model, sparsity=bad)
    with pytest.raises(ValueError, match=r"'\*mlp\*'"):
        spdf.sparsify(model, sparsity=0.5, overrides={"*mlp*": bad})
    assert not sparse_layers(model)


def test_unknown_init_lists_the_allowed(make_gpt):
    with pytest.raises(ValueError, match="random.*magnitude.*erk.*nm.*block"):
        spdf.sparsify(make_gpt(), sparsity=0.5, init="lottery")


def test_sparsifying_twice_is_a_value_error(make_gpt):
    model = make_gpt()
    spdf.sparsify(model, sparsity=0.5)
    with pytest.raises(ValueError, match="already sparsified"):
        spdf.sparsify(model, sparsity=0.5)


def test_densify_dense_model_is_a_value_error(make_gpt):
    with pytest.raises(ValueError, match="no sparse layer"):
        spdf.densify(make_gpt())


@pytest.mark.parametrize("init", [NM(2, 4), Block(4)], ids=["nm", "block"])
def test_structured_init_errors_name_the_parameter(make_gpt, init):
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn\.weight"):
        spdf.sparsify(make_gpt(n_layer=1, d_model=30, n_head=2, d_ff=120), sparsity=0.5, init=init)


@pytest.mark.parametrize("kwargs", [dict(init=NM(2, 4)), dict(param_filter={"0.*": 0.5, "1.*": 1.5})],
                         ids=["nm-indivisible-later-layer", "bad-level-in-dict-filter"])
def test_failed_sparsify_leaves_the_model_untouched(kwargs):
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))  # layer 1's input dim 6 is not a multiple of m=4
    with pytest.raises(ValueError):
        spdf.sparsify(model, sparsity=0.5, **kwargs)
    assert not sparse_layers(model)
    assert all(type(m) is nn.Linear for m in model)


def test_erk_does_not_silently_ignore_overrides(make_gpt):
    model = make_gpt()
    try:
        spdf.sparsify(model, sparsity=0.5, init="erk", overrides={"*c_fc*": 0.0})
    except ValueError:
        return
    assert targets(model)["transformer.h.0.mlp.c_fc"] == 0.0


def test_erk_on_gpt_makes_small_layers_denser_and_keeps_the_budget(make_gpt):
    model = make_gpt()
    spdf.sparsify(model, sparsity=0.75, init="erk")
    layers = sparse_layers(model)
    t = targets(model)
    assert t["transformer.h.0.attn.c_proj"] < t["transformer.h.0.attn.c_attn"] < t["transformer.h.0.mlp.c_fc"]
    total = sum(l.weight_mask.numel() for l in layers.values())
    kept = sum(int(l.weight_mask.sum()) for l in layers.values())
    assert abs(kept - 0.25 * total) <= len(layers)


def test_magnitude_init_keeps_the_largest_weights(make_gpt):
    model = make_gpt()
    w0 = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    spdf.sparsify(model, sparsity=0.5, init="magnitude")
    mask = model.transformer.h[0].mlp.c_fc.weight_mask
    assert w0.abs()[mask].min() >= w0.abs()[~mask].max()


def test_plain_sequential_of_linears():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3, bias=False))
    sp = spdf.sparsify(model, sparsity=0.6, seed=1)
    assert set(sparse_layers(model)) == {"0", "2"}
    assert [r["name"] for r in sp.stats()] == ["0", "2", spdf.sparsity.TOTAL_ROW]
    assert int((model[0].weight == 0).sum()) == 120 and int((model[2].weight == 0).sum()) == 36
    x = torch.randn(4, 10)
    with torch.no_grad():
        sparse_out = model(x)
    spdf.densify(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear and model[2].bias is None
    with torch.no_grad():
        assert torch.equal(model(x), sparse_out)


def test_a_bare_linear_is_refused_or_sparsified_not_corrupted():
    layer = nn.Linear(4, 4)
    try:
        spdf.sparsify(layer, sparsity=0.5)
    except ValueError:
        assert isinstance(layer.weight, nn.Parameter) and layer(torch.randn(2, 4)).shape == (2, 4)
        return
    raise AssertionError(f"sparsify returned and left {list(layer._parameters)} params, children "
                         f"{list(dict(layer.named_children()))}")


# ---- a GPT-2-style Conv1D, as Hugging Face defines it, without transformers ------------------------------------
class Conv1D(nn.Module):
    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class TinyHFBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(24, 8)  # weight (8, 24): in 8, out 24
        self.c_proj = Conv1D(8, 24)  # weight (24, 8): in 24, out 8

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_fc(x)))


def test_conv1d_is_sparsified_with_exact_count():
    torch.manual_seed(0)
    model = TinyHFBlock()
    spdf.sparsify(model, sparsity=0.75, seed=0)
    layer = model.c_fc
    assert isinstance(layer, SparseLinear) and layer.transposed
    assert (layer.in_features, layer.out_features) == (8, 24)
    assert layer.weight_mask.shape == layer.weight.shape == (8, 24)
    assert layer.mask.shape == (24, 8)  # nn.Linear orientation
    assert int((layer.weight == 0).sum()) == 144


def test_conv1d_nm_groups_run_along_weight_dim_0():
    torch.manual_seed(0)
    model = TinyHFBlock()
    spdf.sparsify(model, init=NM(1, 4), seed=0)
    for layer in (model.c_fc, model.c_proj):
        nx, nf = layer.weight.shape
        groups = layer.weight_mask.view(nx // 4, 4, nf)  # 4 consecutive inputs of one output
        assert (groups.sum(1) == 1).all()
        assert ((layer.weight != 0).view(nx // 4, 4, nf).sum(1) == 1).all()


def test_conv1d_nm_indivisible_input_dim_names_the_parameter():
    model = nn.Sequential()
    model.add_module("proj", Conv1D(8, 6))  # input dim nx=6
    with pytest.raises(ValueError, match=r"proj\.weight.*6"):
        spdf.sparsify(model, init=NM(2, 4))


def test_conv1d_magnitude_mask_uses_the_right_entries():
    torch.manual_seed(0)
    model = TinyHFBlock()
    w0 = model.c_fc.weight.detach().clone()
    spdf.sparsify(model, init="magnitude", sparsity=0.5)
    mask = model.c_fc.weight_mask
    assert w0.abs()[mask].min() >= w0.abs()[~mask].max()


def test_conv1d_mask_equals_the_transposed_linear_mask():
    # Same seed, name and (out, in) shape → the same mask whatever the storage orientation.
    torch.manual_seed(0)
    hf = nn.Sequential()
    hf.add_module("fc", Conv1D(24, 8))
    lin = nn.Sequential()
    lin.add_module("fc", nn.Linear(8, 24))
    spdf.sparsify(hf, sparsity=0.5, seed=4)
    spdf.sparsify(lin, sparsity=0.5, seed=4)
    assert torch.equal(hf.fc.weight_mask.t(), lin.fc.weight_mask)


def test_conv1d_densify_gives_back_conv1d_with_bit_identical_outputs():
    torch.manual_seed(0)
    model = TinyHFBlock()
    spdf.sparsify(model, sparsity=0.5, seed=0)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        sparse_out = model(x)
    spdf.densify(model)
    assert type(model.c_fc) is Conv1D and type(model.c_proj) is Conv1D
    assert model.c_fc.weight.shape == (8, 24) and not hasattr(model.c_fc, "weight_mask")
    with torch.no_grad():
        assert torch.equal(model(x), sparse_out)
    # The densified Conv1D trains everywhere.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).square().sum().backward()
    assert (model.c_fc.weight.grad[model.c_fc.weight == 0] != 0).any()
