"""The library's edges (issue 21 §5): frozen weights, all-or-nothing sparsify, the meta device, loads that would break
the invariant; and which optimizers get their weights re-zeroed after a step (issue 19 §2)."""
from __future__ import annotations

import pytest
import torch

import spdf
from spdf.sparsity import SparseLinear, sparse_layers
from spdf.sparsity.compressed import CompressedSparseLinear

from test_invariants import SPARSITY, assert_exactly_sparse, train


def _frozen_block(model) -> list[str]:
    block = model.transformer.h[0]
    for p in block.parameters():
        p.requires_grad_(False)
    return [f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


@pytest.mark.parametrize("backend", ["masked", "compressed"])
def test_frozen_weights_are_sparsified_and_stay_frozen_and_sparse(make_gpt, backend):
    model = make_gpt()
    frozen = _frozen_block(model)
    sp = spdf.sparsify(model, SPARSITY, seed=0, backend=backend)
    layers = sparse_layers(model)
    assert len(layers) == 8
    for name in frozen:
        assert not any(p.requires_grad for p in layers[name].weight_parameters())
    before = {n: layers[n].dense_weight().clone() for n in frozen}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.1)
    sp.attach(opt)
    train(model, opt, steps=3)
    for name in frozen:
        assert torch.equal(layers[name].dense_weight(), before[name])
        assert (layers[name].dense_weight()[~layers[name].mask] == 0).all()
    if backend == "masked":
        assert_exactly_sparse(model)


@pytest.mark.parametrize("backend", ["masked", "compressed"])
def test_densify_keeps_a_frozen_weight_frozen_whatever_the_backend(make_gpt, backend):
    # a LoRA base densified to merge its adapters: the compressed backend gave it a new weight that trained
    model = make_gpt()
    frozen = _frozen_block(model)
    spdf.sparsify(model, SPARSITY, seed=0, backend=backend)
    spdf.densify(model)
    for name, module in model.transformer.named_modules(prefix="transformer"):
        if isinstance(module, torch.nn.Linear):
            assert module.weight.requires_grad == (name not in frozen), name


def test_a_frozen_weight_that_trains_later_is_hooked_then(make_gpt):
    model = make_gpt()
    frozen = _frozen_block(model)
    sp = spdf.sparsify(model, SPARSITY, seed=0)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sp.attach(opt)
    before = {n: sparse_layers(model)[n].weight.detach().clone() for n in frozen}
    train(model, opt, steps=3)
    assert_exactly_sparse(model)
    for name in frozen:
        layer = sparse_layers(model)[name]
        assert not torch.equal(layer.weight, before[name])  # it trained
        assert (opt.state[layer.weight]["exp_avg"][~layer.weight_mask] == 0).all()


@pytest.mark.parametrize("backend", ["masked", "compressed"])
def test_a_failure_while_building_the_layers_leaves_the_model_untouched(make_gpt, monkeypatch, backend):
    model = make_gpt()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {n: m for n, m in model.named_modules()}
    built = []
    cls, name = (SparseLinear, "__init__") if backend == "masked" else (CompressedSparseLinear, "from_dense")
    real = getattr(cls, name)

    def fails_third(*args, **kwargs):
        if len(built) == 2:
            raise RuntimeError("out of memory (simulated)")
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cls, name, fails_third if backend == "masked" else staticmethod(fails_third))
    with pytest.raises(RuntimeError, match="simulated"):
        spdf.sparsify(model, SPARSITY, seed=0, backend=backend)
    monkeypatch.undo()
    assert not sparse_layers(model)
    assert {n: m for n, m in model.named_modules()} == modules  # the same module objects, none swapped
    after = model.state_dict()
    assert set(after) == set(weights) and all(torch.equal(after[k], v) for k, v in weights.items())
    spdf.sparsify(model, SPARSITY, seed=0, backend=backend)  # and it can be sparsified now
    assert len(sparse_layers(model)) == 8


