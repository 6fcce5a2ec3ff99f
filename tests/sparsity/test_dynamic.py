"""Dynamic sparsity (GMP, SET, RigL) on the Sparsifier: the invariants of every mask update."""
import copy
import math

import pytest
import torch

import spdf
from spdf.sparsity import GMP, SET, Constant, Cosine, Cubic, Linear, RigL, Static, sparse_layers
from spdf.sparsity.masks import n_zeros


def _data(model, n=4):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, model.config.vocab_size, (4, 17), generator=g) for _ in range(n)]


def _step(model, opt, idx, accum=1):
    for _ in range(accum):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        (loss / accum).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _setup(make_gpt, algorithm, sparsity=0.75, seed=0):
    model = make_gpt()
    sp = spdf.sparsify(model, sparsity=sparsity, seed=seed, algorithm=algorithm)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    sp.attach(opt)
    return model, sp, opt


def test_schedules():
    cos = Cosine(0.3, 0.0, 0, 3584)
    assert cos(0) == 0.3 and cos(1792) == pytest.approx(0.15) and cos(3584) == 0.0 and cos(5000) == 0.0
    cubic = Cubic(0.0, 0.75, 100, 200)
    assert cubic(100) == 0.0 and cubic(150) == pytest.approx(0.75 * (1 - 0.5 ** 3)) and cubic(300) == 0.75
    assert Linear(1.0, 0.0, 0, 10)(5) == 0.5 and Constant(0.3)(10 ** 6) == 0.3


@pytest.mark.parametrize("algorithm", [SET(0.3, every=2), RigL(0.3, every=2)], ids=["set", "rigl"])
def test_drop_and_grow_invariants(make_gpt, algorithm):
    model, sp, opt = _setup(make_gpt, algorithm)
    counts = {n: int(layer.mask.sum()) for n, layer in sparse_layers(model).items()}
    changed_any = False
    for i, idx in enumerate(_data(model, 6)):
        before = {n: layer.mask.clone() for n, layer in sparse_layers(model).items()}
        _step(model, opt, idx)
        updated = sp.step % 2 == 0
        for name, layer in sparse_layers(model).items():
            mask = layer.mask
            assert int(mask.sum()) == counts[name], name  # exact per-tensor count after every update
            assert (layer.weight[~layer.weight_mask] == 0).all()
            if not updated:
                assert torch.equal(mask, before[name])
                continue
            dropped, grown = sp.last_update[name]
            assert not (dropped & grown).any()  # disjoint
            assert torch.equal(dropped, before[name] & ~mask) and torch.equal(grown, ~before[name] & mask)
            assert int(dropped.sum()) == int(grown.sum()) == round(0.3 * counts[name])
            assert (layer.dense_weight()[grown] == 0).all()  # regrown weights start at zero
            state = opt.state[layer.weight]
            for key in ("exp_avg", "exp_avg_sq"):  # every state tensor reset at changed entries
                assert (state[key][dropped | grown] == 0).all(), key
                assert (state[key][~mask] == 0).all(), key
            changed_any = True
        if updated:
            # a mask change re-arms the full re-zero (weights and every state tensor) after the next step
            assert sp._optimizers[0].versions != tuple(layer.zeros_version for layer in sp.layers.values())
    assert changed_any


def test_rigl_grows_where_the_dense_gradient_is_largest_and_keeps_it_only_on_update_steps(make_gpt):
    model, sp, opt = _setup(make_gpt, RigL(0.3, every=2))
    data = _data(model, 2)
    layer = model.transformer.h[0].mlp.c_fc
    # step 1: not an update step -- gradients masked, no dense gradient kept
    _, loss = model(data[0][:, :-1], data[0][:, 1:])
    loss.backward()
    assert (layer.weight.grad[~layer.weight_mask] == 0).all() and layer.dense_grad is None
    opt.step()
    opt.zero_grad()
    # step 2: an update step -- the gradient stays dense until the optimizer step
    mask_before = layer.mask.clone()
    _, loss = model(data[1][:, :-1], data[1][:, 1:])
    loss.backward()
    dense = layer.weight.grad.clone()
    assert (dense[~layer.weight_mask] != 0).any()
    opt.step()
    dropped, grown = sp.last_update["transformer.h.0.mlp.c_fc"]
    k = int(grown.sum())
    expected = torch.topk(dense.abs().masked_fill(mask_before, -1).flatten(), k).indices
    assert set(grown.flatten().nonzero().flatten().tolist()) == set(expected.tolist())
    assert layer.dense_grad is None  # dropped after the update
    # the step itself used masked gradients: the optimizer state is zero off the old and new masks
    assert (opt.state[layer.weight]["exp_avg"][~layer.weight_mask] == 0).all()
    opt.zero_grad()
    _, loss = model(data[0][:, :-1], data[0][:, 1:])
    loss.backward()  # step 3: masked again
    assert (layer.weight.grad[~layer.weight_mask] == 0).all()


