"""Exact resume: a run killed at any point and run again replays the uninterrupted run's losses, bit for bit.

One test kills a real `python -m spdf run` with SIGKILL; the others cut a finished run back to what a kill at a
chosen point leaves on disk (metrics up to that step and a half-written line, the checkpoints written before it,
no export or done.json), which makes every interesting point reachable without timing luck.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from spdf.recipe import Recipe
from spdf.train import run_dir as run_dir_module

from tiny_runs import (assert_user_error, copy_run, loss_trace, read_metrics, run_cli, spdf_subprocess,
                       subprocess_env, tree_digest, truncate_to_kill, wait_for, write_recipe)


def _train_steps_logged(run_dir, phase: str) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("phase") == phase and "loss" in r:
            steps.append(r["step"])
    return steps


def _plant_half_written_checkpoint(ckpt_root, step: int):
    """What a kill during save_checkpoint leaves: a temp directory with a truncated model file."""
    tmp = ckpt_root / f".tmp-step-{step:08d}"
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    (tmp / "spdf.json").write_text(json.dumps({"step": step, "phase": "pretrain"}))
    return tmp


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("sigkill")
    run_dir = root / "run"
    recipe = write_recipe(root / "tiny.yaml", run_dir)
    ckpt_root = run_dir / "phases/pretrain/checkpoints"
    with open(root / "killed.out", "w") as out, open(root / "killed.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "spdf", "run", str(recipe)], cwd=root, stdout=out,
                                stderr=err, env=subprocess_env(cache_dir))
        try:
            first = wait_for(lambda: sorted(ckpt_root.glob("step-*")), proc, 240, "a checkpoint appeared")
            ckpt_step = int(first[0].name.split("-")[1])
            # let it log past the checkpoint, so the resumed run must also drop what the killed one wrote after it
            wait_for(lambda: any(s > ckpt_step for s in _train_steps_logged(run_dir, "pretrain")), proc, 120,
                      "a step after the checkpoint was logged")
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    at_kill = {"checkpoints": sorted(p.name for p in ckpt_root.glob("step-*")),
               "logged": _train_steps_logged(run_dir, "pretrain"),
               "done": (run_dir / "phases/pretrain/done.json").exists()}
    planted = _plant_half_written_checkpoint(ckpt_root, 99)
    resumed = spdf_subprocess(["run", recipe], cache_dir, cwd=root)
    return {"run_dir": run_dir, "at_kill": at_kill, "resumed": resumed, "planted": planted}


def test_sigkilled_run_resumes_to_the_end(killed_and_resumed):
    k = killed_and_resumed
    proc, run_dir = k["resumed"], k["run_dir"]
    assert not k["at_kill"]["done"] and k["at_kill"]["checkpoints"], k["at_kill"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    newest = k["at_kill"]["checkpoints"][-1]
    step = int(newest.split("-")[1])
    assert f"[pretrain] resumed from {run_dir / 'phases/pretrain/checkpoints' / newest} (step {step}/8)" in proc.stdout
    assert "spdf run finished" in proc.stdout
    for phase in ("pretrain", "finetune"):
        assert (run_dir / "phases" / phase / "done.json").is_file()
        assert (run_dir / "phases" / phase / "export/model.safetensors").is_file()
    # the half-written checkpoint was not resumed from (it would have failed to load, or jumped to step 99), and it
    # is gone: no later save of step 99 would have reused it, and it is as large as a checkpoint
    assert ".tmp-step-00000099" not in proc.stdout and "step 99" not in proc.stdout
    assert not k["planted"].exists()


def test_sigkilled_run_replays_the_uninterrupted_losses_exactly(killed_and_resumed, finished_run):
    run_dir = killed_and_resumed["run_dir"]
    assert loss_trace(run_dir) == loss_trace(finished_run["run_dir"])
    # and the file reads as one run: every (phase, step, kind) once
    keys = [(p, s, kind) for p, s, kind, _ in loss_trace(run_dir)]
    assert len(keys) == len(set(keys))
    ref = load_file(str(finished_run["run_dir"] / "phases/finetune/export/model.safetensors"))
    ours = load_file(str(run_dir / "phases/finetune/export/model.safetensors"))
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


@pytest.mark.parametrize("phase,last_step,checkpoint", [
    ("pretrain", 7, 6),   # killed during step 8 of pre-training: resume from step 6, drop step 7's records
    ("finetune", 3, 2),   # killed during fine-tuning: pre-training is skipped, fine-tuning resumes densified
])
def test_resume_mid_phase_replays_exactly(finished_run, tmp_path, capsys, phase, last_step, checkpoint):
    run_dir, recipe = copy_run(finished_run["run_dir"], tmp_path / "run", tmp_path / "tiny.yaml")
    truncate_to_kill(run_dir, phase, last_step, keep_checkpoints_upto=checkpoint)
    rc, out, err = run_cli(["run", recipe], capsys)
    assert rc == 0, err
    assert f"[{phase}] resumed from {run_dir / 'phases' / phase / 'checkpoints' / f'step-{checkpoint:08d}'}" in out
    if phase == "finetune":
        assert "[pretrain] already finished" in out
    assert loss_trace(run_dir) == loss_trace(finished_run["run_dir"])
    read_metrics(run_dir)  # every line is whole JSON again: the half-written one was dropped
    for p in ("pretrain", "finetune"):
        ref = load_file(str(finished_run["run_dir"] / "phases" / p / "export/model.safetensors"))
        ours = load_file(str(run_dir / "phases" / p / "export/model.safetensors"))
        assert all(torch.equal(ours[k], ref[k]) for k in ref), p


def test_a_checkpoint_resumes_only_on_the_number_of_processes_that_wrote_it(finished_run, tmp_path, capsys):
    """Each process saves its own random and data-order state: a launch with another number of processes is refused
    by every rank alike (one with a rank whose state file is missing would otherwise fall back to an older
    checkpoint on that rank alone), and nothing on disk changes."""
    from spdf.manifest import write_manifest
    from tiny_runs import assert_user_error, tree_digest

    run_dir, recipe = copy_run(finished_run["run_dir"], tmp_path / "run", tmp_path / "tiny.yaml")
    truncate_to_kill(run_dir, "pretrain", 7, keep_checkpoints_upto=6)
    ckpt = run_dir / "phases/pretrain/checkpoints/step-00000006"
    meta = json.loads((ckpt / "spdf.json").read_text())
    assert meta["processes"] == 1  # recorded by the run that wrote it
    (ckpt / "spdf.json").write_text(json.dumps({**meta, "processes": 2}))  # as a 2-process launch writes it
    write_manifest(ckpt)
    before = tree_digest(run_dir)
    rc, _, err = run_cli(["run", recipe], capsys)
    assert_user_error(rc, err, "step-00000006 was written by 2 process(es), this launch has 1",
                      "accelerate launch --num_processes 2")
    assert tree_digest(run_dir) == before
    # an older spdf's checkpoint records no number: its RNG files (one per process) tell it
    (ckpt / "spdf.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "processes"}))
    (ckpt / "random_states_1.pkl").write_bytes((ckpt / "random_states_0.pkl").read_bytes())
    write_manifest(ckpt)
    rc, _, err = run_cli(["run", recipe], capsys)
    assert_user_error(rc, err, "step-00000006 was written by 2 process(es), this launch has 1")


def test_killed_after_the_final_checkpoint_only_exports(finished_run, tmp_path, capsys):
    """Killed between the phase's last checkpoint and its done.json; a half-written later checkpoint is ignored."""
    run_dir, recipe = copy_run(finished_run["run_dir"], tmp_path / "run", tmp_path / "tiny.yaml")
    truncate_to_kill(run_dir, "pretrain", 8, keep_checkpoints_upto=8)
    _plant_half_written_checkpoint(run_dir / "phases/pretrain/checkpoints", 10)
    rc, out, err = run_cli(["pretrain", recipe], capsys)
    assert rc == 0, err
    assert "resumed from" in out and "step-00000008 (step 8/8)" in out
    assert loss_trace(run_dir) == loss_trace(finished_run["run_dir"], "pretrain")
    ref_dir = finished_run["run_dir"] / "phases/pretrain"
    for name in ("model.safetensors", "masks.safetensors", "config.json", "tokenizer.json"):
        assert (run_dir / "phases/pretrain/export" / name).read_bytes() == (ref_dir / "export" / name).read_bytes()
    ours, ref = (json.loads((d / "done.json").read_text()) for d in (run_dir / "phases/pretrain", ref_dir))
    for key in ("steps", "tokens", "val_loss_before", "val_loss_after", "flops_spent", "flops_dense_equivalent"):
        assert ours[key] == ref[key], key


