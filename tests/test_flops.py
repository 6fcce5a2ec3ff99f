"""FLOP accounting: the paper's headline reductions, the component breakdown, and measured vs analytic counts."""
import json
import warnings
from pathlib import Path

import pytest
import torch

import spdf
from spdf import GPTConfig
from spdf.flops import COMPONENTS, analytic_flops, format_table, measure_training_flops, model_flops


@pytest.mark.parametrize("name,sparsity,reduction", [("gpt3-xl", 0.75, 2.49), ("gpt3-xl", 0.5, 1.67),
                                                     ("gpt3-small", 0.75, 1.65)])
def test_paper_headline_reductions(name, sparsity, reduction):
    fb = analytic_flops(GPTConfig.from_name(name), sparsity)
    assert fb.reduction == pytest.approx(reduction, abs=0.01)


def test_component_breakdown_by_hand_and_sums():
    cfg = GPTConfig.from_name("gpt3-xl")
    fb = analytic_flops(cfg, 0.75, seq_len=2048)
    L, d, T, V = 24, 2048, 2048, 50257
    expected = {"qkv": L * 6 * d * d, "attn_out": L * 2 * d * d, "mlp_in": L * 8 * d * d, "mlp_out": L * 8 * d * d,
                "attn_scores": L * 4 * T * d, "logits": 2 * d * V}
    assert set(fb.dense_forward) == set(COMPONENTS)
    assert fb.dense_forward == expected
    for c in ("qkv", "attn_out", "mlp_in", "mlp_out"):
        assert fb.sparse_forward[c] == pytest.approx(0.25 * expected[c])
    for c in ("attn_scores", "logits"):
        assert fb.sparse_forward[c] == expected[c]
    assert fb.dense_train == pytest.approx(3 * sum(expected.values()))
    assert fb.sparse_train == pytest.approx(3 * sum(fb.sparse_forward.values()))
    assert fb.reduction == pytest.approx(fb.dense_train / fb.sparse_train)
    # Kaplan's 6·N per token for the non-embedding weights, plus attention and logits.
    non_emb = 12 * L * d * d
    assert fb.dense_train == pytest.approx(6 * non_emb + 3 * (L * 4 * T * d + 2 * d * V))
    d_ = fb.to_dict()
    assert d_["reduction"] == fb.reduction and "2·MACs" in d_["convention"]


def test_dense_is_reduction_one_and_sparsity_grows_it():
    cfg = GPTConfig.from_name("gpt3-small")
    assert analytic_flops(cfg, 0.0).reduction == 1.0
    reds = [analytic_flops(cfg, s).reduction for s in (0.0, 0.25, 0.5, 0.75, 0.9)]
    assert reds == sorted(reds) and len(set(reds)) == 5


def test_shorter_sequences_make_sparsity_pay_more():
    cfg = GPTConfig.from_name("gpt3-xl")
    assert analytic_flops(cfg, 0.75, seq_len=512).reduction > analytic_flops(cfg, 0.75, seq_len=2048).reduction


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_sparsity_is_a_value_error(bad):
    with pytest.raises(ValueError, match="sparsity"):
        analytic_flops(GPTConfig.from_name("tiny-test"), bad)


def test_format_table_lists_every_component():
    text = format_table("gpt3-xl", analytic_flops(GPTConfig.from_name("gpt3-xl"), 0.75), "75% sparse", tokens=1e9)
    assert "2.49x" in text and "total for 1e+09 tokens" in text
    for label in ("Q, K, V", "output projection", "up-projection", "down-projection", "scores", "logits"):
        assert label in text


# ---- measured vs analytic on a real tiny model --------------------------------------------------------------------
def measured_vs_model(model, seq=32):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 128, (2, seq + 1), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = measure_training_flops(model, idx[:, :-1], idx[:, 1:])
    return measured, model_flops(model, seq_len=seq)


def test_measured_dense_model_matches_analytic(make_gpt):
    model = make_gpt()
    measured, fb = measured_vs_model(model)
    assert measured["tokens"] == 64
    assert measured["spent"] == measured["dense"]
    assert fb.reduction == 1.0
    assert measured["dense_per_token"] == pytest.approx(fb.dense_train, rel=0.01)


@pytest.mark.parametrize("kwargs", [dict(sparsity=0.5), dict(sparsity=0.75), dict(sparsity=0.75, init="erk"),
                                    dict(sparsity=0.75, overrides={"*attn*": 0.25, "transformer.h.1.*": 0.9}),
                                    dict(sparsity=0.5, param_filter="*mlp*")],
                         ids=["0.5", "0.75", "erk", "overrides", "mlp-only"])
def test_measured_sparse_model_matches_analytic(make_gpt, kwargs):
    model = make_gpt()
    spdf.sparsify(model, seed=0, **kwargs)
    measured, fb = measured_vs_model(model)
    assert measured["dense_per_token"] == pytest.approx(fb.dense_train, rel=0.01)
    assert measured["spent_per_token"] == pytest.approx(fb.sparse_train, rel=0.01)
    assert measured["dense"] / measured["spent"] == pytest.approx(fb.reduction, rel=0.01)
    assert fb.reduction > 1.05


