"""Lose nothing: damaged checkpoints fall back to the newest verified one, diverging training stops with exit 3
keeping the last good checkpoint, a stop signal leaves a checkpoint at the current step and resumes exactly, and a
second run on a directory in use is refused.

Most cases cut a copy of the session's finished tiny run back to "killed during pre-training" (tiny_runs) and run
`spdf pretrain` in process; one test uses a real subprocess for the signal and the lock.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spdf.train.checkpoint as checkpoint_module
from spdf.export import CheckpointError
from spdf.layout import LOCK_FILE
from spdf.train.lock import RunLock
from spdf.train.metrics import MetricsLog
from tiny_runs import (PRETRAIN_STEPS, assert_user_error, copy_run, loss_trace, read_metrics, run_cli,
                       subprocess_env, tree_digest, truncate_to_kill, wait_for)

CKPT_FILES = ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "spdf.json",
              "manifest.json"]


def _flip_middle(file, n: int = 64) -> None:
    data = bytearray(file.read_bytes())
    mid = max(len(data) // 2 - n // 2, 0)
    for i in range(mid, min(mid + n, len(data))):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def _damage(file, how: str) -> None:
    if how == "flip":
        _flip_middle(file)
    elif how == "truncate":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    else:
        file.unlink()


@pytest.fixture
def verified_run(finished_copy):
    """A copy of the finished run cut back to a kill right after step 8's checkpoint: step-6 and step-8 remain, each
    with its manifest."""
    run_dir, recipe = finished_copy
    truncate_to_kill(run_dir, "pretrain", last_step=PRETRAIN_STEPS, keep_checkpoints_upto=PRETRAIN_STEPS)
    ckpts = run_dir / "phases/pretrain/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000006", "step-00000008"]
    assert all((p / "manifest.json").is_file() for p in ckpts.iterdir())
    return run_dir, recipe


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("name", CKPT_FILES)
def test_damaged_newest_checkpoint_falls_back(verified_run, monkeypatch, name, how):
    """Each file of the newest checkpoint damaged in each way: resume picks the previous one and names the bad one."""
    run_dir, _ = verified_run
    root = run_dir / "phases/pretrain/checkpoints"
    _damage(root / "step-00000008" / name, how)
    loaded, warnings = [], []
    monkeypatch.setattr(checkpoint_module, "load_checkpoint", lambda acc, path, expect: loaded.append(path.name))
    chosen = checkpoint_module.resume_checkpoint(None, root, {}, warnings.append)
    assert chosen.name == "step-00000006" and loaded == ["step-00000006"]
    assert len(warnings) == 1 and "step-00000008" in warnings[0] and "skipped" in warnings[0], warnings


def test_a_checkpoint_manifest_that_leaves_a_file_out_is_damaged_for_resume_and_inspect(verified_run, capsys):
    """A checkpoint gains no file after its manifest: one it does not list means the manifest is not the one written
    with those files. Resume skips it, and `spdf inspect --verify` reports it, by the same rule."""
    run_dir, _ = verified_run
    root = run_dir / "phases/pretrain/checkpoints"
    manifest = root / "step-00000008" / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["files"]["optimizer.bin"]
    manifest.write_text(json.dumps(data))
    warnings = []
    with pytest.raises(checkpoint_module.DamagedCheckpoint, match="does not list optimizer.bin"):
        checkpoint_module.check_checkpoint(root / "step-00000008", warnings.append)
    rc, out, err = run_cli(["inspect", "--verify", run_dir / "phases/pretrain"], capsys)
    assert_user_error(rc, err, "1 of 2 damaged")  # step-6 and step-8; the phase has no export yet
    damaged = [line for line in out.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 1 and "step-00000008" in damaged[0] and "does not list optimizer.bin" in damaged[0], out
    # --json gives the same verdicts as data (it was ignored: the text lines came out)
    rc, out, err = run_cli(["inspect", "--verify", "--json", run_dir / "phases/pretrain"], capsys)
    assert_user_error(rc, err, "1 of 2 damaged")
    verdicts = {Path(r["path"]).name: (r["status"], r["detail"]) for r in json.loads(out)}
    assert verdicts["step-00000006"][0] == "ok" and verdicts["step-00000008"][0] == "DAMAGED"
    assert "does not list optimizer.bin" in verdicts["step-00000008"][1]


def test_no_usable_checkpoint_is_refused(verified_run, monkeypatch):
    run_dir, _ = verified_run
    root = run_dir / "phases/pretrain/checkpoints"
    for ckpt in root.iterdir():
        _flip_middle(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint .* is usable"):
        checkpoint_module.resume_checkpoint(None, root, {}, lambda message: None)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin"])
def test_flipped_byte_resumes_from_previous_checkpoint_identically(verified_run, finished_run, capsys, name):
    run_dir, recipe = verified_run
    bad = run_dir / "phases/pretrain/checkpoints/step-00000008"
    _flip_middle(bad / name)
    rc, out, err = run_cli(["pretrain", recipe], capsys)
    assert rc == 0, err
    assert f"checkpoint {bad} is damaged" in err and name in err
    assert "resumed from" in out and "step-00000006" in out
    assert loss_trace(run_dir, "pretrain") == loss_trace(finished_run["run_dir"], "pretrain")
    export = tree_digest(run_dir / "phases/pretrain/export")
    reference = tree_digest(finished_run["run_dir"] / "phases/pretrain/export")
    assert export["model.safetensors"] == reference["model.safetensors"]
    # the re-written step-8 verifies, and rotation kept the checkpoint it resumed from until then
    rc, out, err = run_cli(["inspect", "--verify", run_dir / "phases/pretrain"], capsys)
    assert rc == 0 and "DAMAGED" not in out and out.count("ok") >= 3, out


def test_damaged_export_is_refused(finished_copy, tmp_path, capsys):
    run_dir, recipe = finished_copy
    export = tmp_path / "export"
    from spdf.export import read_export, write_export
    source = run_dir / "phases/pretrain/export"
    write_export(read_export(source).model, export, tokenizer_file=source / "tokenizer.json")  # with a manifest
    _flip_middle(export / "model.safetensors")
    rc, _, err = run_cli(["finetune", recipe, "--from", export, "--set", f"run_dir={tmp_path / 'ft'}"], capsys)
    assert_user_error(rc, err, "damaged", "model.safetensors")
    assert not (tmp_path / "ft").exists()  # refused before the run directory is made
    rc, out, err = run_cli(["inspect", "--verify", export], capsys)
    assert_user_error(rc, err, "1 of 1 damaged")
    assert out.startswith("DAMAGED")


def test_diverging_training_stops_with_exit_3_and_keeps_the_last_good_checkpoint(finished_copy, capsys):
    run_dir, recipe = finished_copy
    truncate_to_kill(run_dir, "pretrain", last_step=0, keep_checkpoints_upto=None)
    # an LR that overflows fp32 weights on the second step: every step after it is NaN
    rc, _, err = run_cli(["pretrain", recipe, "--set", "phases.pretrain.optimizer.lr=1e30",
                          "--set", "phases.pretrain.checkpoint.every_steps=1",
                          "--set", "phases.pretrain.optimizer.max_nonfinite_steps=2"], capsys)
    assert rc == 3, err
    lines = err.strip().splitlines()
    assert "step skipped (1 of at most 2 in a row)" in err and "Traceback" not in err
    assert lines[-1].startswith("spdf: error: [pretrain] training diverged")
    phase = run_dir / "phases/pretrain"
    assert not (phase / "export").exists() and not (phase / "done.json").exists()
    steps = [int(p.name.split("-")[1]) for p in (phase / "checkpoints").glob("step-*")]
    good = max(steps)
    logged = [r for r in read_metrics(run_dir) if r["phase"] == "pretrain" and "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, good + 1))  # no record of a skipped step
    text = (run_dir / "metrics.jsonl").read_text()
    json.loads("[" + ",".join(text.splitlines()) + "]", parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    rc, out, _ = run_cli(["inspect", "--verify", phase], capsys)
    assert rc == 0 and "DAMAGED" not in out


def test_non_finite_validation_is_null_in_json(tmp_path):
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    metrics.write({"phase": "p", "step": 1, "val_loss": float("nan"), "val_ppl": float("inf")})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"phase": "p", "step": 1, "val_loss": None,
                                                                     "val_ppl": None}


def test_stop_signal_checkpoints_the_current_step_and_resumes_identically(finished_copy, finished_run, capsys,
                                                                          monkeypatch):
    """SIGTERM delivered while step 2 is logged (after that step's stop flag was reduced): the run finishes step 3,
    checkpoints it (not a multiple of checkpoint.every_steps) and exits 143; run again, it gives the uninterrupted
    run's losses."""
    run_dir, recipe = finished_copy
    truncate_to_kill(run_dir, "pretrain", last_step=0, keep_checkpoints_upto=None)
    write = MetricsLog.write

    def write_then_signal(self, record):
        write(self, record)
        if record.get("step") == 2 and "loss" in record:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLog, "write", write_then_signal)
    rc, _, err = run_cli(["pretrain", recipe], capsys)
    assert rc == 143, err
    assert "SIGTERM: stopped at step 3 of phase 'pretrain' with a checkpoint" in err
    assert (run_dir / "phases/pretrain/checkpoints/step-00000003").is_dir()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(MetricsLog, "write", write)
    rc, out, err = run_cli(["pretrain", recipe], capsys)
    assert rc == 0, err
    assert "step-00000003" in out
    assert loss_trace(run_dir, "pretrain") == loss_trace(finished_run["run_dir"], "pretrain")