def test_resuming_past_fewer_steps_than_the_checkpoint_reached_is_refused(finished_run, tmp_path, capsys):
    """An unfinished phase's steps may change, but not below the step its checkpoint reached: it would "finish" at
    once, its done.json saying 6 steps where recipe.yaml says 4."""
    run_dir, recipe = copy_run(finished_run["run_dir"], tmp_path / "run", tmp_path / "tiny.yaml")
    truncate_to_kill(run_dir, "pretrain", 6, keep_checkpoints_upto=6)
    checkpoints = tree_digest(run_dir / "phases/pretrain/checkpoints")
    rc, _, err = run_cli(["pretrain", recipe, "--set", "phases.pretrain.steps=4"], capsys)
    assert_user_error(rc, err, "phases.pretrain.steps", "step 6", "at least 6")
    assert not (run_dir / "phases/pretrain/done.json").exists()
    assert tree_digest(run_dir / "phases/pretrain/checkpoints") == checkpoints


def test_killed_before_the_first_checkpoint_restarts_cleanly(finished_run, tmp_path, capsys):
    run_dir, recipe = copy_run(finished_run["run_dir"], tmp_path / "run", tmp_path / "tiny.yaml")
    truncate_to_kill(run_dir, "pretrain", 1, keep_checkpoints_upto=None)
    rc, out, err = run_cli(["pretrain", recipe], capsys)
    assert rc == 0, err
    assert loss_trace(run_dir) == loss_trace(finished_run["run_dir"], "pretrain")