def test_model_flops_reads_non_uniform_densities(make_gpt):
    model = make_gpt()
    spdf.sparsify(model, sparsity=0.75, overrides={"*attn.c_proj*": 0.0, "transformer.h.0.mlp.c_fc*": 0.5})
    fb = model_flops(model, seq_len=16)
    dense = analytic_flops(model.config, seq_len=16).dense_forward
    assert fb.sparse_forward["attn_out"] == pytest.approx(dense["attn_out"])
    assert fb.sparse_forward["mlp_in"] == pytest.approx(dense["mlp_in"] * (0.5 + 0.25) / 2)
    assert fb.sparse_forward["qkv"] == pytest.approx(dense["qkv"] * 0.25)


def test_measurement_leaves_the_model_as_it_was(make_gpt):
    model = make_gpt()
    spdf.sparsify(model, sparsity=0.5, seed=0)
    idx = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        before = model(idx[:, :-1])[0]
    measured_vs_model(model, seq=8)
    layer = model.transformer.h[0].attn.c_attn
    assert "forward" not in layer.__dict__  # the scoped forward was removed
    assert (layer.weight.grad[~layer.weight_mask] == 0).all()
    with torch.no_grad():
        assert torch.equal(model(idx[:, :-1])[0], before)


# ---- dynamic methods ---------------------------------------------------------------------------------------------
def test_schedule_flops_static_rigl_and_gmp():
    from spdf.flops import schedule_flops
    from spdf.sparsity import GMP, RigL, Static

    cfg = GPTConfig.from_name("gpt3-small")
    fb = analytic_flops(cfg, 0.75)
    static = schedule_flops(cfg, 0.75, Static(), 1000)
    assert static["mean_spent_train_per_token"] == pytest.approx(fb.sparse_train)
    rigl = schedule_flops(cfg, 0.75, RigL(0.3, every=100, stop=750), 1000)
    updates = 7  # steps 100..700
    expected = (fb.sparse_train * (1000 - updates) + fb.dense_grad_train * updates) / 1000
    assert rigl["mean_spent_train_per_token"] == pytest.approx(expected)
    assert fb.sparse_train < fb.dense_grad_train < fb.dense_train
    gmp = schedule_flops(cfg, 0.75, GMP(0.0, every=100, stop=750), 1000)
    assert fb.sparse_train < gmp["mean_spent_train_per_token"] < fb.dense_train
    # before the first update the model is dense; after the last it is at its target
    g = GMP(0.0, every=100, stop=750)
    assert g.sparsity_at(100, 0.75) == 0.0 and g.sparsity_at(101, 0.75) > 0.0 and g.sparsity_at(900, 0.75) == 0.75


def test_training_flops_follow_the_masks_and_rigl_update_steps(make_gpt):
    from spdf.flops import TrainingFlops
    from spdf.sparsity import GMP, RigL

    for algorithm in (GMP(0.0, every=1, stop=3), RigL(0.3, every=2)):
        torch.manual_seed(0)
        model = make_gpt()
        sp = spdf.sparsify(model, sparsity=0.75, algorithm=algorithm)
        opt = torch.optim.AdamW(model.parameters(), fused=True)
        sp.attach(opt)
        flops = TrainingFlops(model, 16, sp)
        idx = torch.randint(0, 128, (2, 17))
        spent = []
        for _ in range(4):
            dense, now = flops.per_token()
            spent.append(now)
            assert now == pytest.approx(model_flops(model, 16).dense_grad_train if algorithm.needs_dense_grad(
                sp.step + 1) else model_flops(model, 16).sparse_train)
            _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
        if isinstance(algorithm, GMP):
            assert spent[0] == pytest.approx(dense) and spent[0] > spent[1] > spent[2] > spent[3]
        else:
            assert spent[1] > spent[0] == spent[2] and spent[3] == spent[1]  # steps 2 and 4 need the dense gradient


def test_cli_flops_of_a_dynamic_recipe(capsys):
    from spdf.cli import main

    root = Path(__file__).resolve().parents[1] / "recipes"
    assert main(["flops", str(root / "gpt3-small-pile-s75-rigl.yaml"), "--json"]) == 0
    rigl = json.loads(capsys.readouterr().out)["schedule"]
    assert main(["flops", str(root / "gpt3-small-pile-s75.yaml"), "--json"]) == 0
    static = json.loads(capsys.readouterr().out)["schedule"]
    assert main(["flops", str(root / "gpt3-small-pile-s75-gmp.yaml"), "--json"]) == 0
    gmp = json.loads(capsys.readouterr().out)["schedule"]
    assert rigl["algorithm"]["algorithm"] == "rigl" and rigl["steps"] == 4778
    assert gmp["reduction"] < rigl["reduction"] < static["reduction"]
