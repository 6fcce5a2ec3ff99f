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


def test_kaplan_count_halves_causal_attention_and_is_shown_beside_ours():
    """Kaplan et al. 2020, Table 1, per token forward: QKV 2·L·d·3·d_attn, mask 2·L·n_ctx·d_attn (QKᵀ and AV together:
    half of Megatron-LM's full count, which spdf uses), projection 2·L·d_attn·d, feed-forward 2·L·2·d·d_ff, de-embed
    2·d·V (the tiny 4·d embed term left out, as spdf leaves embeddings out)."""
    cfg = GPTConfig.from_name("gpt3-xl")
    L, d, T, V, da, dff = cfg.n_layer, cfg.d_model, cfg.n_ctx, cfg.vocab_size, cfg.d_attn, cfg.d_ff

    def kaplan(density):
        weights = 2 * L * d * 3 * da + 2 * L * da * d + 2 * L * 2 * d * dff
        return density * weights + 2 * L * T * da + 2 * d * V

    fb = analytic_flops(cfg, 0.75)
    assert fb.kaplan_reduction == pytest.approx(kaplan(1.0) / kaplan(0.25), rel=1e-12)
    assert round(fb.kaplan_reduction, 2) == 2.79 and round(fb.reduction, 2) == 2.49
    assert fb.to_dict()["kaplan_reduction"] == fb.kaplan_reduction
    assert "with causal attention at half (Kaplan)" in format_table("gpt3-xl", fb, "75%") and "2.79x" in \
        format_table("gpt3-xl", fb, "75%")
    assert "Megatron-LM" in fb.to_dict()["convention"]


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
    # 6·N per token for the non-embedding weights (Kaplan's C ≈ 6N), plus attention in full and logits.
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


@pytest.mark.parametrize("algorithm, steps", [
    ("static", 50), ("rigl", 55), ("gmp", 47), ("set", 30), ("gmp-every-step", 10), ("rigl-past-the-end", 60)])
def test_schedule_flops_walks_the_stretches_between_updates_as_every_step_would(algorithm, steps):
    """The mean is summed over the stretches between mask updates: the same as costing each step on its own."""
    from spdf.flops import schedule_flops
    from spdf.sparsity import GMP, SET, RigL, Static

    algorithm = {"static": Static(), "rigl": RigL(0.3, every=7, begin=3, stop=40),
                 "gmp": GMP(0.1, every=5, begin=2, stop=33), "set": SET(0.3, every=4, stop=20),
                 "gmp-every-step": GMP(0.0, every=1, stop=3), "rigl-past-the-end": RigL(0.3, every=10, stop=100)}[
        algorithm]
    cfg = GPTConfig.from_name("gpt3-small")
    per_step = [analytic_flops(cfg, algorithm.sparsity_at(step, 0.75)) for step in range(1, steps + 1)]
    expected = sum(fb.dense_grad_train if algorithm.needs_dense_grad(step) else fb.sparse_train
                   for step, fb in enumerate(per_step, start=1)) / steps
    assert schedule_flops(cfg, 0.75, algorithm, steps)["mean_spent_train_per_token"] == pytest.approx(expected,
                                                                                                     rel=1e-12)