@pytest.fixture(scope="module")
def logged_every_3(tmp_path_factory, cache_dir):
    """Pre-training alone with train records every 3 steps while checkpoints come every 2."""
    root = tmp_path_factory.mktemp("log3")
    sets = ("logging.every_steps=3", "phases.pretrain.checkpoint.keep=10")
    recipe = write_recipe(root / "tiny.yaml", root / "run", *sets)
    from spdf.cli import main
    assert main(["pretrain", str(recipe)]) == 0
    return root / "run", sets


def test_resume_between_two_logged_steps_replays_the_logged_loss(logged_every_3, tmp_path, capsys):
    reference, sets = logged_every_3
    run_dir, recipe = copy_run(reference, tmp_path / "run", tmp_path / "tiny.yaml", *sets)
    truncate_to_kill(run_dir, "pretrain", 5, keep_checkpoints_upto=4)  # logs at 3 and 6; resume from 4
    rc, out, err = run_cli(["pretrain", recipe], capsys)
    assert rc == 0, err
    assert "step-00000004 (step 4/8)" in out
    assert loss_trace(run_dir) == loss_trace(reference)


def test_a_start_killed_while_recording_its_recipe_starts_again(tmp_path, capsys, monkeypatch):
    """Killed after the first of recipe.yaml and fingerprint.json (before any phase wrote anything): the same
    command starts again; before, a recipe.yaml without its fingerprint.json refused the directory for good."""
    recipe = write_recipe(tmp_path / "tiny.yaml", tmp_path / "run")
    written = []

    def second_dies(real):
        def write(first, second, *args, **kwargs):  # (recipe, path) or (path, data)
            written.append(second if isinstance(first, Recipe) else first)
            if len(written) == 2:
                raise KeyboardInterrupt  # what a SIGKILL there leaves: the first file only
            return real(first, second, *args, **kwargs)
        return write

    with monkeypatch.context() as m:
        for name in ("dump_recipe", "write_json_atomic"):
            m.setattr(run_dir_module, name, second_dies(getattr(run_dir_module, name)))
        rc, _, _ = run_cli(["prepare", recipe], capsys)
    assert rc == 130 and len(written) == 2 and written[0].exists() and not written[1].exists()
    rc, _, err = run_cli(["prepare", recipe], capsys)
    assert rc == 0, err
    assert (tmp_path / "run" / "recipe.yaml").is_file() and (tmp_path / "run" / "fingerprint.json").is_file()


