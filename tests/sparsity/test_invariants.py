"""DESIGN.md invariants: masked weights stay exactly zero through real training, masks are a pure function of
(seed, name, shape), and densify() is bit-exact and lets the formerly masked weights learn."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import spdf
from spdf.sparsity import sparse_layers

SPARSITY = 0.75
STATE_KEYS = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "exp_inf", "square_avg"}


def micro_batches(n, seed=0, batch=2, seq=16, vocab=128):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        yield idx[:, :-1], idx[:, 1:]


def train(model, optimizer, steps=50, accum=2, clip=1.0, autocast=True, seed=0):
    model.train()
    data = micro_batches(steps * accum, seed=seed)
    for _ in range(steps):
        for _ in range(accum):
            idx, tgt = next(data)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                _, loss = model(idx, tgt)
            (loss / accum).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def assert_exactly_sparse(model, level=SPARSITY):
    layers = sparse_layers(model)
    assert len(layers) == 8
    for name, layer in layers.items():
        w, mask = layer.weight, layer.weight_mask
        assert (w[~mask] == 0.0).all(), f"{name}: a masked weight is non-zero"
        assert int((w == 0).sum()) == round(level * w.numel()), f"{name}: sparsity count drifted"
        assert int((~mask).sum()) == round(level * w.numel())


OPTIMIZERS = {
    "adamw-wd": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adam-no-decay": lambda p: torch.optim.Adam(p, lr=3e-3),
    "adamw-fused-amsgrad": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1, fused=True, amsgrad=True),
    # not in ZERO_PRESERVING: re-zeroed every step (Adamax's exp_inf would otherwise become eps at masked positions)
    "adamax": lambda p: torch.optim.Adamax(p, lr=3e-3, weight_decay=0.01),
    "rmsprop-momentum": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_training_keeps_masked_weights_and_optimizer_state_exactly_zero(make_gpt, opt_name):
    model = make_gpt()
    sp = spdf.sparsify(model, sparsity=SPARSITY, seed=0)
    masks = {n: l.weight_mask.clone() for n, l in sparse_layers(model).items()}
    before = {n: l.weight.detach().clone() for n, l in sparse_layers(model).items()}
    opt = OPTIMIZERS[opt_name](model.parameters())
    sp.attach(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an attached model must not warn
        train(model, opt, steps=50 if opt_name == "adamw-wd" else 20)
    assert_exactly_sparse(model)
    for name, layer in sparse_layers(model).items():
        assert torch.equal(layer.weight_mask, masks[name])
        # Training really happened at the kept positions.
        assert not torch.equal(layer.weight[masks[name]], before[name][masks[name]])
        state = opt.state[layer.weight]
        seen = STATE_KEYS & set(state)
        assert seen, f"no optimizer state for {name}"
        for key in seen:
            assert (state[key][~layer.weight_mask] == 0).all(), f"{name}: {key} non-zero at a masked position"


def test_attach_zeroes_optimizer_state_built_before_sparsify(make_gpt):
    """Sparsify a model that was trained densely: the optimizer's moments are non-zero at masked positions, so
    without attach() the masked weights would move. attach() must zero them."""
    def run(attach):
        model = make_gpt()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        train(model, opt, steps=3, autocast=False)
        sp = spdf.sparsify(model, sparsity=SPARSITY, seed=0)
        if attach:
            sp.attach(opt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(model, opt, steps=3, autocast=False)
        return model

    unattached = run(attach=False)
    assert any((l.weight[~l.weight_mask] != 0).any() for l in sparse_layers(unattached).values()), \
        "control failed: the test could not tell attach() from no attach()"
    assert_exactly_sparse(run(attach=True))


def test_optimizer_state_loaded_later_is_re_zeroed(make_gpt):
    model = make_gpt()
    sp = spdf.sparsify(model, sparsity=SPARSITY, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sp.attach(opt)
    train(model, opt, steps=1, autocast=False)
    state = opt.state_dict()
    for s in state["state"].values():
        s["exp_avg"].fill_(1.0)  # a foreign / corrupted state with non-zeros everywhere
    opt.load_state_dict(state)
    for layer in sparse_layers(model).values():
        assert (opt.state[layer.weight]["exp_avg"][~layer.weight_mask] == 0).all()
    train(model, opt, steps=2, autocast=False)
    assert_exactly_sparse(model)


def test_attach_unwraps_a_wrapped_optimizer(make_gpt):
    class Wrapper:  # accelerate's AcceleratedOptimizer keeps the real one in `.optimizer`
        def __init__(self, optimizer):
            self.optimizer = optimizer

    model = make_gpt()
    sp = spdf.sparsify(model, sparsity=SPARSITY, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sp.attach(Wrapper(opt))
    train(model, opt, steps=2, autocast=False)
    for layer in sparse_layers(model).values():
        assert (opt.state[layer.weight]["exp_avg_sq"][~layer.weight_mask] == 0).all()


def test_masks_are_identical_across_fresh_models_with_the_same_seed(make_gpt):
    a, b, c = make_gpt(seed=1), make_gpt(seed=2), make_gpt(seed=1)
    spdf.sparsify(a, sparsity=0.5, seed=11)
    spdf.sparsify(b, sparsity=0.5, seed=11)  # different weights, same mask seed
    spdf.sparsify(c, sparsity=0.5, seed=12)
    la, lb, lc = sparse_layers(a), sparse_layers(b), sparse_layers(c)
    for name in la:
        assert torch.equal(la[name].weight_mask, lb[name].weight_mask), name
        assert not torch.equal(la[name].weight_mask, lc[name].weight_mask), name
    # Layers of the same shape in different blocks get different masks (the name enters the hash).
    assert not torch.equal(la["transformer.h.0.mlp.c_fc"].weight_mask, la["transformer.h.1.mlp.c_fc"].weight_mask)


def test_masked_gradients_are_zero_after_backward_and_accumulation(make_gpt, batch):
    model = make_gpt()
    spdf.sparsify(model, sparsity=SPARSITY, seed=0)
    idx, tgt = batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            model(idx, tgt)[1].backward()
    for name, layer in sparse_layers(model).items():
        g = layer.weight.grad
        assert (g[~layer.weight_mask] == 0).all(), name
        assert (g[layer.weight_mask] != 0).any(), name
    # Unsparsified parameters get ordinary gradients.
    assert (model.transformer.wte.weight.grad != 0).any()


def test_training_without_attach_warns_once_per_layer(make_gpt, batch):
    model = make_gpt()
    sp = spdf.sparsify(model, sparsity=0.5)
    idx, tgt = batch
    with pytest.warns(UserWarning, match=r"attach\(optimizer\)") as record:
        model(idx, tgt)
    n = sum("attach" in str(w.message) for w in record)
    assert 1 <= n <= 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(idx, tgt)  # already warned
    fresh = make_gpt()
    sp = spdf.sparsify(fresh, sparsity=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.eval()
        fresh(idx, tgt)  # evaluation does not warn
        fresh.train()
        with torch.no_grad():
            fresh(idx, tgt)
        sp.attach(torch.optim.SGD(fresh.parameters(), lr=0.1))
        fresh(idx, tgt)  # attached: no warning


def test_densify_is_bit_exact_plain_and_lets_masked_weights_learn(make_gpt, batch):
    model = make_gpt()
    sp = spdf.sparsify(model, sparsity=SPARSITY, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sp.attach(opt)
    train(model, opt, steps=5)
    masks = {n: l.weight_mask.clone() for n, l in sparse_layers(model).items()}
    idx, tgt = batch
    model.eval()
    with torch.no_grad():
        sparse_logits, sparse_loss = model(idx, tgt)
    spdf.densify(model)
    with torch.no_grad():
        dense_logits, dense_loss = model(idx, tgt)
    assert torch.equal(dense_logits, sparse_logits) and torch.equal(dense_loss, sparse_loss)
    for name in masks:
        module = model.get_submodule(name)
        assert type(module) is nn.Linear, name
        assert not hasattr(module, "weight_mask")
        assert (module.weight[~masks[name]] == 0).all()  # zeros in place
    assert not any(k.endswith("weight_mask") for k in model.state_dict())
    assert not sparse_layers(model)

    model.train()
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(idx, tgt)[1].backward()
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        assert (w.grad[~mask] != 0).all(), f"{name}: a formerly masked weight gets no gradient"
    fresh.step()
    for name, mask in masks.items():
        assert (model.get_submodule(name).weight[~mask] != 0).all(), name


def test_the_pretraining_optimizer_no_longer_masks_after_densify(make_gpt, batch):
    model = make_gpt()
    sp = spdf.sparsify(model, sparsity=SPARSITY, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sp.attach(opt)
    train(model, opt, steps=2, autocast=False)
    masks = {n: l.weight_mask.clone() for n, l in sparse_layers(model).items()}
    spdf.densify(model)
    train(model, opt, steps=1, autocast=False)  # the attached step hook is still registered
    for name, mask in masks.items():
        assert (model.get_submodule(name).weight[~mask] != 0).any(), name


def test_deepcopied_sparse_model_still_masks_gradients(make_gpt, batch):
    model = make_gpt()
    spdf.sparsify(model, sparsity=SPARSITY, seed=0)
    twin = copy.deepcopy(model)
    idx, tgt = batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin(idx, tgt)[1].backward()
    for name, layer in sparse_layers(twin).items():
        assert (layer.weight.grad[~layer.weight_mask] == 0).all(), name
