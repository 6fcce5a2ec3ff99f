"""Non-finite state is never saved, exported or resumed: an update that turns the weights NaN/inf (a finite loss
and gradient norm, an absurd learning rate) stops the run with exit 3 before any checkpoint, export or done.json is
written from it; the message says truthfully what is on disk; rotation keeps the last good checkpoint; a resume
and `--from` skip or refuse a checkpoint that holds non-finite values (as an older spdf could write)."""
from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from spdf.manifest import write_manifest
from spdf.train.nonfinite import all_finite
from tiny_runs import PRETRAIN_STEPS, assert_user_error, run_cli, truncate_to_kill, tree_digest

ABSURD = ["--set", "phases.pretrain.optimizer.lr=1e40", "--set", "phases.pretrain.schedule.warmup_steps=0"]


def _finite_file(path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values() if t.is_floating_point())


def test_all_finite_sees_nan_and_inf_but_not_huge_values():
    assert all_finite([torch.full((3,), 3e38), torch.zeros(0), torch.ones(2, dtype=torch.bfloat16)])  # norm overflows
    assert all_finite([torch.full((4,), 3e38, dtype=torch.bfloat16), torch.full((2, 2), -3e38)])
    assert not all_finite([torch.ones(4), torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor([float("-inf")], dtype=torch.bfloat16)])


def test_one_absurd_step_writes_nothing_and_exits_3(finished_copy, capsys):
    """The issue's repro: one step at lr 1e40 gives finite loss and gradients but infinite weights."""
    run_dir, recipe = finished_copy
    truncate_to_kill(run_dir, "pretrain", last_step=0, keep_checkpoints_upto=None)
    rc, _, err = run_cli(["pretrain", recipe, "--set", "phases.pretrain.steps=1", *ABSURD], capsys)
    assert rc == 3, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("spdf: error: [pretrain]") and "NaN or inf" in last and "after step 1" in last
    assert "no checkpoint of phase 'pretrain' was written" in last and "Traceback" not in err
    phase = run_dir / "phases/pretrain"
    assert not (phase / "export").exists() and not (phase / "done.json").exists()
    assert not list((phase / "checkpoints").glob("step-*"))


def test_checkpoint_every_step_keeps_only_finite_checkpoints(finished_copy, capsys):
    """Resumed from step 6 with keep: 1 and a checkpoint every step: the first update diverges, nothing is written,
    rotation deletes nothing, and the message names step 6 as what is left."""
    run_dir, recipe = finished_copy
    truncate_to_kill(run_dir, "pretrain", last_step=6, keep_checkpoints_upto=6)
    ckpts = run_dir / "phases/pretrain/checkpoints"
    before = tree_digest(ckpts)
    rc, _, err = run_cli(["pretrain", recipe, "--set", "phases.pretrain.checkpoint.every_steps=1",
                          "--set", "phases.pretrain.checkpoint.keep=1", *ABSURD], capsys)
    assert rc == 3, err
    assert "the newest checkpoint of phase 'pretrain' is step 6" in err.strip().splitlines()[-1]
    assert tree_digest(ckpts) == before
    for ckpt in ckpts.glob("step-*"):
        assert _finite_file(ckpt / "model.safetensors")
    assert not (run_dir / "phases/pretrain/done.json").exists()


def _poison(checkpoint) -> None:
    """Put a NaN into a checkpoint's weights and re-write its manifest, as an older spdf saved diverged state."""
    weights = load_file(str(checkpoint / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    weights[name].view(-1)[1] = float("nan")
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    write_manifest(checkpoint)


def test_resume_skips_a_non_finite_checkpoint(finished_copy, finished_run, capsys):
    run_dir, recipe = finished_copy
    truncate_to_kill(run_dir, "pretrain", last_step=PRETRAIN_STEPS, keep_checkpoints_upto=PRETRAIN_STEPS)
    bad = run_dir / "phases/pretrain/checkpoints/step-00000008"
    _poison(bad)
    rc, out, err = run_cli(["pretrain", recipe], capsys)
    assert rc == 0, err
    assert f"checkpoint {bad} holds NaN or inf" in err and "skipped" in err
    assert "step-00000006" in out
    assert _finite_file(run_dir / "phases/pretrain/export/model.safetensors")


def test_from_a_non_finite_checkpoint_is_refused(finished_copy, tmp_path, capsys):
    run_dir, recipe = finished_copy
    bad = run_dir / "phases/pretrain/checkpoints/step-00000008"
    _poison(bad)
    rc, _, err = run_cli(["finetune", recipe, "--from", bad, "--set", f"run_dir={tmp_path / 'ft'}"], capsys)
    assert_user_error(rc, err, str(bad), "NaN or inf")
