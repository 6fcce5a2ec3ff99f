"""Phased data mixtures end to end: recipes/demo-mixture.yaml made tiny (two pre-training phases mixing the standard
library's code and its docstrings/comments, 70/30 then 95/5).

The run logs the tokens drawn from each source at the weights, prepares each source once, and, killed at any point,
resumes to the uninterrupted run's losses and per-source token counts exactly (the kills are cut-backs of a finished
run, as in test_resume.py, and one real SIGKILL).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from spdf.cli import main
from spdf.recipe import load_recipe, recipe_fingerprint
from tiny_runs import (REPO, assert_user_error, copy_run, loss_trace, read_metrics, run_cli, subprocess_env,
                       truncate_to_kill, wait_for, write_recipe)

PHASES = ("pretrain-1", "pretrain-2")
WEIGHTS = {"pretrain-1": {"code": 0.7, "text": 0.3}, "pretrain-2": {"code": 0.95, "text": 0.05}}
SEQ_LEN, STEPS = 32, 6
TINY_MIXTURE_SETS = [
    "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.n_ctx=64", "tokenizer.vocab_size=300",
    "logging.progress=false", "logging.every_steps=1",
    "sources.code.data.max_bytes=200000", "sources.code.data.val_fraction=0.2",
    "sources.text.data.max_bytes=100000", "sources.text.data.val_fraction=0.2",
    *[f"phases.{phase}.{key}" for phase in PHASES for key in (
        f"seq_len={SEQ_LEN}", "batch_size=4", f"steps={STEPS}", "schedule.warmup_steps=2", "eval.every_steps=3",
        "eval.batches=2", "checkpoint.every_steps=2", "checkpoint.keep=2")],
    "phases.finetune.seq_len=32",  # pre-training only here; the fine-tuning phase must still fit n_ctx
]
MIXTURE = {"base": REPO / "recipes" / "demo-mixture.yaml", "tiny_sets": TINY_MIXTURE_SETS}


def source_trace(run_dir) -> list[tuple]:
    """(phase, step, tokens, tokens_by_source) of every training record."""
    return [(r["phase"], r["step"], r["tokens"], r["tokens_by_source"]) for r in read_metrics(run_dir) if "loss" in r]


def export_weights(run_dir, phase: str) -> dict:
    return load_file(str(run_dir / "phases" / phase / "export/model.safetensors"))


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory) -> tuple:
    """(run_dir, recipe file) of `spdf pretrain` of the tiny mixture recipe, run to the end. Read-only."""
    root = tmp_path_factory.mktemp("mixture")
    recipe = write_recipe(root / "tiny.yaml", root / "run", **MIXTURE)
    assert main(["pretrain", str(recipe)]) == 0
    return root / "run", recipe


def test_each_phase_draws_its_sources_at_the_weights(mixture_run):
    run_dir, _ = mixture_run
    trace = source_trace(run_dir)
    assert [p for p, *_ in trace] == ["pretrain-1"] * STEPS + ["pretrain-2"] * STEPS
    for phase, step, tokens, by_source in trace:
        assert sum(by_source.values()) == tokens == step * 4 * SEQ_LEN
        for name, weight in WEIGHTS[phase].items():
            # token shares: the deficit order keeps every source within one row of its share at every step
            assert abs(by_source[name] - weight * tokens) < SEQ_LEN, (phase, step, by_source)
    for phase in PHASES:
        done = json.loads((run_dir / "phases" / phase / "done.json").read_text())
        assert done["tokens_by_source"] == next(t[3] for t in reversed(trace) if t[0] == phase)


def test_the_second_phase_continues_the_first_phases_sparse_model(mixture_run):
    run_dir, _ = mixture_run
    masks = [load_file(str(run_dir / "phases" / p / "export/masks.safetensors")) for p in PHASES]
    assert masks[0] and masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    first = [r for r in read_metrics(run_dir) if "val_loss" in r]
    start = {r["phase"]: r["val_loss"] for r in first if r["step"] == 0}
    assert start["pretrain-2"] < start["pretrain-1"] - 0.1  # not a fresh model


@pytest.mark.parametrize("phase,last_step,checkpoint", [
    ("pretrain-1", 5, 4),     # killed in the first phase: it resumes from step 4, the second phase runs whole
    ("pretrain-2", 5, 4),     # killed mid second phase: the first is skipped, its weights and masks loaded
    ("pretrain-2", 1, None),  # killed before the second phase's first checkpoint: it restarts from the first's export
])
def test_killed_mixture_run_replays_losses_and_source_counts_exactly(mixture_run, tmp_path, capsys, phase,
                                                                     last_step, checkpoint):
    reference, _ = mixture_run
    run_dir, recipe = copy_run(reference, tmp_path / "run", tmp_path / "tiny.yaml", **MIXTURE)
    truncate_to_kill(run_dir, phase, last_step, keep_checkpoints_upto=checkpoint)
    rc, out, err = run_cli(["pretrain", recipe], capsys)
    assert rc == 0, err
    if checkpoint is not None:
        assert f"[{phase}] resumed from {run_dir / 'phases' / phase / 'checkpoints' / f'step-{checkpoint:08d}'}" in out
    assert loss_trace(run_dir) == loss_trace(reference)
    assert source_trace(run_dir) == source_trace(reference)
    assert "tokens by source: code" in out  # the closing summary
    for p in PHASES:
        ours, ref = export_weights(run_dir, p), export_weights(reference, p)
        assert all(torch.equal(ours[k], ref[k]) for k in ref), p


def test_sigkilled_mixture_run_resumes_mid_second_phase_exactly(mixture_run, tmp_path, cache_dir):
    """A real `spdf pretrain` killed with SIGKILL after a checkpoint of the second phase, then run again. It reads the
    reference run's tokenizer file (the same bytes, so the same packed data) to skip training one."""
    reference, _ = mixture_run
    tokenizer = f"tokenizer={{kind: file, path: {reference / 'tokenizer.json'}}}"
    # progress lines on (stderr is a file here: one plain line per logged step)
    recipe = write_recipe(tmp_path / "tiny.yaml", tmp_path / "run", tokenizer, "logging.progress=true", **MIXTURE)
    run_dir, ckpts = tmp_path / "run", tmp_path / "run/phases/pretrain-2/checkpoints"
    cmd = [sys.executable, "-m", "spdf", "pretrain", str(recipe)]
    with open(tmp_path / "killed.err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, env=subprocess_env(cache_dir))
        try:
            wait_for(lambda: any(ckpts.glob("step-*")), proc, 300, "a checkpoint of the second phase")
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "phases/pretrain-2/done.json").exists()
    resumed = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=subprocess_env(cache_dir),
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "[pretrain-1] already finished" in resumed.stdout and "[pretrain-2] resumed from" in resumed.stdout
    # 24 rows at 95/5: 23 of code, 1 of text
    assert re.search(r"\[pretrain-2\] step 6/6 loss .* tok/s \| tokens code 95\.8% text 4\.2%", resumed.stderr)
    assert loss_trace(run_dir) == loss_trace(reference)
    assert source_trace(run_dir) == source_trace(reference)


