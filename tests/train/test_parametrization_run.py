"""`--set model.parametrization=supar` through the real runner: the tiny demo end to end (sparse pre-training with
SµPar's scales, densify, dense fine-tuning with µP's), any sparsity, and an exact resume under GMP."""
from __future__ import annotations

import pytest
import torch

from spdf.cli import main
from spdf.export import read_export
from tiny_runs import DEMO, assert_user_error, copy_run, loss_trace, run_cli, truncate_to_kill, write_recipe

SUPAR = ("model.parametrization=supar", "model.base_width=16")  # the tiny demo's d_model 32: width_mult 2
GMP = ("sparsity.method=gmp", "sparsity.update_every=2")  # 8 steps: the density falls after steps 2, 4, 6


def saved_groups(run_dir, phase: str, step: int) -> list[dict]:
    """The optimizer param groups (without params) of a checkpoint: what a resumed run restores."""
    state = torch.load(run_dir / "phases" / phase / "checkpoints" / f"step-{step:08d}" / "optimizer.bin",
                       weights_only=False)
    return [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]


@pytest.fixture(scope="module")
def supar_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("supar")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPDF_CACHE_DIR", str(cache_dir))
        recipe = write_recipe(root / "tiny.yaml", root / "run", *SUPAR)
        assert main(["run", str(recipe)]) == 0
    return root / "run"


def test_supar_demo_pretrains_sparse_and_finetunes_dense(supar_run):
    exported = read_export(supar_run / "phases/pretrain/export")
    assert exported.config["model"]["parametrization"] == "supar" and exported.masks
    pre = saved_groups(supar_run, "pretrain", 8)
    sparse = [g for g in pre if "sparse_layer" in g]
    assert len(sparse) == 8 and all(g["lr_scale"] == pytest.approx(1 / (2 * 0.25), rel=1e-3) for g in sparse)
    assert pre[0]["lr_scale"] == 1.0  # embeddings (and the tied head): unscaled
    # After densify every layer is dense: SµPar's scales are µP's, 1/width_mult, for every hidden weight.
    fine = saved_groups(supar_run, "finetune", 4)
    assert not any("sparse_layer" in g for g in fine)
    assert sorted({g["lr_scale"] for g in fine}) == [0.5, 1.0]
    assert not read_export(supar_run / "phases/finetune/export").masks


@pytest.mark.parametrize("level", ["0.0", "0.5"])
def test_supar_pretrains_at_other_sparsities(tmp_path, capsys, level):
    recipe = write_recipe(tmp_path / "tiny.yaml", tmp_path / "run", *SUPAR, f"sparsity.level={level}")
    rc, _, err = run_cli(["pretrain", recipe], capsys)
    assert rc == 0, err
    losses = [v for _, _, kind, v in loss_trace(tmp_path / "run") if kind == "val"]
    assert losses[-1] < losses[0]


def test_supar_with_gmp_resumes_exactly(tmp_path_factory, tmp_path, capsys):
    root = tmp_path_factory.mktemp("supar-gmp")
    recipe = write_recipe(root / "tiny.yaml", root / "run", *SUPAR, *GMP)
    rc, _, err = run_cli(["pretrain", recipe], capsys)
    assert rc == 0, err
    run_dir = root / "run"
    # The checkpoint of step 6 holds the scales of the densities after step 4's update (re-read at step 5; each
    # tensor's exact count gives it a slightly different density).
    scales = {g["lr_scale"] for g in saved_groups(run_dir, "pretrain", 6) if "sparse_layer" in g}
    assert scales and all(1.0 < s < 2.0 for s in scales)  # between dense µP (1/2) and 75% SµPar (2)
    copy, copy_recipe = copy_run(run_dir, tmp_path / "run", tmp_path / "tiny.yaml", *SUPAR, *GMP)
    truncate_to_kill(copy, "pretrain", last_step=5, keep_checkpoints_upto=2)  # resume at step 2: updates at 4, 6
    rc, _, err = run_cli(["pretrain", copy_recipe], capsys)
    assert rc == 0, err
    assert loss_trace(copy) == loss_trace(run_dir)
    assert saved_groups(copy, "pretrain", 8) == saved_groups(run_dir, "pretrain", 8)


@pytest.mark.parametrize("setting, fragment", [
    ("model.parametrization=mu", "model.parametrization must be one of 'sp', 'mup', 'supar', got 'mu'"),
    ("model.base_width=0", "model.base_width must be >= 1"),
    ("model.output_mult=0", "model.output_mult must be > 0.0"),
])
def test_bad_parametrization_settings_are_user_errors(tmp_path, capsys, setting, fragment):
    rc, _, err = run_cli(["run", DEMO, "--set", setting, "--set", f"run_dir={tmp_path / 'run'}"], capsys)
    assert_user_error(rc, err, fragment)
    assert not (tmp_path / "run").exists()
