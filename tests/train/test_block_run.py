"""`spdf run` with `sparsity.backend: block`: the same run as the masked backend on the same block masks, stored
block by block, exported dense, and resumed exactly after a kill."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tiny_runs import copy_run, loss_trace, run_cli, truncate_to_kill, write_recipe

# width 128: every layer has >= 4 blocks of 64, so 75% keeps at least one
PATTERN = ("model.d_model=128", "sparsity.method=block", "sparsity.block_size=64", "phases.pretrain.checkpoint.keep=10")
SETS = (*PATTERN, "sparsity.backend=block")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    from spdf.cli import main

    root = tmp_path_factory.mktemp("block")
    out = {}
    for backend, sets in (("masked", PATTERN), ("block", SETS)):
        recipe = write_recipe(root / f"{backend}.yaml", root / backend, *sets)
        assert main(["run", str(recipe)]) == 0
        out[backend] = root / backend
    return out


def test_losses_match_the_masked_run_and_the_export_is_dense(runs):
    ours, reference = loss_trace(runs["block"]), loss_trace(runs["masked"])
    assert [t[:3] for t in ours] == [t[:3] for t in reference]
    for a, b in zip(ours, reference):
        assert a[3] == pytest.approx(b[3], abs=1e-4), (a, b)
    ckpt = sorted((runs["block"] / "phases/pretrain/checkpoints").iterdir())[-1]
    state = load_file(str(ckpt / "model.safetensors"))
    assert any(k.endswith(".values") for k in state) and not any(k.endswith("c_fc.weight") for k in state)
    export = "phases/pretrain/export"
    assert load_file(str(runs["block"] / export / "model.safetensors")).keys() == load_file(
        str(runs["masked"] / export / "model.safetensors")).keys()
    assert (runs["block"] / export / "masks.safetensors").read_bytes() == (
        runs["masked"] / export / "masks.safetensors").read_bytes()


def test_killed_block_run_resumes_exactly(runs, tmp_path, capsys):
    run_dir, recipe = copy_run(runs["block"], tmp_path / "run", tmp_path / "tiny.yaml", *SETS)
    truncate_to_kill(run_dir, "pretrain", 5, keep_checkpoints_upto=4)
    rc, out, err = run_cli(["run", recipe], capsys)
    assert rc == 0, err
    assert loss_trace(run_dir) == loss_trace(runs["block"])