def test_second_run_on_a_directory_in_use_exits_2(finished_copy, capsys):
    run_dir, recipe = finished_copy
    before = tree_digest(run_dir)
    lock = RunLock(run_dir).acquire()  # as another process holding it would (flock is per open file)
    try:
        rc, _, err = run_cli(["run", recipe], capsys)
    finally:
        lock.release()
    assert_user_error(rc, err, str(run_dir), f"pid {os.getpid()}", "in use")
    assert tree_digest(run_dir) == before


def test_real_sigterm_and_a_concurrent_run(finished_run, cache_dir, tmp_path, capsys):
    """A real `spdf pretrain` process: a second run on its directory is refused at once naming its pid; SIGTERM
    stops it with a checkpoint at the last step it logged (exit 143); resumed, every step is logged exactly once."""
    run_dir, recipe = copy_run(finished_run["run_dir"], tmp_path / "run", tmp_path / "tiny.yaml",
                               "phases.pretrain.steps=40")
    shutil.rmtree(run_dir / "phases")
    (run_dir / "metrics.jsonl").unlink()
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "spdf", "pretrain", str(recipe)], cwd=tmp_path, stdout=out,
                                stderr=err, env=subprocess_env(cache_dir))
        try:
            logged = lambda: [r["step"] for r in read_metrics(run_dir) if "loss" in r] if (
                run_dir / "metrics.jsonl").exists() else []
            wait_for(lambda: len(logged()) >= 2, proc, 240, "two steps were logged")
            assert f"pid {proc.pid}" in (run_dir / LOCK_FILE).read_text()
            rc, _, second = run_cli(["pretrain", recipe], capsys)
            assert_user_error(rc, second, f"pid {proc.pid}")
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = (tmp_path / "err").read_text()
    assert proc.returncode == 143, stderr
    assert "SIGTERM received" in stderr and "Traceback" not in stderr
    last = max(r["step"] for r in read_metrics(run_dir) if "loss" in r)
    assert (run_dir / f"phases/pretrain/checkpoints/step-{last:08d}").is_dir()
    rc, _, err = run_cli(["pretrain", recipe], capsys)
    assert rc == 0, err
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, 41))


