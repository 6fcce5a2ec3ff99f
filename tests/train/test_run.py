"""`spdf run` end to end on the tiny demo: what lands in the run directory, and that it is right."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from spdf.flops import analytic_flops
from spdf.inspect import checkpoint_stats
from spdf.model.config import GPTConfig
from spdf.recipe import load_recipe
from spdf.export import find_export, find_tokenizer, read_export
from spdf.train.schedule import lr_factor
from spdf.cli import main
from tiny_runs import (session_cache_dir as cache_dir_of, FINETUNE_STEPS, PRETRAIN_STEPS, loss_trace, read_metrics, run_cli, spdf_subprocess,
                       tree_digest, write_recipe)

SPARSE_SUFFIXES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
TOKENS_PER_STEP = 4 * 32


def test_run_directory_layout(finished_run):
    run_dir = finished_run["run_dir"]
    for name in ("recipe.yaml", "fingerprint.json", "tokenizer.json", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    for phase, sparse in (("pretrain", True), ("finetune", False)):
        export = run_dir / "phases" / phase / "export"
        for name in ("model.safetensors", "config.json", "tokenizer.json"):
            assert (export / name).is_file(), (phase, name)
        assert (export / "masks.safetensors").is_file() == sparse, phase
        assert (export / "tokenizer.json").read_bytes() == (run_dir / "tokenizer.json").read_bytes()
        config = json.loads((export / "config.json").read_text())
        assert config["sparse"] is sparse and config["phase"] == phase
        assert config["model"]["n_layer"] == 2 and config["model"]["d_model"] == 32
    # keep: 2 -> the last two checkpoints of each phase (the final one included); no temp directory left behind
    assert sorted(p.name for p in (run_dir / "phases/pretrain/checkpoints").iterdir()) == [
        "step-00000006", "step-00000008"]
    assert sorted(p.name for p in (run_dir / "phases/finetune/checkpoints").iterdir()) == [
        "step-00000002", "step-00000004"]
    assert not [p for p in run_dir.rglob(".tmp*")]
    # recipe.yaml is the resolved recipe: it loads back to the same recipe as the tiny demo file
    assert load_recipe(run_dir / "recipe.yaml") == load_recipe(finished_run["recipe"])


def test_metrics_records(finished_run):
    records = read_metrics(finished_run["run_dir"])
    recipe = load_recipe(finished_run["recipe"])
    for phase, total, eval_steps in (("pretrain", PRETRAIN_STEPS, [0, 3, 6, 8]), ("finetune", FINETUNE_STEPS, [0, 2, 4])):
        spec = recipe.phase(phase)
        val = [r for r in records if r["phase"] == phase and "val_loss" in r]
        train = [r for r in records if r["phase"] == phase and "loss" in r]
        assert [r["step"] for r in val] == eval_steps  # before any training, every eval.every_steps, at the end
        assert [r["step"] for r in train] == list(range(1, total + 1))  # logging.every_steps = 1
        for r in val:
            assert math.isfinite(r["val_loss"]) and r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        for r in train:
            assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["grad_norm"] >= 0
            assert r["tokens"] == r["step"] * TOKENS_PER_STEP
            # the LR that was used for optimizer step r["step"] (0-based r["step"] - 1), from the schedule
            s = spec.schedule
            assert r["lr"] == pytest.approx(spec.optimizer.lr * lr_factor(r["step"] - 1, total, s.warmup_steps,
                                                                        s.decay, s.min_lr_ratio), rel=1e-12)
            assert r["flops_dense"] > 0 and r["flops_spent"] > 0
        flops_ratio = [r["flops_dense"] / r["flops_spent"] for r in train]
        if phase == "pretrain":  # 75% sparse attention and MLP weights, attention scores and logits dense
            cfg = GPTConfig(**json.loads((finished_run["run_dir"] / "phases/pretrain/export/config.json")
                                         .read_text())["model"])
            expected = analytic_flops(cfg, 0.75, seq_len=spec.seq_len).reduction
            assert flops_ratio == pytest.approx([expected] * len(flops_ratio), rel=1e-9) and expected > 1.5
        else:
            assert all(ratio == 1.0 for ratio in flops_ratio)
    # phases are logged in order: all of pre-training, then fine-tuning
    phases = [r["phase"] for r in records]
    assert phases == sorted(phases, key=["pretrain", "finetune"].index)


def test_done_json_summaries(finished_run):
    run_dir = finished_run["run_dir"]
    records = read_metrics(run_dir)
    for phase, total in (("pretrain", PRETRAIN_STEPS), ("finetune", FINETUNE_STEPS)):
        done = json.loads((run_dir / "phases" / phase / "done.json").read_text())
        val = {r["step"]: r["val_loss"] for r in records if r["phase"] == phase and "val_loss" in r}
        assert done["steps"] == total and done["tokens"] == total * TOKENS_PER_STEP
        assert done["val_loss_before"] == val[0] and done["val_loss_after"] == val[total]
        last = [r for r in records if r["phase"] == phase and "loss" in r][-1]
        assert done["flops_spent"] == last["flops_spent"] and done["flops_dense_equivalent"] == last["flops_dense"]
        assert done["sparse"] is (phase == "pretrain")
        assert done["export"] == str(run_dir / "phases" / phase / "export")
    pre = json.loads((run_dir / "phases/pretrain/done.json").read_text())
    fine = json.loads((run_dir / "phases/finetune/done.json").read_text())
    assert pre["flops_spent"] < pre["flops_dense_equivalent"]
    assert fine["flops_spent"] == fine["flops_dense_equivalent"]
    assert pre["val_loss_after"] < pre["val_loss_before"]  # it learned something in 8 steps
    # fine-tuning starts from the pre-trained weights, not from scratch: its first loss is far below ln(vocab)
    assert fine["val_loss_before"] < math.log(300)


def test_pretrain_export_is_exactly_75_percent_sparse(finished_run):
    export = finished_run["run_dir"] / "phases/pretrain/export"
    stats = checkpoint_stats(export)
    assert stats["sparse"] is True
    rows = {r["name"]: r for r in stats["layers"]}
    sparse_rows = [r for name, r in rows.items() if name.endswith(SPARSE_SUFFIXES)]
    assert len(sparse_rows) == 2 * len(SPARSE_SUFFIXES)  # every attention and MLP weight of both blocks
    for r in sparse_rows:
        assert r["mask_sparsity"] == 0.75, r  # exact count per tensor (random init)
        assert r["actual"] >= 0.75, r
    # and the zeros are exactly where the masks are
    exported = read_export(export)
    model, masks = exported.model, exported.masks
    assert exported.tokenizer_path == export / "tokenizer.json"
    params = dict(model.named_parameters())
    assert set(masks) == {r["name"] for r in sparse_rows}
    for name, mask in masks.items():
        weight = params[f"{name}.weight"]
        assert mask.shape == weight.shape
        assert torch.count_nonzero(weight[~mask]) == 0, name
        assert torch.count_nonzero(weight[mask]) > 0.95 * mask.sum(), name  # the kept weights are not zero


def test_finetune_export_is_dense_and_formerly_masked_weights_learned(finished_run):
    run_dir = finished_run["run_dir"]
    stats = checkpoint_stats(run_dir / "phases/finetune/export")
    assert stats["sparse"] is False and all(r["mask_sparsity"] is None for r in stats["layers"])
    pre = read_export(run_dir / "phases/pretrain/export")
    pre_model, masks = pre.model, pre.masks
    fine = load_file(str(run_dir / "phases/finetune/export/model.safetensors"))
    pre = dict(pre_model.named_parameters())
    for name, mask in masks.items():
        weight = fine[f"{name}.weight"]
        zeros_before = ~mask
        # densified: the zeros got gradients and AdamW moved (nearly) all of them in 4 steps
        assert torch.count_nonzero(weight[zeros_before]) > 0.95 * zeros_before.sum(), name
        assert not torch.equal(weight[mask], pre[f"{name}.weight"].detach()[mask]), name


def test_checkpoints_keep_masked_weights_at_zero(finished_run):
    ckpt = finished_run["run_dir"] / "phases/pretrain/checkpoints/step-00000006"
    stats = checkpoint_stats(ckpt)
    assert stats["sparse"] is True
    sparse_rows = [r for r in stats["layers"] if r["mask_sparsity"] is not None]
    assert len(sparse_rows) == 8 and all(r["mask_sparsity"] == 0.75 and r["actual"] >= 0.75 for r in sparse_rows)
    meta = json.loads((ckpt / "spdf.json").read_text())
    assert meta["step"] == 6 and meta["phase"] == "pretrain"


def test_resume_of_a_finished_run_is_a_no_op(finished_copy, cache_dir, tmp_path):
    """`python -m spdf run` (the module entry point) on a finished run: skips both phases, changes no byte."""
    run_dir, recipe = finished_copy
    before = tree_digest(run_dir)
    proc = spdf_subprocess(["run", recipe], cache_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "[pretrain] already finished" in proc.stdout and "[finetune] already finished" in proc.stdout
    assert "spdf run finished" in proc.stdout and "Traceback" not in proc.stderr
    assert tree_digest(run_dir) == before


def test_a_copied_run_still_finds_its_last_finished_phase(finished_run, tmp_path):
    """A copy that does not keep file times (cp -r, scp -r, an unpacked zip) may give the pre-training's done.json
    the newer time; `spdf evaluate RUN`, `finetune --from RUN` and `export RUN` still take the fine-tuned model."""
    copy = tmp_path / "copy"
    shutil.copytree(finished_run["run_dir"], copy, copy_function=shutil.copyfile)
    for phase, when in (("finetune", 1000), ("pretrain", 2000)):  # the order the copy happened to go in
        os.utime(copy / "phases" / phase / "done.json", (when, when))
    assert find_export(copy) == copy / "phases" / "finetune" / "export"


def test_pretrain_then_finetune_equals_run(finished_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "tiny.yaml", run_dir)
    # fine-tuning first is refused: the pre-training it would start from has not run
    rc, _, err = run_cli(["finetune", recipe], capsys)
    assert rc == 2 and err.startswith("spdf: error: ") and "spdf pretrain" in err and "--from" in err
    rc, out, _ = run_cli(["pretrain", recipe], capsys)
    assert rc == 0 and "pretrain" in out
    assert not (run_dir / "phases/finetune").exists()
    assert loss_trace(run_dir) == loss_trace(finished_run["run_dir"], "pretrain")
    rc, out, _ = run_cli(["finetune", recipe], capsys)
    assert rc == 0
    assert loss_trace(run_dir) == loss_trace(finished_run["run_dir"])
    for phase in ("pretrain", "finetune"):
        ours = load_file(str(run_dir / "phases" / phase / "export/model.safetensors"))
        ref = load_file(str(finished_run["run_dir"] / "phases" / phase / "export/model.safetensors"))
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), phase
        ours, ref = (json.loads((d / "phases" / phase / "done.json").read_text())
                     for d in (run_dir, finished_run["run_dir"]))
        for key in ("steps", "tokens", "val_loss_before", "val_loss_after", "flops_spent", "flops_dense_equivalent"):
            assert ours[key] == ref[key], (phase, key)


@pytest.fixture(scope="module", params=["export", "checkpoints/step-00000008"])
def finetuned_from_export(finished_run, tmp_path_factory, request):
    """`spdf finetune RECIPE --from <the reference's pre-training export>` into a new run directory; and the same
    from the pre-training's last checkpoint directory (its weights and masks are the export's)."""
    export = finished_run["run_dir"] / "phases/pretrain" / request.param
    root = tmp_path_factory.mktemp("from-export")
    run_dir = root / "new-run"
    recipe = write_recipe(root / "tiny.yaml", run_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPDF_CACHE_DIR", str(cache_dir_of(tmp_path_factory)))
        rc = main(["finetune", str(recipe), "--from", str(export)])
    assert rc == 0
    return run_dir, export


def test_finetune_from_an_export_into_a_new_run_dir(finetuned_from_export, finished_run, untouched):
    run_dir, export = finetuned_from_export
    assert not (run_dir / "phases/pretrain").exists()
    fine_export = run_dir / "phases/finetune/export"
    assert (fine_export / "model.safetensors").is_file() and not (fine_export / "masks.safetensors").exists()
    assert (fine_export / "tokenizer.json").read_bytes() == find_tokenizer(export).read_bytes()
    # the same weights, masks and data as the reference's own fine-tuning: the same losses, bit for bit
    assert loss_trace(run_dir) == loss_trace(finished_run["run_dir"], "finetune")


def test_finetune_from_keeps_a_copy_of_the_tokenizer_in_the_run_dir(finetuned_from_export):
    run_dir, export = finetuned_from_export
    assert (run_dir / "tokenizer.json").read_bytes() == find_tokenizer(export).read_bytes()