def test_gmp_follows_its_cubic_schedule_exactly_and_only_prunes(make_gpt):
    model, sp, opt = _setup(make_gpt, GMP(initial=0.0, every=2, stop=8))
    assert all(layer.density == 1.0 for layer in sparse_layers(model).values())
    assert all(layer.target_sparsity == 0.75 for layer in sparse_layers(model).values())
    for idx in _data(model, 5) * 2:
        before = {n: layer.mask.clone() for n, layer in sparse_layers(model).items()}
        _step(model, opt, idx)
        level = Cubic(0.0, 0.75, 0, 8)(min(sp.step - sp.step % 2, 8))
        for name, layer in sparse_layers(model).items():
            assert int((~layer.mask).sum()) == n_zeros(layer.mask.numel(), level), (name, sp.step)
            assert not (layer.mask & ~before[name]).any()  # nothing regrows
            assert (layer.weight[~layer.weight_mask] == 0).all()
    assert all(int((~layer.mask).sum()) == n_zeros(layer.mask.numel(), 0.75)
               for layer in sparse_layers(model).values())  # the last update reached the target


def test_updates_only_on_real_optimizer_steps(make_gpt):
    model, sp, opt = _setup(make_gpt, SET(0.3, every=1))
    data = _data(model, 2)
    masks = {n: layer.mask.clone() for n, layer in sparse_layers(model).items()}
    for _ in range(3):  # accumulating gradients without stepping: nothing happens
        _, loss = model(data[0][:, :-1], data[0][:, 1:])
        loss.backward()
    assert sp.step == 0 and all(torch.equal(l.mask, masks[n]) for n, l in sparse_layers(model).items())
    # a step the AMP grad scaler skips (inf gradient) is no step
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    opt.zero_grad()
    _, loss = model(data[0][:, :-1], data[0][:, 1:])
    scaler.scale(loss).backward()
    model.transformer.h[0].mlp.c_fc.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert sp.step == 0 and all(torch.equal(l.mask, masks[n]) for n, l in sparse_layers(model).items())
    opt.zero_grad()
    _, loss = model(data[1][:, :-1], data[1][:, 1:])
    scaler.scale(loss).backward()
    scaler.step(opt)
    assert sp.step == 1 and any(not torch.equal(l.mask, masks[n]) for n, l in sparse_layers(model).items())


def test_update_schedule_frequency_start_and_stop(make_gpt):
    model, sp, opt = _setup(make_gpt, SET(0.3, every=2, begin=1, stop=5))
    seen = []
    for idx in _data(model, 4) * 2:
        before = {n: layer.mask.clone() for n, layer in sparse_layers(model).items()}
        _step(model, opt, idx)
        if any(not torch.equal(l.mask, before[n]) for n, l in sparse_layers(model).items()):
            seen.append(sp.step)
    assert seen == [3, 5]


def test_identical_decisions_from_identical_state_and_seeded_randomness(make_gpt):
    # Two replicas (as two ranks hold after DDP's all-reduce): the same weights and gradients give the same masks.
    runs = []
    for _ in range(2):
        model, sp, opt = _setup(make_gpt, SET(0.3, every=1))
        for idx in _data(model, 3):
            _step(model, opt, idx)
        runs.append({n: layer.mask.clone() for n, layer in sparse_layers(model).items()})
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_sparsifier_state_resumes_mid_schedule_exactly(make_gpt):
    model, sp, opt = _setup(make_gpt, RigL(Cosine(0.3, 0.0, 0, 8), every=2, stop=8))
    data = _data(model, 4)
    for idx in data[:3]:
        _step(model, opt, idx)
    saved_model, saved_opt, saved_sp = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
                                        sp.state_dict())
    for idx in data[3:] + data[:3]:
        _step(model, opt, idx)
    expected = {n: layer.mask.clone() for n, layer in sparse_layers(model).items()}
    weights = copy.deepcopy(model.state_dict())

    torch.manual_seed(123)  # a fresh process: other init, other masks
    model2, sp2, opt2 = _setup(make_gpt, RigL(Cosine(0.3, 0.0, 0, 8), every=2, stop=8), seed=5)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    sp2.load_state_dict(saved_sp)
    assert sp2.step == 3
    for idx in data[3:] + data[:3]:
        _step(model2, opt2, idx)
    assert all(torch.equal(expected[n], l.mask) for n, l in sparse_layers(model2).items())
    for key, value in model2.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_compressed_backend_refuses_dynamic_algorithms(make_gpt):
    model = make_gpt()
    with pytest.raises(ValueError, match="static masks only"):
        spdf.sparsify(model, sparsity=0.75, backend="compressed", algorithm=RigL())
    assert not sparse_layers(model)  # left as it came


def test_gmp_needs_a_stop_and_static_is_the_default(make_gpt):
    with pytest.raises(ValueError, match="stop"):
        GMP(initial=0.0)
    sp = spdf.sparsify(make_gpt(), sparsity=0.5)
    assert isinstance(sp.algorithm, Static) and sp.config["algorithm"] == "static"
