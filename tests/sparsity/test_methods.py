"""Mask methods as objects: the registry, the string shorthand, user-given masks, global magnitude selection."""
import pytest
import torch
import typing

import spdf
from spdf.recipe_schema import SparsitySpec
from spdf.sparsity import ERK, MASK_METHODS, NM, Block, GlobalMagnitude, Magnitude, Random, sparse_layers


def _masks(model):
    return {n: layer.mask.clone() for n, layer in sparse_layers(model).items()}


@pytest.mark.parametrize("name,obj", [("random", Random()), ("magnitude", Magnitude()), ("erk", ERK()),
                                      ("nm", NM(2, 4)), ("block", Block(16))])
def test_string_shorthand_is_the_default_object(make_gpt, name, obj):
    a, b = make_gpt(), make_gpt()
    spdf.sparsify(a, sparsity=0.5, init=name, seed=3)
    spdf.sparsify(b, sparsity=0.5, init=obj, seed=3)
    ma, mb = _masks(a), _masks(b)
    assert all(torch.equal(ma[n], mb[n]) for n in ma)


def test_random_masks_depend_only_on_seed_name_and_shape(make_gpt):
    a, b = make_gpt(seed=0), make_gpt(seed=7)  # other weights
    spdf.sparsify(a, sparsity=0.75, init=Random(), seed=1)
    spdf.sparsify(b, sparsity=0.75, init=Random(), seed=1)
    ma, mb = _masks(a), _masks(b)
    assert all(torch.equal(ma[n], mb[n]) for n in ma)


def test_user_masks_by_name_and_by_callable(make_gpt):
    src = make_gpt()
    spdf.sparsify(src, sparsity=0.6, seed=5)
    given = spdf.sparsity.Sparsifier(src, {}).masks()  # {"x.weight": bool}
    model = make_gpt()
    sp = spdf.sparsify(model, init=given)
    assert all(torch.equal(sp.masks()[k], m) for k, m in given.items())
    assert all(r["target"] == pytest.approx(0.6, abs=1e-3) for r in sp.stats())
    calls = []

    def every_other_row(name, shape, level):
        calls.append((name, shape, level))
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[::2] = True
        return mask

    model = make_gpt()
    spdf.sparsify(model, sparsity=0.3, init=every_other_row)
    assert len(calls) == 8 and all(level == 0.3 for _, _, level in calls)
    assert all(layer.density == 0.5 for layer in sparse_layers(model).values())


@pytest.mark.parametrize("backend", ["masked", "compressed"])
def test_masks_of_square_conv1d_weights_round_trip_through_init_by_parameter_name(backend):
    """masks() gives each mask shaped like its parameter; a square Conv1D weight (GPT-2's attn.c_proj) fits both
    orientations, and its parameter's name says which: it was taken as (out, in), the saved mask transposed."""
    from test_sparsify import Conv1D

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(Conv1D(6, 6), torch.nn.Tanh(), Conv1D(10, 6))

    given = spdf.sparsify(model(), 0.5, seed=3, param_filter="*").masks()
    assert not torch.equal(given["0.weight"], given["0.weight"].t())  # the orientation shows
    sp = spdf.sparsify(model(), init=given, backend=backend, tile=(4, 4), param_filter="*")
    assert all(torch.equal(sp.masks()[k], m) for k, m in given.items())
    by_module = {name[: -len(".weight")]: (m.t() if name == "0.weight" else m) for name, m in given.items()}
    sp = spdf.sparsify(model(), init=by_module, param_filter="*")  # module names: (out, in), as exports store them
    assert all(torch.equal(sp.masks()[k], m) for k, m in given.items())


def test_user_masks_must_cover_the_selection_and_be_bool(make_gpt):
    given = {"transformer.h.0.attn.c_attn.weight": torch.ones(96, 32, dtype=torch.bool)}
    model = make_gpt()
    with pytest.raises(ValueError, match="no user mask"):
        spdf.sparsify(model, init=given)
    assert not sparse_layers(model)
    with pytest.raises(ValueError, match="bool"):
        spdf.sparsify(model, init=lambda name, shape, level: torch.ones(shape))


def test_global_magnitude_keeps_the_largest_weights_across_layers(make_gpt):
    model = make_gpt()
    with torch.no_grad():  # one layer of much larger weights: it keeps far more than its share
        model.transformer.h[0].mlp.c_fc.weight.mul_(2)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in
               [f"transformer.h.{i}.{k}" for i in range(2) for k in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj")]}
    sp = spdf.sparsify(model, sparsity=0.75, init=GlobalMagnitude())
    layers = sparse_layers(model)
    total = sum(layer.mask.numel() for layer in layers.values())
    kept = sum(int(layer.mask.sum()) for layer in layers.values())
    assert kept == total - round(0.75 * total)  # exact global count
    smallest_kept = min(weights[n].abs()[layers[n].mask].min() for n in layers)
    largest_dropped = max(weights[n].abs()[~layers[n].mask].max() for n in layers)
    assert smallest_kept >= largest_dropped
    rows = {r["name"]: r for r in sp.stats()}
    assert rows["transformer.h.0.mlp.c_fc"]["target"] < 0.5 < rows["transformer.h.1.mlp.c_fc"]["target"]


def test_the_recipe_schema_offers_exactly_the_registry():
    choices = typing.get_args(typing.get_type_hints(SparsitySpec)["method"])
    assert set(choices) == {"none", *MASK_METHODS, "gmp", "set", "rigl"}
    assert set(typing.get_args(typing.get_type_hints(SparsitySpec)["init"])) == set(MASK_METHODS)


def test_nm_object_checks_its_arguments():
    with pytest.raises(ValueError, match="0 < n < m"):
        NM(4, 2)
