"""`spdf run` under FSDP2, launched as a user launches it: `accelerate launch --config_file
recipes/accelerate/fsdp-8gpu.yaml` with two CPU processes (gloo). The tiny demo trains like one process, every masked
weight and AdamW moment in the sharded checkpoints is exactly zero, and a launch SIGKILLed mid-phase resumes from
its sharded checkpoint to the same losses and bytes as the uninterrupted run. Mixed precision (bf16) and activation
checkpointing keep the zeros too, and `spdf inspect` reads the global masks of a sharded checkpoint. One shared FSDP2
run serves the first tests; it starts from an empty data cache, which its two ranks prepare together
(spdf.data.rank_share) into the bytes one process writes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.elastic.utils.distributed import get_free_port

from spdf.export import read_masks
from spdf.inspect import checkpoint_stats
from tiny_runs import (REPO, copy_run, loss_trace, run_cli, spdf_subprocess, subprocess_env, truncate_to_kill,
                       wait_for, write_recipe)

FSDP_CONFIG = REPO / "recipes" / "accelerate" / "fsdp-8gpu.yaml"
NO_GENERATION = "phases.finetune.eval.generate=null"  # generation during training is refused under FSDP2


def _launch_command(command: str, recipe: Path, *launch_args: str) -> list[str]:
    """`accelerate launch` of the shipped FSDP2 config on 2 processes of this (CPU) machine."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
            "--num_processes", "2", "--main_process_port", str(get_free_port()), "--mixed_precision", "no",
            *launch_args, "-m", "spdf", command, str(recipe)]