def test_the_meta_device_is_refused_before_anything_changes():
    with torch.device("meta"):
        model = spdf.GPT.from_name("tiny-test")
    with pytest.raises(ValueError, match="meta device.*materialise it first"):
        spdf.sparsify(model, SPARSITY, seed=0)
    assert not sparse_layers(model)


def test_load_state_dict_zeroes_values_at_masked_positions(make_gpt, batch):
    model = make_gpt()
    sp = spdf.sparsify(model, SPARSITY, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name in sparse_layers(model):
        state[f"{name}.weight"].fill_(0.5)  # non-zero everywhere, masked positions included
    model.load_state_dict(state)
    for layer in sparse_layers(model).values():
        assert (layer.weight[~layer.weight_mask] == 0).all() and (layer.weight[layer.weight_mask] == 0.5).all()
    assert_exactly_sparse(model)
    assert sp.layers  # the sparsifier still sees the same layers


def test_a_loaded_state_with_other_masks_is_kept_exact_under_an_attached_optimizer(make_gpt):
    model, other = make_gpt(), make_gpt(seed=1)
    sp = spdf.sparsify(model, SPARSITY, seed=0)
    sp_other = spdf.sparsify(other, SPARSITY, seed=7)  # other masks, same sparsity
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sp.attach(opt)
    train(model, opt, steps=2, autocast=False)  # AdamW moments are non-zero at the kept positions of these masks
    model.load_state_dict(other.state_dict())
    train(model, opt, steps=2, autocast=False)
    assert_exactly_sparse(model)
    for name, layer in sparse_layers(model).items():
        assert torch.equal(layer.weight_mask, sparse_layers(other)[name].weight_mask)
        for key in ("exp_avg", "exp_avg_sq"):
            assert (opt.state[layer.weight][key][~layer.weight_mask] == 0).all(), (name, key)
    assert sp_other.layers


def test_load_masks_refuses_masks_that_contradict_the_target_sparsity(make_gpt):
    model = make_gpt()
    sp = spdf.sparsify(model, SPARSITY, seed=0)
    half = spdf.sparsify(make_gpt(), 0.5, seed=0).masks()
    before = sp.masks()
    with pytest.raises(ValueError, match=r"keeps .*\(target sparsity 0\.7500\)"):
        sp.load_masks(half)
    assert all(torch.equal(before[k], m) for k, m in sp.masks().items())  # nothing installed
    other = spdf.sparsify(make_gpt(), SPARSITY, seed=3).masks()
    sp.load_masks(other)  # other masks at the target sparsity: accepted (regrown entries start at zero)
    assert all(torch.equal(other[k], m) for k, m in sp.masks().items())
    assert all((layer.weight[~layer.weight_mask] == 0).all() for layer in sparse_layers(model).values())


class Nudge(torch.optim.Optimizer):
    """An update rule that moves zeros: plain SGD, then every entry pushed by a constant. (Not an SGD subclass
    calling super().step(): torch runs the step hooks of both classes' wrapped step methods then.)"""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
                p.add_(1e-3)


@pytest.mark.parametrize("opt_name", ["adamw", "nudge"])
def test_weights_are_re_zeroed_after_a_step_only_where_the_update_rule_can_move_a_zero(make_gpt, monkeypatch,
                                                                                        opt_name):
    calls = []
    real = SparseLinear.enforce
    monkeypatch.setattr(SparseLinear, "enforce", lambda self, *a, **k: (calls.append(1), real(self, *a, **k)))
    model = make_gpt()
    sp = spdf.sparsify(model, SPARSITY, seed=0)
    opt = (torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1) if opt_name == "adamw"
           else Nudge(model.parameters(), lr=0.01))
    sp.attach(opt)
    assert len(calls) == 8  # attach zeroes every layer once
    train(model, opt, steps=4)
    assert_exactly_sparse(model)
    assert len(calls) == (8 if opt_name == "adamw" else 8 + 4 * 8)
    if opt_name == "adamw":  # a load changes weights outside a step: the next step re-zeroes everything once
        model.load_state_dict(model.state_dict())
        train(model, opt, steps=2)
        assert len(calls) == 16
