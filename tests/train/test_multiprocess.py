"""The same commands under torchrun: two CPU processes (gloo) train the tiny demo as one data-parallel job."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tiny_runs import loss_trace, subprocess_env, write_recipe


def test_two_processes_train_like_one(finished_run, cache_dir, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "spdf", "run", str(recipe)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(cache_dir), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("spdf run finished") == 1  # the summary comes from the main process only
    ours, reference = loss_trace(tmp_path / "run"), loss_trace(finished_run["run_dir"])
    # each rank takes half of every global batch: the same steps, summed in another order
    assert [t[:3] for t in ours] == [t[:3] for t in reference]
    for a, b in zip(ours, reference):
        assert a[3] == pytest.approx(b[3], abs=1e-3), (a, b)
    exports = tmp_path / "run/phases"
    assert (exports / "pretrain/export/masks.safetensors").read_bytes() == (
        finished_run["run_dir"] / "phases/pretrain/export/masks.safetensors").read_bytes()


def test_the_block_backend_under_two_processes_pretrains_like_one(cache_dir, tmp_path):
    """DDP all-reduces the block layers' 1-D non-zeros like any gradient: the same losses as one process."""
    from test_block_run import SETS as BLOCK_SETS

    runs = {}
    for name, launch in (("ddp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]),
                         ("one", [])):
        recipe = write_recipe(tmp_path / f"{name}.yaml", tmp_path / name, *BLOCK_SETS)
        proc = subprocess.run([sys.executable, *launch, "-m", "spdf", "pretrain", str(recipe)], cwd=tmp_path,
                              env=subprocess_env(cache_dir), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = loss_trace(tmp_path / name)
    assert runs["ddp"] and [t[:3] for t in runs["ddp"]] == [t[:3] for t in runs["one"]]
    for a, b in zip(runs["ddp"], runs["one"]):
        assert a[3] == pytest.approx(b[3], abs=1e-5), (a, b)