def launch_fsdp2(command: str, recipe: Path, cache_dir: Path, cwd: Path, *launch_args: str):
    cmd = _launch_command(command, recipe, *launch_args)
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(cache_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def fsdp_run(finished_run, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp2")
    recipe = write_recipe(root / "tiny.yaml", root / "run", NO_GENERATION)
    proc = launch_fsdp2("run", recipe, root / "cache", root)
    assert proc.stdout.count("spdf run finished") == 1  # the summary comes from the main process only
    return root / "run"


def test_the_ranks_prepared_the_data_cache_together_into_the_bytes_of_one_process(fsdp_run, cache_dir):
    (entry,) = (fsdp_run.parent / "cache").iterdir()
    # the ranks took part (the cache directory is shared): not rank 0 alone behind a barrier. The tiny corpus is one
    # batch, rank 0's; tests/data/test_data_prepare_ranks.py shares real work out.
    assert (entry / ".spool-256" / "end").is_file()
    for name in ("train.bin", "val.bin"):
        assert (entry / name).read_bytes() == (cache_dir / entry.name / name).read_bytes()


def test_fsdp2_run_trains_like_one_process(fsdp_run, finished_run):
    ours, reference = loss_trace(fsdp_run), loss_trace(finished_run["run_dir"])
    assert [t[:3] for t in ours] == [t[:3] for t in reference]
    for a, b in zip(ours, reference):
        # sums over two shards in another order; fine-tuning's per-rank mean over padded rows drifts a little more
        # (the same tolerance as the DDP test, tests/train/test_multiprocess.py)
        assert a[3] == pytest.approx(b[3], abs=1e-5 if a[0] == "pretrain" else 1e-3), (a, b)
    ours = load_file(str(fsdp_run / "phases/pretrain/export/model.safetensors"))
    ref = load_file(str(finished_run["run_dir"] / "phases/pretrain/export/model.safetensors"))
    assert set(ours) == set(ref)
    for key in ref:  # gathered from the shards into an export, as one process writes it
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=1e-5)
    assert (fsdp_run / "phases/finetune/export/model.safetensors").is_file()
    masks = "phases/pretrain/export/masks.safetensors"
    assert (fsdp_run / masks).read_bytes() == (finished_run["run_dir"] / masks).read_bytes()


def _checkpoint_tensors(ckpt: Path, tmp_path: Path) -> tuple[dict, dict]:
    """(model state, AdamW state by parameter name) of a sharded (torch.distributed.checkpoint) checkpoint."""
    out = {}
    for part, key in (("pytorch_model_fsdp_0", "model"), ("optimizer_0", "optimizer")):
        shards = sorted(p.name for p in (ckpt / part).glob("*.distcp"))
        assert shards == ["__0_0.distcp", "__1_0.distcp"], shards  # one shard per rank: really sharded
        dcp_to_torch_save(ckpt / part, tmp_path / f"{part}.pt")
        out[key] = torch.load(tmp_path / f"{part}.pt")[key]
    return out["model"], out["optimizer"]["state"]


def test_fsdp2_checkpoints_keep_every_masked_entry_zero(fsdp_run, tmp_path):
    masks = read_masks(fsdp_run / "phases/pretrain/export/masks.safetensors")
    assert masks
    model, adam = _checkpoint_tensors(fsdp_run / "phases/pretrain/checkpoints/step-00000008", tmp_path)
    for name, mask in masks.items():
        assert int((~mask).sum()) == round(0.75 * mask.numel()), name  # exact per-tensor count
        assert torch.equal(model[f"{name}.weight_mask"], mask), name  # the checkpoint holds the global mask
        for tensor in (model[f"{name}.weight"], adam[f"{name}.weight"]["exp_avg"],
                       adam[f"{name}.weight"]["exp_avg_sq"]):
            assert tensor.shape == mask.shape and bool((tensor[~mask] == 0).all()), name
            assert bool((tensor[mask] != 0).any()), name  # it trained
    export = load_file(str(fsdp_run / "phases/pretrain/export/model.safetensors"))
    for name, mask in masks.items():
        assert bool((export[f"{name}.weight"][~mask] == 0).all()), name


def test_spdf_inspect_reads_the_global_masks_of_a_sharded_checkpoint(fsdp_run):
    stats = checkpoint_stats(fsdp_run / "phases/pretrain/checkpoints/step-00000008")
    masks = read_masks(fsdp_run / "phases/pretrain/export/masks.safetensors")
    rows = {r["name"]: r for r in stats["layers"]}
    assert stats["sparse"] and set(masks) <= set(rows)
    for name, mask in masks.items():
        assert rows[name]["shape"] == tuple(mask.shape)  # global shapes, not a rank's shard
        assert rows[name]["mask_sparsity"] == rows[name]["target"] == 0.75 <= rows[name]["actual"], rows[name]


def test_a_sharded_checkpoint_is_read_as_one_process_checkpoint_is(fsdp_run, finished_run, capsys):
    """evaluate, export, flops and --from read an FSDP2 run's sharded checkpoint (read_export joins its shards): the
    same model and masks as one process's checkpoint of that step, its tokenizer found, a fingerprint of its own."""
    from spdf.export import find_export, model_fingerprint, read_export

    step8 = fsdp_run / "phases/pretrain/checkpoints/step-00000008"
    assert not (step8 / "model.safetensors").exists() and find_export(step8) == step8
    ours = read_export(step8)
    ref = read_export(finished_run["run_dir"] / "phases/pretrain/checkpoints/step-00000008")
    assert ours.config["model"] == ref.config["model"] and ours.tokenizer_path is not None
    assert ours.masks.keys() == ref.masks.keys() and all(torch.equal(ours.masks[k], ref.masks[k]) for k in ref.masks)
    theirs = ref.model.state_dict()
    for key, tensor in ours.model.state_dict().items():
        torch.testing.assert_close(tensor, theirs[key], rtol=0, atol=1e-5)
    step6 = step8.with_name("step-00000006")
    assert model_fingerprint(step8) == model_fingerprint(step8) != model_fingerprint(step6)
    rc, out, err = run_cli(["flops", step8, "--json"], capsys)
    assert rc == 0 and json.loads(out)["model"] == str(step8), err


def test_fine_tuning_starts_from_a_sharded_checkpoint_as_from_one_process_checkpoint(fsdp_run, finished_run, tmp_path,
                                                                                      capsys):
    first_val = {}
    for name, run in (("sharded", fsdp_run), ("one", finished_run["run_dir"])):
        recipe = write_recipe(tmp_path / f"{name}.yaml", tmp_path / name, NO_GENERATION)
        rc, _, err = run_cli(["finetune", recipe, "--from", run / "phases/pretrain/checkpoints/step-00000008"], capsys)
        assert rc == 0, err
        first_val[name] = next(t[3] for t in loss_trace(tmp_path / name, "finetune") if t[2] == "val")
    assert first_val["sharded"] == pytest.approx(first_val["one"], abs=1e-5)  # the same weights and masks, densified


def _steps_logged(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written
            continue
    return [r["step"] for r in records if r.get("phase") == "pretrain" and "loss" in r]


def test_fsdp2_sigkilled_run_resumes_to_the_same_losses_and_bytes(fsdp_run, cache_dir, tmp_path):
    """The whole launch (launcher and both ranks) SIGKILLed after a sharded checkpoint and a later step."""
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "tiny.yaml", run_dir, NO_GENERATION)
    ckpt_root = run_dir / "phases/pretrain/checkpoints"
    with open(tmp_path / "killed.out", "w") as out, open(tmp_path / "killed.err", "w") as err:
        proc = subprocess.Popen(_launch_command("pretrain", recipe), cwd=tmp_path, stdout=out, stderr=err,
                                env=subprocess_env(cache_dir))
        try:
            first = wait_for(lambda: sorted(ckpt_root.glob("step-*")), proc, 300, "a checkpoint appeared")
            step = int(first[0].name.split("-")[1])
            wait_for(lambda: any(s > step for s in _steps_logged(run_dir)), proc, 120, "a step after it was logged")
            # the ranks run in sessions of their own (torch's elastic agent starts them so): kill every descendant
            launched = psutil.Process(proc.pid)
            processes = [launched, *launched.children(recursive=True)]
            assert len(processes) >= 3  # the launcher and two ranks at least
            for process in processes:
                process.send_signal(signal.SIGKILL)
            _, alive = psutil.wait_procs(processes, timeout=30)
            assert not alive
        finally:
            proc.wait(timeout=60)
    assert not (run_dir / "phases/pretrain/done.json").exists()
    newest = sorted(ckpt_root.glob("step-*"))[-1]
    resumed = launch_fsdp2("pretrain", recipe, cache_dir, tmp_path)
    assert f"[pretrain] resumed from {newest} (step {int(newest.name.split('-')[1])}/8)" in resumed.stdout
    assert loss_trace(run_dir, "pretrain") == loss_trace(fsdp_run, "pretrain")
    for name in ("model.safetensors", "masks.safetensors"):
        assert (run_dir / "phases/pretrain/export" / name).read_bytes() == (
            fsdp_run / "phases/pretrain/export" / name).read_bytes()


def test_fsdp2_bf16_with_activation_checkpointing_keeps_the_zeros(fsdp_run, cache_dir, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", tmp_path / "run", NO_GENERATION, "precision=bf16")
    launch_fsdp2("pretrain", recipe, cache_dir, tmp_path, "--fsdp_activation_checkpointing", "true")
    masks = read_masks(tmp_path / "run/phases/pretrain/export/masks.safetensors")
    weights = load_file(str(tmp_path / "run/phases/pretrain/export/model.safetensors"))
    for name, mask in masks.items():
        assert int((~mask).sum()) == round(0.75 * mask.numel()), name
        assert bool((weights[f"{name}.weight"][~mask] == 0).all()), name
    bf16, fp32 = loss_trace(tmp_path / "run", "pretrain"), loss_trace(fsdp_run, "pretrain")
    assert [t[:3] for t in bf16] == [t[:3] for t in fp32]
    for a, b in zip(bf16, fp32):
        assert a[3] == pytest.approx(b[3], abs=0.05), (a, b)  # bf16 compute: close to fp32, not equal


def test_fsdp2_supar_run_trains_like_one_process(finished_run, cache_dir, tmp_path):
    """SµPar under FSDP2: the per-layer LR scales read each sparse layer's density from its sharded mask (a gathering
    collective every rank calls) and the SµPar init runs before sharding; both must give one process's losses."""
    supar = "model.parametrization=supar"
    recipe = write_recipe(tmp_path / "fsdp.yaml", tmp_path / "fsdp", NO_GENERATION, supar)
    launch_fsdp2("pretrain", recipe, cache_dir, tmp_path)
    single = write_recipe(tmp_path / "one.yaml", tmp_path / "one", NO_GENERATION, supar)
    proc = spdf_subprocess(["pretrain", str(single)], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours, reference = loss_trace(tmp_path / "fsdp", "pretrain"), loss_trace(tmp_path / "one", "pretrain")
    assert ours and [t[:3] for t in ours] == [t[:3] for t in reference]
    for a, b in zip(ours, reference):
        assert a[3] == pytest.approx(b[3], abs=1e-5), (a, b)
    standard = loss_trace(finished_run["run_dir"], "pretrain")  # the same recipe under sp: SµPar really applied
    assert all(abs(a[3] - b[3]) > 1e-3 for a, b in zip(ours[1:], standard[1:]))


def test_fsdp2_block_run_trains_like_one_process_and_resumes_exactly(cache_dir, tmp_path):
    """The block backend under FSDP2: each rank holds a piece of every layer's non-zeros. The run trains like one
    process, its sharded checkpoint holds the non-zeros only (no dense weight), `spdf inspect` reads its masks from
    the layout, the export is gathered into the dense one of one process, and a run killed after a checkpoint
    resumes from its shards to the same losses and bytes."""
    from test_block_run import SETS as BLOCK_SETS

    sets = (NO_GENERATION, *BLOCK_SETS)
    recipe = write_recipe(tmp_path / "fsdp.yaml", tmp_path / "fsdp", *sets)
    launch_fsdp2("run", recipe, cache_dir, tmp_path)
    single = write_recipe(tmp_path / "one.yaml", tmp_path / "one", *sets)
    proc = spdf_subprocess(["run", str(single)], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    ours, reference = loss_trace(fsdp), loss_trace(one)
    assert ours and [t[:3] for t in ours] == [t[:3] for t in reference]
    for a, b in zip(ours, reference):
        # fine-tuning from the gathered export starts equal (its step 0 and 1); then its per-rank mean over padded rows
        # weighs tokens a little differently from one process's mean (as under DDP), more so at this width
        first = a[0] == "pretrain" or a[1] <= 1
        assert a[3] == pytest.approx(b[3], abs=1e-5 if first else 5e-3), (a, b)
    export = "phases/pretrain/export"
    assert (fsdp / export / "masks.safetensors").read_bytes() == (one / export / "masks.safetensors").read_bytes()
    ours, ref = load_file(str(fsdp / export / "model.safetensors")), load_file(str(one / export / "model.safetensors"))
    assert set(ours) == set(ref) and any(k.endswith("c_fc.weight") for k in ref)  # dense, as one process writes it
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=1e-5)

    ckpt = fsdp / "phases/pretrain/checkpoints/step-00000004"
    model, adam = _checkpoint_tensors(ckpt, tmp_path)
    masks = read_masks(fsdp / export / "masks.safetensors")
    for name, mask in masks.items():
        assert f"{name}.weight" not in model and model[f"{name}.values"].numel() == int(mask.sum()), name
        assert adam[f"{name}.values"]["exp_avg"].shape == model[f"{name}.values"].shape, name
    rows = {r["name"]: r for r in checkpoint_stats(ckpt)["layers"]}
    for name, mask in masks.items():
        assert rows[name]["shape"] == tuple(mask.shape) and rows[name]["mask_sparsity"] == 0.75, rows[name]

    killed, killed_recipe = copy_run(fsdp, tmp_path / "killed", tmp_path / "killed.yaml", *sets)
    truncate_to_kill(killed, "pretrain", 5, keep_checkpoints_upto=4)
    resumed = launch_fsdp2("run", killed_recipe, cache_dir, tmp_path)
    assert f"[pretrain] resumed from {killed / 'phases/pretrain/checkpoints/step-00000004'} (step 4/8)" \
        in resumed.stdout
    assert loss_trace(killed) == loss_trace(fsdp)
    for name in ("model.safetensors", "masks.safetensors"):
        assert (killed / export / name).read_bytes() == (fsdp / export / name).read_bytes()
