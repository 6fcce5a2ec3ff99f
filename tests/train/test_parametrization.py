"""µP and SµPar on the trainer's side: LR scales in param groups, SµPar's init, densify, GMP's moving density."""
from __future__ import annotations

import math

import pytest
import torch

import spdf
from spdf import GPT, GPTConfig
from spdf.sparsity import GMP, sparse_layers
from spdf.train.optim import build_adamw, param_groups
from spdf.train.parametrization import LearningRates, apply_supar_init

HIDDEN = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def tiny(parametrization: str, d_model: int = 64, base_width: int = 32, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, d_model=d_model, d_ff=4 * d_model, n_ctx=32, vocab_size=128,
                         parametrization=parametrization, base_width=base_width))


def scale_of(groups: list[dict]) -> dict[int, tuple[float, float]]:
    """id(param) → (lr_scale, weight_decay) of its group."""
    return {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_sp_keeps_the_two_plain_groups():
    groups = param_groups(tiny("sp"), 0.1)
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.1, 1.0), (0.0, 1.0)]


def test_mup_scales_hidden_weights_by_one_over_width_mult_only():
    model = tiny("mup")  # width_mult 64 / 32 = 2
    scales = scale_of(param_groups(model, 0.1))
    for name, p in model.named_parameters():
        hidden = name.endswith(tuple(f"{h}.weight" for h in HIDDEN))
        decays = p.dim() >= 2
        assert scales[id(p)] == ((0.5 if hidden else 1.0), 0.1 if decays else 0.0), name
    assert scales[id(model.transformer.wte.weight)] == (1.0, 0.1)  # the tied head trains as the embedding


def test_supar_scale_follows_each_layers_own_density():
    model = tiny("supar")
    spdf.sparsify(model, sparsity=0.75, overrides={"*mlp.c_fc*": 0.5}, seed=0)
    groups = param_groups(model, 0.1)
    scales = scale_of(groups)
    for name, layer in sparse_layers(model).items():
        density = int(layer.mask.sum()) / layer.mask.numel()
        assert density == pytest.approx(0.5 if "c_fc" in name else 0.25, abs=1e-3)
        assert scales[id(layer.weight)] == (1.0 / (2 * density), 0.1), name
    named = [g["sparse_layer"] for g in groups if "sparse_layer" in g]
    assert sorted(named) == sorted(sparse_layers(model))  # one group per sparse layer


def test_mup_ignores_density_and_supar_with_no_sparsity_is_mup():
    sparse_mup = tiny("mup")
    spdf.sparsify(sparse_mup, sparsity=0.75, seed=0)
    assert {s for s, _ in scale_of(param_groups(sparse_mup, 0.1)).values()} == {1.0, 0.5}
    dense_supar, dense_mup = tiny("supar"), tiny("mup")
    assert [g["lr_scale"] for g in param_groups(dense_supar, 0.1)] == [g["lr_scale"] for g in
                                                                        param_groups(dense_mup, 0.1)]


def test_mup_init_stds():
    model = tiny("mup", d_model=256, base_width=64)  # width_mult 4, 2 layers
    std = lambda t: t.detach().float().std().item()  # noqa: E731
    trunc = 0.8796  # std of a normal truncated at 2 std
    assert std(model.transformer.wte.weight) == pytest.approx(0.08 * trunc, rel=0.03)
    block = model.transformer.h[0]
    assert std(block.mlp.c_fc.weight) == pytest.approx(0.08 / 2 * trunc, rel=0.03)
    assert std(block.mlp.c_proj.weight) == pytest.approx(0.08 / math.sqrt(2 * 2 * 4) * trunc, rel=0.03)


@pytest.mark.parametrize("backend", ["masked", "compressed"])
def test_supar_init_scales_kept_weights_by_one_over_sqrt_density(backend):
    mup, supar = tiny("mup"), tiny("supar")  # the same init draws: the models differ only by SµPar's correction
    kw = dict(sparsity=0.75, seed=0, backend=backend, **({"tile": (16, 16)} if backend == "compressed" else {}))
    spdf.sparsify(mup, **kw)
    spdf.sparsify(supar, **kw)
    apply_supar_init(mup)  # no-op under mup
    apply_supar_init(supar)
    for (name, a), b in zip(sparse_layers(mup).items(), sparse_layers(supar).values()):
        wa, wb = a.dense_weight(), b.dense_weight()
        assert torch.equal(wb[~b.mask], torch.zeros_like(wb[~b.mask])), name  # masked entries stay zero
        torch.testing.assert_close(wb, wa * 2.0, rtol=1e-6, atol=0)  # 1/sqrt(0.25)


def test_supar_init_keeps_a_magnitude_mask_consistent():
    model = tiny("supar")
    spdf.sparsify(model, sparsity=0.5, init="magnitude", seed=0)
    apply_supar_init(model)
    for layer in sparse_layers(model).values():
        w = layer.dense_weight().abs()
        assert w[layer.mask].min() >= w[~layer.mask].max()  # the kept weights are still the largest ones


def test_densify_gives_mup_scales_for_dense_fine_tuning():
    model = tiny("supar")
    sp = spdf.sparsify(model, sparsity=0.75, seed=0)
    assert {s for s, _ in scale_of(param_groups(model, 0.1)).values()} == {1.0, 1.0 / (2 * 0.25)}
    sp.detach()
    spdf.densify(model)
    groups = param_groups(model, 0.1)
    assert {s for s, _ in scale_of(groups).values()} == {1.0, 0.5}
    assert not any("sparse_layer" in g for g in groups)


def test_gmp_lr_scales_follow_the_density_as_masks_change():
    model = tiny("supar")
    sp = spdf.sparsify(model, sparsity=0.75, algorithm=GMP(initial=0.0, every=2, stop=6), seed=0)
    apply_supar_init(model)  # GMP starts dense: nothing to correct
    opt = build_adamw(model, 1e-3, (0.9, 0.95), 1e-8, 0.1)
    sp.attach(opt)
    rates = LearningRates(opt, model, sp)
    idx = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    seen = []
    for _ in range(8):
        rates.set(1e-3)
        layers = sparse_layers(model)
        for g in opt.param_groups:
            if "sparse_layer" in g:
                density = layers[g["sparse_layer"]].density
                assert g["lr_scale"] == 1.0 / (2 * density)
                assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        seen.append(next(g["lr_scale"] for g in opt.param_groups if "sparse_layer" in g))
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert seen[0] == 0.5 and seen[-1] == pytest.approx(1.0 / (2 * 0.25), rel=1e-3)  # dense µP -> 75% SµPar
    assert seen == sorted(seen) and len(set(seen)) == 4  # rises at every update (after steps 2, 4, 6)