def test_a_tokenizer_copy_killed_half_way_is_made_again_with_its_record(tmp_path, monkeypatch):
    """`finetune --from` / a file tokenizer copies tokenizer.json into the run directory with a sidecar holding its
    sha256. Killed after the first of the two files, the next start must not keep a tokenizer.json without its
    record: it would never be verified again."""
    from spdf.data import TokenizerSpec, load_or_train_tokenizer
    from spdf.train import runner

    source = load_or_train_tokenizer(TokenizerSpec(kind="train", vocab_size=260), ["def f(): pass"] * 20,
                                     tmp_path / "made").path
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    writes = []

    def second_dies(real):
        def write(*args, **kwargs):
            writes.append(real.__name__)
            if len(writes) == 2:
                raise KeyboardInterrupt  # what a SIGKILL there leaves: the first file only
            return real(*args, **kwargs)
        return write

    with monkeypatch.context() as m:
        m.setattr(runner, "record_tokenizer", second_dies(runner.record_tokenizer))
        m.setattr(runner, "replacing_file", second_dies(runner.replacing_file))
        with pytest.raises(KeyboardInterrupt):
            runner._keep_copy(source, run_dir)
    kept = runner._keep_copy(source, run_dir)
    assert kept.read_bytes() == source.read_bytes()
    record = json.loads((run_dir / "tokenizer_spec.json").read_text())
    assert record["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()


def _resume_on_rebuilt_data(finished_run, tmp_path, capsys, monkeypatch, documents):
    """Resume pre-training from step 6 on a cache entry rebuilt (a fresh cache, another key) from `documents`."""
    from spdf.data import packing

    run_dir, recipe = copy_run(finished_run["run_dir"], tmp_path / "run", tmp_path / "tiny.yaml")
    truncate_to_kill(run_dir, "pretrain", 6, keep_checkpoints_upto=6)
    monkeypatch.setenv("SPDF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(packing, "source_fingerprint", lambda source: {"another": "key"})  # a touched corpus file
    real = packing.iter_documents
    monkeypatch.setattr(packing, "iter_documents", lambda source: documents(real(source)))
    return run_dir, run_cli(["pretrain", recipe], capsys)


def test_a_phase_resumes_on_the_same_data_under_another_cache_key(finished_run, tmp_path, capsys, monkeypatch):
    run_dir, (rc, out, err) = _resume_on_rebuilt_data(finished_run, tmp_path, capsys, monkeypatch, lambda docs: docs)
    assert rc == 0, err
    assert "step-00000006 (step 6/8)" in out
    assert loss_trace(run_dir) == loss_trace(finished_run["run_dir"], "pretrain")


def test_a_phase_does_not_resume_on_other_data(finished_run, tmp_path, capsys, monkeypatch):
    """The sampler's saved position indexes rows of the data: on other rows the resumed run would silently not
    continue the one it claims to (before, it trained on without a word)."""
    run_dir, (rc, _, err) = _resume_on_rebuilt_data(finished_run, tmp_path, capsys, monkeypatch,
                                                    lambda docs: itertools.islice(docs, 1, None))
    assert_user_error(rc, err, "not what its checkpoint was trained on")
    assert not (run_dir / "phases/pretrain/done.json").exists()