def test_flops_of_a_recipe_with_an_absurd_number_of_steps_returns(tmp_path, capsys):
    """Found by the recipe-fuzzing test: `spdf flops` costed a recipe's schedule one step at a time, so 8.7e15 steps
    never returned."""
    import yaml

    from spdf.cli import main
    from spdf.recipe import apply_overrides

    recipe = tmp_path / "r.yaml"
    demo = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    recipe.write_text(yaml.safe_dump(apply_overrides(yaml.safe_load(demo.read_text()),
                                                     ["phases.pretrain.steps=8659268916012999"])))
    assert main(["flops", str(recipe), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schedule"]["steps"] == 8659268916012999


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


# ---- the FLOP tables of every named model (`spdf flops --table`) --------------------------------------------------
from spdf.flops_table import LEVELS, TOKENS_PER_PARAMETER, parameter_count, table_rows, write_tables  # noqa: E402
from spdf.model import config as model_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TABLE_FILES = {"flops.md", "flops.json", "flops.png"}


@pytest.fixture(scope="module")
def rows():
    return table_rows()


def _rows_of(rows, name):
    return [r for r in rows if name in (r["model"], *r["same_shape"])]


def test_table_has_every_named_config_at_every_level_once(rows):
    named = [n for n in model_config.CONFIGS if not n.startswith("tiny")]
    assert {"gpt3-small", "gpt3-13b", "cerebras-gpt-111m", "cerebras-gpt-13b"} <= set(named)
    for name in named:
        assert sorted(r["sparsity"] for r in _rows_of(rows, name)) == sorted(LEVELS), name
    assert not [r for r in rows if any(n.startswith("tiny") for n in (r["model"], *r["same_shape"]))]
    # one row per shape: GPT-3 XL and Cerebras-GPT 1.3B are the same model for FLOPs
    xl = _rows_of(rows, "cerebras-gpt-1.3b")
    assert {r["model"] for r in xl} == {"gpt3-xl"} and all("cerebras-gpt-1.3b" in r["same_shape"] for r in xl)
    assert len(rows) == len(LEVELS) * len({(r["n_layer"], r["d_model"], r["parameters"]) for r in rows})


def test_a_config_of_an_existing_shape_joins_its_row(monkeypatch, rows):
    # a µP twin (same shape, other training settings) must not add a row, whatever else it carries
    twin = model_config.CONFIGS["cerebras-gpt-111m"].replace(name="cerebras-gpt-111m-mup", dropout=0.1)
    monkeypatch.setitem(model_config.CONFIGS, twin.name, twin)
    with_twin = table_rows()
    assert len(with_twin) == len(rows)
    assert all(r["same_shape"] == ["cerebras-gpt-111m-mup"] for r in _rows_of(with_twin, "cerebras-gpt-111m"))


def test_parameter_count_is_the_closed_form():
    L, d, V, T = 24, 2048, 50257, 2048
    per_layer = 12 * d * d + 13 * d  # weights + biases of Q/K/V, attention out, MLP up/down; two layer norms
    assert parameter_count(GPTConfig.from_name("gpt3-xl")) == L * per_layer + V * d + T * d + 2 * d


def test_xl_at_75_percent_is_the_papers_headline(rows):
    (xl,) = [r for r in _rows_of(rows, "gpt3-xl") if r["sparsity"] == 0.75]
    assert xl["reduction"] == pytest.approx(2.49, abs=0.01)
    fb = analytic_flops(GPTConfig.from_name("gpt3-xl"), 0.75)
    assert xl["tokens"] == TOKENS_PER_PARAMETER * xl["parameters"]
    assert xl["dense_flops"] == pytest.approx(fb.dense_train * xl["tokens"])
    assert xl["sparse_flops"] == pytest.approx(fb.sparse_train * xl["tokens"])
    dense_parts = sum(fb.sparse_forward[c] for c in ("attn_scores", "logits"))
    assert xl["dense_share"] == pytest.approx(dense_parts / sum(fb.sparse_forward.values()))
    assert xl["dense_share"] == pytest.approx(xl["attn_scores_share"] + xl["logits_share"])


def test_reductions_grow_with_sparsity_and_with_model_size(rows):
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in models:
        by_level = sorted((r["sparsity"], r["reduction"]) for r in rows if r["model"] == model)
        assert by_level[0] == (0.0, 1.0)
        reductions = [red for _, red in by_level]
        assert all(a < b for a, b in zip(reductions, reductions[1:])), (model, reductions)
        assert all(red < 1 / (1 - s) for s, red in by_level if s > 0)  # attention and logits stay dense
    # within a family (a Llama's 128k vocabulary keeps more of it dense than a GPT's of the same size)
    for level, family in ((s, f) for s in LEVELS if s > 0 for f in {r["family"] for r in rows}):
        by_size = sorted((r["parameters"], r["reduction"]) for r in rows
                         if r["sparsity"] == level and r["family"] == family)
        reductions = [red for _, red in by_size]
        assert all(a < b for a, b in zip(reductions, reductions[1:])), (level, by_size)


def _user_error(rc, err, *fragments):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("spdf: error: ") and "Traceback" not in err, err
    assert all(f in lines[0] for f in fragments), (fragments, lines[0])


def test_cli_table_writes_the_three_files(tmp_path, capsys):
    from spdf.cli import main

    out = tmp_path / "results"
    assert main(["flops", "--table", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2.49x" in printed and "flops.png" in printed
    assert {p.name for p in out.iterdir()} == TABLE_FILES  # no temporary files left behind
    data = json.loads((out / "flops.json").read_text())
    assert data["rows"] == json.loads(json.dumps(table_rows())) and data["tokens_per_parameter"] == 20
    md = (out / "flops.md").read_text()
    assert "GPT-3 XL at 75%: 2.49x" in md and "![reduction vs model size](flops.png)" in md
    assert "## Why small models save less" in md
    for name in model_config.CONFIGS:
        assert (f"`{name}`" in md) != name.startswith("tiny"), name
    assert (out / "flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".png"}
    assert main(["flops", "--table", str(out)]) == 0  # the same numbers, byte for byte, on a second run
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".png"}


def test_cli_table_without_matplotlib_writes_the_table_and_says_so(tmp_path, monkeypatch, capsys):
    from spdf.cli import main

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib → ImportError
    assert main(["flops", "--table", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "flops.png not drawn" in err and "spdf[plot]" in err
    assert {p.name for p in tmp_path.iterdir()} == {"flops.md", "flops.json"}
    assert "flops.png not drawn: matplotlib is not installed" in (tmp_path / "flops.md").read_text()


@pytest.mark.parametrize("argv,fragments", [
    (["--table", "OUT", "--sparsity", "0"], ["--table", "--sparsity"]),
    (["gpt3-xl", "--table"], ["--table", "MODEL"]),
    (["--table", "OUT", "--json", "--tokens", "1e9"], ["--tokens", "--json"]),
    (["--table", "OUT", "--seq-len", "512"], ["--seq-len"]),
    (["--table", "gpt3-xl"], ["gpt3-xl", "model name", "output directory"]),
    (["--table", "FILE"], ["not a directory"]),
    ([], ["name a MODEL", "--table"]),
])
def test_cli_table_flag_errors(argv, fragments, tmp_path, monkeypatch, capsys):
    from spdf.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("mine")
    rc = main(["flops", *argv])
    _user_error(rc, capsys.readouterr().err, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"] and (tmp_path / "FILE").read_text() == "mine"


def test_committed_table_matches_the_accounting(rows):
    committed = json.loads((REPO / "benchmarks/results/flops.json").read_text())["rows"]
    fresh = {(r["model"], r["sparsity"]): r for r in rows}
    assert {(r["model"], r["sparsity"]) for r in committed} == set(fresh)
    for r in committed:
        for key in ("parameters", "tokens", "dense_flops", "sparse_flops", "reduction", "dense_share"):
            assert r[key] == pytest.approx(fresh[r["model"], r["sparsity"]][key], rel=1e-12), (r["model"], key)


def test_cli_table_default_directory_and_list_without_a_model(tmp_path, monkeypatch, capsys):
    from spdf.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["flops", "--table"]) == 0
    assert {p.name for p in (tmp_path / "benchmarks/results").iterdir()} == TABLE_FILES
    assert main(["flops", "--list"]) == 0 and "gpt3-xl" in capsys.readouterr().out


def test_a_failed_write_leaves_the_previous_files_whole(tmp_path, monkeypatch, capsys):
    from matplotlib.figure import Figure

    from spdf.cli import main

    (tmp_path / "flops.png").write_bytes(b"previous plot")

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"half a png")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    rc = main(["flops", "--table", str(tmp_path)])
    _user_error(rc, capsys.readouterr().err, "no space left on the device writing flops.png", str(tmp_path))
    assert (tmp_path / "flops.png").read_bytes() == b"previous plot"
    assert {p.name for p in tmp_path.iterdir()} == TABLE_FILES  # the md and json written whole, no temporary file


def test_cli_flops_of_the_fast_pattern_recipes(capsys):
    """Block-75% costs on paper what unstructured 75% does; 2:4 what 50% does, whatever `level` says (n:m fixes it)."""
    import yaml

    from spdf.cli import main
    from spdf.recipe import apply_overrides, load_recipe, recipe_from_dict

    root = Path(__file__).resolve().parents[1] / "recipes"
    out = {}
    for name in ("gpt3-xl-pile-s75", "gpt3-xl-pile-block75", "gpt3-xl-pile-2to4"):
        assert main(["flops", str(root / f"{name}.yaml"), "--json"]) == 0
        out[name] = json.loads(capsys.readouterr().out)
    xl = spdf.GPTConfig.from_name("gpt3-xl")
    assert out["gpt3-xl-pile-block75"]["reduction"] == out["gpt3-xl-pile-s75"]["reduction"] == pytest.approx(
        analytic_flops(xl, 0.75).reduction)
    assert out["gpt3-xl-pile-2to4"]["reduction"] == pytest.approx(analytic_flops(xl, 0.5).reduction)
    assert 1.5 < out["gpt3-xl-pile-2to4"]["reduction"] < out["gpt3-xl-pile-block75"]["reduction"]
    recipe = load_recipe(root / "gpt3-xl-pile-2to4.yaml")
    assert (recipe.sparsity.method, recipe.sparsity.backend) == ("nm", "semi_structured")
    raw = recipe_from_dict(apply_overrides(yaml.safe_load((root / "gpt3-xl-pile-2to4.yaml").read_text()),
                                           ["sparsity.level=0.75"]))
    assert raw.sparsity.mask_level == 0.5  # 2 of 4 kept, whatever level says