def test_a_single_non_finite_step_is_skipped_and_training_goes_on(finished_copy, capsys, monkeypatch):
    """One NaN loss at the 4th training step: that step makes no update (weights, masks, optimizer state, LR step
    count untouched), the next batch takes its place, and the phase still ends at step 8 with finite exports."""
    import spdf.train.loop as loop
    import torch
    from safetensors.torch import load_file

    run_dir, recipe = finished_copy
    truncate_to_kill(run_dir, "pretrain", last_step=0, keep_checkpoints_upto=None)
    real, calls = loop._loss_sum, []

    def loss_with_one_nan(model, idx, targets):
        loss = real(model, idx, targets)
        calls.append(model.training)
        training_calls = sum(calls)
        return loss * float("nan") if model.training and training_calls == 4 else loss

    monkeypatch.setattr(loop, "_loss_sum", loss_with_one_nan)
    rc, _, err = run_cli(["pretrain", recipe], capsys)
    assert rc == 0, err
    assert "[pretrain] step 4: non-finite loss or gradient norm; step skipped (1 of at most 3 in a row)" in err
    logged = [r for r in read_metrics(run_dir) if r["phase"] == "pretrain" and "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, PRETRAIN_STEPS + 1))
    assert all(isinstance(r["loss"], float) for r in logged)
    weights = load_file(str(run_dir / "phases/pretrain/export/model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    from spdf.export import read_export
    sparse = read_export(run_dir / "phases/pretrain/export")
    for name, mask in sparse.masks.items():  # masked weights still exactly zero: no update escaped the masks
        assert not sparse.model.get_submodule(name).weight[~mask].any()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names the fsync'ed files through /proc")
def test_checkpoint_and_export_reach_the_disk_before_older_state_is_deleted(tmp_path, monkeypatch):
    """A power loss must not find a published checkpoint whose bytes never reached the disk while the older ones,
    deleted by rotation right after, are gone: every file and directory is fsync'ed before the rename, and the
    rename before anything is deleted. The same for an export, which the phase's done.json follows."""
    from accelerate import Accelerator

    from spdf.export import write_export
    from spdf.model.config import GPTConfig
    from spdf.model.gpt import GPT

    accelerator = Accelerator(cpu=True)
    model = GPT(GPTConfig.from_name("tiny-test"))
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    root = tmp_path / "checkpoints"
    checkpoint_module.save_checkpoint(accelerator, root, 1, {"step": 1}, keep=1)
    events = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", str(a), str(b))) or real_replace(a, b))
    monkeypatch.setattr(shutil, "rmtree",
                        lambda p, *a, **k: events.append(("delete", str(p))) or real_rmtree(p, *a, **k))

    def published(final, before_deleting):
        """Every file of `final` fsync'ed under its temporary name, then the directories, then the rename; the
        parent after it; and `before_deleting` only after all that."""
        tmp = str(final.parent / f".tmp-{final.name}")
        rename = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(final))
        synced = {e[1] for e in events[:rename] if e[0] == "fsync"}
        names = [str(p.relative_to(final)) for p in final.rglob("*")]
        assert names and all(any(s == f"{tmp}/{n}" or s.startswith(f"{tmp}.") and s.endswith(f"/{n}") for s in synced)
                             for n in names), (names, synced)
        assert any(s == tmp or s.startswith(f"{tmp}.") and "/" not in s[len(tmp):] for s in synced), synced
        parent = next(i for i, e in enumerate(events) if i > rename and e == ("fsync", str(final.parent)))
        if before_deleting is not None:
            assert events.index(("delete", str(before_deleting))) > parent

    step2 = checkpoint_module.save_checkpoint(accelerator, root, 2, {"step": 2}, keep=1)
    published(step2, before_deleting=root / "step-00000001")
    assert not (root / "step-00000001").exists()
    events.clear()
    export = write_export(accelerator.unwrap_model(model), tmp_path / "export")
    published(export, before_deleting=None)
