"""Properties of the dynamic algorithms over drawn settings (shapes, levels, drop fractions, schedules, seeds): every
update keeps the exact count, drops and grows disjoint sets, starts regrown entries at zero with zero optimizer state;
GMP's last update reaches exactly the target's count; a run resumed from state dicts mid-schedule continues
identically. test_dynamic.py pins the same on the tiny GPT at fixed settings."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import spdf
from spdf.sparsity import GMP, SET, RigL
from spdf.sparsity.masks import n_zeros
from spdf.sparsity.schedules import SCHEDULES, ramp
from tiny_training import linear_stack

LEVELS = st.floats(0.0, 0.95)
WIDTHS = st.integers(2, 13)


def setup(widths, level, algorithm, seed, init_seed=0):
    model = linear_stack(widths, seed=init_seed)
    sp = spdf.sparsify(model, level, seed=seed, param_filter="*", algorithm=algorithm)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sp.attach(opt)
    return model, sp, opt


def step(model, opt, i: int) -> None:
    x = torch.randn(6, model[0].in_features, generator=torch.Generator().manual_seed(i))
    model(x).square().mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(sorted(SCHEDULES)), initial=LEVELS, final=LEVELS, begin=st.integers(0, 50),
       length=st.integers(1, 500))
def test_every_schedule_is_exactly_its_values_at_and_beyond_its_ends(kind, initial, final, begin, length):
    schedule = ramp(kind, initial, final, begin, begin + length)
    assert schedule(begin) == initial and schedule(begin - 1) == initial
    assert schedule(begin + length) == schedule(begin + length + 7) == (initial if kind == "constant" else final)


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(WIDTHS, min_size=2, max_size=3), initial=st.floats(0.0, 0.5), target=LEVELS,
       every=st.integers(1, 3), updates=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
@example(widths=[5, 5], initial=0.05, target=0.22, every=1, updates=1, seed=0)  # 0.05 + (0.22 - 0.05) < 0.22
def test_gmp_reaches_exactly_the_targets_count_and_only_prunes(widths, initial, target, every, updates, seed):
    model, sp, opt = setup(widths, target, GMP(initial=initial, every=every, stop=every * updates), seed)
    for i in range(every * updates):
        before = {n: layer.mask.clone() for n, layer in sp.layers.items()}
        step(model, opt, i)
        for name, layer in sp.layers.items():
            assert not (layer.mask & ~before[name]).any(), name  # nothing regrows
            assert (layer.dense_weight()[~layer.mask] == 0).all(), name
    for name, layer in sp.layers.items():
        assert int((~layer.mask).sum()) == n_zeros(layer.mask.numel(), target), name


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(WIDTHS, min_size=2, max_size=3), level=LEVELS, rigl=st.booleans(),
       fraction=st.floats(0.0, 1.0), decay=st.booleans(), every=st.integers(1, 2), seed=st.integers(0, 2**31 - 1),
       resume_at=st.integers(1, 4))
def test_drop_and_grow_keep_counts_disjoint_sets_zeroed_regrowth_and_resume_identically(widths, level, rigl, fraction,
                                                                                     decay, every, seed, resume_at):
    def algorithm():
        drop = spdf.sparsity.Cosine(fraction, 0.0, 0, 6) if decay else fraction
        return (RigL if rigl else SET)(drop, every=every, stop=6)

    model, sp, opt = setup(widths, level, algorithm(), seed)
    counts = {n: int(layer.mask.sum()) for n, layer in sp.layers.items()}
    saved = None
    for i in range(6):
        if i == resume_at:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sp.state_dict()))
        before = {n: layer.mask.clone() for n, layer in sp.layers.items()}
        step(model, opt, i)
        for name, layer in sp.layers.items():
            mask = layer.mask
            assert int(mask.sum()) == counts[name], name  # the exact count after every update
            assert (layer.weight[~mask] == 0).all(), name
            if name not in sp.last_update or sp.step % every:
                assert torch.equal(mask, before[name]), name
                continue
            dropped, grown = sp.last_update[name]
            assert not (dropped & grown).any(), name
            assert torch.equal(dropped, before[name] & ~mask) and torch.equal(grown, ~before[name] & mask), name
            assert (layer.weight[grown] == 0).all(), name
            assert all((value[dropped | grown] == 0).all() for value in opt.state[layer.weight].values()
                       if value.shape == layer.weight.shape), name
    # a fresh process: other initial weights and masks, everything from the state dicts
    resumed, sp2, opt2 = setup(widths, level, algorithm(), seed + 1, init_seed=9)
    resumed.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sp2.load_state_dict(saved[2])
    for i in range(resume_at, 6):
        step(resumed, opt2, i)
    assert sp2.step == sp.step
    for (key, value), other in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(value, other), key


@pytest.mark.parametrize("fraction", [1.5, -0.1, spdf.sparsity.Cosine(1.2, 0.0, 0, 10)], ids=["above", "below", "ramp"])
@pytest.mark.parametrize("algorithm", [SET, RigL])
def test_a_drop_fraction_outside_0_1_is_refused(algorithm, fraction):
    # above 1 it dropped masked entries too and grew some of them back: the counts and disjointness were lost
    with pytest.raises(ValueError, match="drop_fraction is a fraction of the kept weights, in \\[0, 1\\]"):
        algorithm(fraction, every=1)