def test_two_processes_draw_the_global_batches_of_one(mixture_run, tmp_path, cache_dir):
    """Under torchrun (2 gloo CPU processes) each rank takes every other row of the one-process order: the same
    per-source counts, and the same losses up to the order of summation."""
    reference, _ = mixture_run
    tokenizer = f"tokenizer={{kind: file, path: {reference / 'tokenizer.json'}}}"  # the same data, no new tokenizer
    recipe = write_recipe(tmp_path / "tiny.yaml", tmp_path / "run", tokenizer, **MIXTURE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "spdf", "pretrain", str(recipe)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(cache_dir), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert source_trace(tmp_path / "run") == source_trace(reference)
    ours, ref = loss_trace(tmp_path / "run"), loss_trace(reference)
    assert [t[:3] for t in ours] == [t[:3] for t in ref]
    for a, b in zip(ours, ref):
        assert a[3] == pytest.approx(b[3], abs=1e-3), (a, b)


def test_prepare_tokenizes_each_source_once_for_all_phases(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPDF_CACHE_DIR", str(tmp_path / "cache"))
    recipe = write_recipe(tmp_path / "tiny.yaml", tmp_path / "run", **MIXTURE)
    rc, out, err = run_cli(["prepare", recipe], capsys)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["phase pretrain-1 source code", "phase pretrain-1 source text"]
    assert all(": prepared in " in line for line in lines)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one cache entry per source, shared by both phases
    rc, out, err = run_cli(["prepare", recipe], capsys)
    assert rc == 0 and out.count("already prepared") == 2, out


@pytest.mark.parametrize("sets,fragments", [
    (["phases.pretrain-2.mixture.txt=0.1"], ["phases[1].mixture['txt']", "unknown source 'txt'", "did you mean 'text'",
                                             "code, text"]),
    (["phases.pretrain-2.mixture.text=0"], ["phases[1].mixture['text'] must be > 0"]),
    (["phases.pretrain-1.mixture.code=-1"], ["phases[0].mixture['code'] must be > 0"]),
    (["phases.pretrain-1.data={source: stdlib}"], ["phases[0].mixture", "not both"]),
    (["sources.1.name=code"], ["sources[1].name", "'code' is used twice"]),
    (["sources.text.data.part=heldout"], ["sources.text.data", "held-out stdlib modules"]),
    (["sources.code.data.heldout_fraction=0.05"], ["sources.code.data", "heldout_fraction 0.05"]),
    (["sparsity.method=rigl"], ["sparsity.method 'rigl'", "this recipe has 2", "one pre-training phase"]),
    (["phases.finetune.mixture={code: 1}"], ["phases[2].mixture is only for pretrain phases"]),
])
def test_bad_mixtures_are_one_line_user_errors(tmp_path, capsys, sets, fragments):
    recipe = write_recipe(tmp_path / "tiny.yaml", tmp_path / "run", *sets, **MIXTURE)
    rc, _, err = run_cli(["pretrain", recipe], capsys)
    assert_user_error(rc, err, *fragments)
    assert not (tmp_path / "run").exists()


def test_mixture_and_sources_decide_the_fingerprint(tmp_path):
    def fingerprint(*sets):
        return recipe_fingerprint(load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "run", *sets, **MIXTURE)))

    base = fingerprint()
    assert fingerprint("phases.pretrain-2.mixture.text=0.1") != base
    assert fingerprint("sources.text.data.max_bytes=50000") != base
    assert fingerprint("sources.text.data.workers=1", "phases.pretrain-2.steps=99") == base


def test_trackers_get_the_tokens_of_each_source_as_numbers(tmp_path):
    from spdf.train.metrics import MetricsLog

    class Tracking:
        trackers = ["tensorboard"]

        def __init__(self):
            self.logged = []

        def log(self, values, step):
            self.logged.append((values, step))

    accelerator = Tracking()
    MetricsLog(tmp_path / "metrics.jsonl", accelerator).write(
        {"phase": "p", "step": 3, "tokens": 10, "tokens_by_source": {"code": 7, "text": 3}})
    assert accelerator.logged == [({"p/tokens": 10, "p/tokens_by_source/code": 7, "p/tokens_by_source/text": 3}, 3)]
