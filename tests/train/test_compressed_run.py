"""`spdf run` with `sparsity.backend: compressed`: the same run as the masked reference, in nnz-sized state."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tiny_runs import copy_run, loss_trace, run_cli, truncate_to_kill, write_recipe

SETS = ("sparsity.backend=compressed", "phases.pretrain.checkpoint.keep=10")


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory, cache_dir):
    from spdf.cli import main

    root = tmp_path_factory.mktemp("compressed")
    recipe = write_recipe(root / "tiny.yaml", root / "run", *SETS)
    assert main(["run", str(recipe)]) == 0
    return root / "run"


def _close(ours: list[tuple], reference: list[tuple], tol: float) -> None:
    assert [t[:3] for t in ours] == [t[:3] for t in reference]
    for a, b in zip(ours, reference):
        assert a[3] == pytest.approx(b[3], abs=tol), (a, b)


def test_losses_match_the_masked_run(compressed_run, finished_run):
    _close(loss_trace(compressed_run), loss_trace(finished_run["run_dir"]), tol=1e-4)


def test_checkpoints_hold_only_nonzeros_and_exports_are_dense(compressed_run, finished_run):
    ckpt = sorted((compressed_run / "phases/pretrain/checkpoints").iterdir())[-1]
    state = load_file(str(ckpt / "model.safetensors"))
    values = {k[: -len(".values")]: v for k, v in state.items() if k.endswith(".values")}
    assert len(values) == 2 * 4 and not any(k.endswith(("c_fc.weight", "c_attn.weight")) for k in state)
    dense = load_file(str(compressed_run / "phases/pretrain/export/model.safetensors"))
    for name, v in values.items():  # 75% sparse: a quarter of the dense weight, exactly
        assert v.numel() * 4 == dense[f"{name}.weight"].numel(), name
    ours = load_file(str(compressed_run / "phases/pretrain/export/model.safetensors"))
    reference = load_file(str(finished_run["run_dir"] / "phases/pretrain/export/model.safetensors"))
    assert ours.keys() == reference.keys()  # the same dense export a masked run writes
    assert (compressed_run / "phases/pretrain/export/masks.safetensors").read_bytes() == (
        finished_run["run_dir"] / "phases/pretrain/export/masks.safetensors").read_bytes()


def test_killed_compressed_run_resumes_exactly(compressed_run, tmp_path, capsys):
    run_dir, recipe = copy_run(compressed_run, tmp_path / "run", tmp_path / "tiny.yaml", *SETS)
    truncate_to_kill(run_dir, "pretrain", 5, keep_checkpoints_upto=4)
    rc, out, err = run_cli(["run", recipe], capsys)
    assert rc == 0, err
    assert "step-00000004 (step 4/8)" in out
    assert loss_trace(run_dir) == loss_trace(compressed_run)
