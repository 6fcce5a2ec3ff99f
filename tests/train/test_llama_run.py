"""The demo with `--set model.family=llama` (issue 22): the tiny Llama pre-trains 75% sparse, densifies, fine-tunes
and is scored by `spdf evaluate`, offline; its exports record the family and the Hugging Face export of it loads in
transformers with spdf's logits. The recipe names no shape, so the family's default (llama-tiny) is trained."""
from __future__ import annotations

import json

import pytest
import torch

from spdf.export import read_export, read_masks
from spdf.inspect import checkpoint_stats
from spdf.model import Llama, family_of
from spdf.recipe import load_recipe, recipe_fingerprint
from tiny_runs import DEMO, PRETRAIN_STEPS, loss_trace, run_cli, write_recipe

LLAMA = "model.family=llama"


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("llama")
    recipe = write_recipe(root / "tiny.yaml", root / "run", LLAMA)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPDF_CACHE_DIR", str(cache_dir))
        from spdf.cli import main
        assert main(["run", str(recipe)]) == 0
    return root / "run"


def test_the_demo_recipe_becomes_a_llama_and_gpt_recipes_keep_their_fingerprint():
    recipe = load_recipe(DEMO, [LLAMA])
    assert (recipe.model.family, recipe.model.name) == ("llama", "llama-tiny")
    # naming the default family explicitly changes nothing a run directory is checked against
    assert recipe_fingerprint(load_recipe(DEMO, ["model.family=gpt"])) == recipe_fingerprint(load_recipe(DEMO))
    assert recipe_fingerprint(recipe) != recipe_fingerprint(load_recipe(DEMO))


def test_llama_pretrains_sparse_densifies_and_fine_tunes(llama_run):
    pretrain, finetune = (read_export(llama_run / "phases" / p / "export") for p in ("pretrain", "finetune"))
    for exported in (pretrain, finetune):
        assert isinstance(exported.model, Llama) and exported.config["family"] == "llama"
    masks = read_masks(llama_run / "phases/pretrain/export/masks.safetensors")
    family = family_of(pretrain.model)
    # the family's default filter: exactly the seven projections of every block, 75% sparse each
    assert {name.split(".", 3)[-1] for name in masks} == set(family.flop_roles)  # model.layers.N.<projection>
    assert len(masks) == 7 * pretrain.model.config.n_layer
    assert all(1 - m.float().mean().item() == pytest.approx(0.75, abs=0.01) for m in masks.values())
    weights = dict(finetune.model.named_parameters())
    assert finetune.masks == {}
    learned = [bool((weights[f"{n}.weight"].detach()[~m] != 0).any()) for n, m in masks.items()]
    assert all(learned)  # the formerly masked weights trained after densify
    stats = checkpoint_stats(llama_run / "phases/pretrain/export")  # `spdf inspect`: the family's block matmuls
    assert sorted(r["name"] for r in stats["layers"]) == sorted(masks)
    assert all(r["actual"] == pytest.approx(0.75, abs=0.01) for r in stats["layers"])
    done = json.loads((llama_run / "phases/pretrain/done.json").read_text())
    assert done["steps"] == PRETRAIN_STEPS and done["flops_spent"] < done["flops_dense_equivalent"]


def test_spdf_evaluate_scores_the_llama_export_offline(llama_run, offline, tmp_path, capsys):
    rc, out, err = run_cli(["evaluate", llama_run, "--task", "docstring", "--decoding", "greedy", "--limit", "3",
                            "--max-new-tokens", "6", "--truncate-prompts", "--out", tmp_path], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "docstring-validation.json").read_text())
    assert report["model"]["family"] == "llama" and report["model"]["phase"] == "finetune"
    assert report["examples"] == 3 and list(report["metrics"]) == ["bleu", "rouge_l", "chrf"]


def test_the_llama_export_loads_in_transformers_with_equal_logits(llama_run, offline, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    rc, _, err = run_cli(["export", llama_run / "phases/pretrain", tmp_path / "hf"], capsys)
    assert rc == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    exported = read_export(llama_run / "phases/pretrain/export")
    ours = exported.model.eval()
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)[0], rtol=1e-5, atol=1e-5)
    back = read_export(tmp_path / "hf")  # and the directory reads back as an export (a fine-tuning --from)
    assert back.config["family"] == "llama" and set(back.masks) == set(exported.masks)
    # fine-tuning from the Hugging Face directory starts from the same weights, masks and tokens: the same losses
    recipe = write_recipe(tmp_path / "tiny.yaml", tmp_path / "new-run", LLAMA)
    rc, _, err = run_cli(["finetune", recipe, "--from", tmp_path / "hf"], capsys)
    assert rc == 0, err
    assert loss_trace(tmp_path / "new-run") == loss_trace(llama_run, "finetune")
    # a GPT recipe is told what the directory holds
    gpt = write_recipe(tmp_path / "gpt.yaml", tmp_path / "gpt-run")
    rc, _, err = run_cli(["finetune", gpt, "--from", tmp_path / "hf"], capsys)
    assert rc == 2 and "holds a llama model where the recipe asks model.family=gpt" in err


