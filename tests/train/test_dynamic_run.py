"""GMP, SET and RigL through the real loop: the tiny demo with `--set sparsity.method=...`, end to end, resumed."""
from __future__ import annotations

import pytest
import torch

from spdf.model import GPT
from spdf.recipe import load_recipe, model_config
from spdf.sparsity import sparse_layers
from spdf.sparsity.masks import n_zeros
from spdf.export import read_export
from spdf.train.sparsity_plan import sparsify_recipe
from tiny_runs import copy_run, loss_trace, read_metrics, run_cli, truncate_to_kill, write_recipe

DYNAMIC = ("sparsity.update_every=2",)  # 8 steps: updates after steps 2, 4, 6 (stop: 3/4 of the steps)


def _initial_masks(recipe_file, vocab_size: int) -> dict:
    recipe = load_recipe(recipe_file)
    model = GPT(model_config(recipe, vocab_size=vocab_size))
    sparsify_recipe(recipe, model)
    return {n: layer.mask for n, layer in sparse_layers(model).items()}


@pytest.fixture(scope="module")
def dynamic_runs(tmp_path_factory, cache_dir):
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPDF_CACHE_DIR", str(cache_dir))
        for method in ("rigl", "set", "gmp"):
            root = tmp_path_factory.mktemp(method)
            recipe = write_recipe(root / "tiny.yaml", root / "run", f"sparsity.method={method}", *DYNAMIC)
            from spdf.cli import main

            assert main(["pretrain", str(recipe)]) == 0
            runs[method] = (root / "run", recipe)
    return runs


@pytest.mark.parametrize("method", ["rigl", "set", "gmp"])
def test_dynamic_methods_train_end_to_end(dynamic_runs, method):
    run_dir, recipe = dynamic_runs[method]
    exported = read_export(run_dir / "phases/pretrain/export")
    model, masks, config = exported.model, exported.masks, exported.config
    assert config["sparsity"]["algorithm"] == method
    initial = _initial_masks(recipe, model.config.vocab_size)
    assert set(masks) == set(initial)
    for name, mask in masks.items():
        assert int((~mask).sum()) == n_zeros(mask.numel(), 0.75), name  # the exact count at the end
        weight = model.get_submodule(name).weight
        assert (weight[~mask] == 0).all()
    assert any(not torch.equal(masks[n], initial[n]) for n in masks)  # the masks moved
    if method == "gmp":
        assert all(m.all() for m in initial.values())  # GMP starts dense
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    spent = [b["flops_spent"] - a["flops_spent"] for a, b in zip(records, records[1:])]
    if method == "rigl":  # steps 2, 4 and 6 compute the dense weight gradient: they cost more
        assert spent[0] > spent[1] == spent[3] and spent[0] == spent[2] == spent[4]
    elif method == "gmp":  # the sparsity rises at steps 2, 4, 6: each step after costs less
        assert spent[0] > spent[2] > spent[4] > spent[6]
    else:
        assert len(set(round(s) for s in spent)) == 1


def test_rigl_run_resumes_mid_schedule_exactly(dynamic_runs, tmp_path, capsys):
    run_dir, recipe = dynamic_runs["rigl"]
    copy, copy_recipe = copy_run(run_dir, tmp_path / "run", tmp_path / "tiny.yaml", "sparsity.method=rigl", *DYNAMIC)
    truncate_to_kill(copy, "pretrain", last_step=5, keep_checkpoints_upto=2)  # resume at step 2, updates at 4, 6
    rc, _, err = run_cli(["pretrain", copy_recipe], capsys)
    assert rc == 0, err
    assert loss_trace(copy) == loss_trace(run_dir)
    masks_a = read_export(run_dir / "phases/pretrain/export").masks
    masks_b = read_export(copy / "phases/pretrain/export").masks
    assert all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a)


def test_compressed_backend_with_a_dynamic_method_is_a_user_error(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "tiny.yaml", tmp_path / "run", "sparsity.method=rigl",
                          "sparsity.backend=compressed")
    rc, _, err = run_cli(["pretrain", recipe], capsys)
    assert rc == 2 and "static masks only" in err and not (tmp_path / "run").exists()
