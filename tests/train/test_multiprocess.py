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