def test_fsdp2_launch_of_the_llama_shards_its_blocks_and_trains_like_one_process(llama_run, cache_dir, tmp_path):
    """`accelerate launch --config_file recipes/accelerate/fsdp-8gpu.yaml` (whose wrap class is GPT's `Block`) on two
    CPU processes: spdf shards each LlamaBlock, and the gathered pre-training export is the one-process run's."""
    from safetensors.torch import load_file

    from test_fsdp_run import NO_GENERATION, launch_fsdp2

    recipe = write_recipe(tmp_path / "tiny.yaml", tmp_path / "run", LLAMA, NO_GENERATION)
    launch_fsdp2("pretrain", recipe, cache_dir, tmp_path)
    ours = load_file(str(tmp_path / "run/phases/pretrain/export/model.safetensors"))
    reference = load_file(str(llama_run / "phases/pretrain/export/model.safetensors"))
    assert set(ours) == set(reference)
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=1e-5)
    masks = "phases/pretrain/export/masks.safetensors"
    assert (tmp_path / "run" / masks).read_bytes() == (llama_run / masks).read_bytes()


def test_a_dense_hugging_face_llama_directory_starts_a_continued_pre_training(llama_run, offline, tmp_path, capsys):
    """`spdf pretrain --from HF_DIR`: pre-training goes on from the directory's weights (not a fresh model), with the
    recipe's sparsity applied to them; a sparse source is refused, and a killed continuation resumes only from the
    same weights."""
    from tiny_runs import read_metrics

    pytest.importorskip("transformers")
    rc, _, err = run_cli(["export", llama_run / "phases/finetune", tmp_path / "hf"], capsys)  # dense weights
    assert rc == 0, err
    assert not (tmp_path / "hf/masks.safetensors").exists()
    runs = {}
    for name, source, extra in (("hf", tmp_path / "hf", ["sparsity.method=none"]),
                                ("spdf", llama_run / "phases/finetune", ["sparsity.method=none"]),
                                ("fresh", None, ["sparsity.method=none"]),
                                ("sparse", tmp_path / "hf", [])):
        recipe = write_recipe(tmp_path / f"{name}.yaml", tmp_path / "runs" / name, LLAMA, *extra)
        rc, _, err = run_cli(["pretrain", recipe, *(["--from", source] if source else [])], capsys)
        assert rc == 0, err
        runs[name] = loss_trace(tmp_path / "runs" / name)
    # the Hugging Face directory and the spdf export of the same weights continue identically; a fresh model does not
    assert runs["hf"] == runs["spdf"] and runs["hf"][0] != runs["fresh"][0]
    record = json.loads((tmp_path / "runs/hf/phases/pretrain/init_from.json").read_text())
    assert record["path"] == str(tmp_path / "hf")
    # the recipe's 75% masks are applied to the loaded weights (the first validation is the masked model's)
    masks = read_masks(tmp_path / "runs/sparse/phases/pretrain/export/masks.safetensors")
    assert len(masks) == 7 * 2 and all(1 - m.float().mean().item() == pytest.approx(0.75, abs=0.02)
                                       for m in masks.values())
    first_val = {name: next(r["val_loss"] for r in read_metrics(tmp_path / "runs" / name) if "val_loss" in r)
                 for name in ("hf", "sparse")}
    assert first_val["sparse"] != first_val["hf"]
    # a run directory is never written among a model's files (here: the Hugging Face directory itself)
    recipe = write_recipe(tmp_path / "into-export.yaml", tmp_path / "hf", LLAMA)
    before = sorted(p.name for p in (tmp_path / "hf").iterdir())
    rc, _, err = run_cli(["pretrain", recipe, "--from", tmp_path / "hf"], capsys)
    assert rc == 2 and "holds a model (config.json, model.safetensors), not a run" in err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == before
    # a sparse model is not the start of a continued pre-training: refused before anything is made
    recipe = write_recipe(tmp_path / "from-sparse.yaml", tmp_path / "from-sparse", LLAMA)
    rc, _, err = run_cli(["pretrain", recipe, "--from", llama_run / "phases/pretrain"], capsys)
    assert rc == 2 and "holds a sparse model" in err and not (tmp_path / "from-sparse").exists()
    # an unfinished continuation (its done.json gone, as if killed after its checkpoints) resumes only with its --from
    (tmp_path / "runs/hf/phases/pretrain/done.json").unlink()
    rc, _, err = run_cli(["pretrain", tmp_path / "hf.yaml"], capsys)
    assert rc == 2 and "continues the pre-training of" in err
    rc, _, err = run_cli(["pretrain", tmp_path / "hf.yaml", "--from", llama_run / "phases/finetune"], capsys)
    assert rc == 2 and "continues the pre-training of" in err
    rc, _, err = run_cli(["pretrain", tmp_path / "hf.yaml", "--from", tmp_path / "hf"], capsys)
    assert rc == 0, err
    # and one started without --from is not continued from another model's weights
    (tmp_path / "runs/fresh/phases/pretrain/done.json").unlink()
    rc, _, err = run_cli(["pretrain", tmp_path / "fresh.yaml", "--from", tmp_path / "hf"], capsys)
    assert rc == 2 and "was started without --from" in err
