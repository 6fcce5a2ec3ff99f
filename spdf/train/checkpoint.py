"""Training checkpoints: exact resume (exports, the plain safetensors a user loads, are spdf.export's).

A checkpoint is a directory `step-00000100/` written by `accelerate.save_state` (model with its masks, optimizer,
scheduler, RNG states of every rank, and our TrainState) plus `spdf.json` describing the model and sparsity, and
last `manifest.json` with every file's size and CRC-32 (spdf.manifest).
It is written under a temporary name, fsync'ed and renamed when complete, so neither a crash mid-write nor a power
loss leaves a half checkpoint where resume would look (nor deletes the older ones before the new one is on disk); the
manifest catches damage after that (a flipped byte loads without any error otherwise).
Resume takes the newest checkpoint that verifies and says which newer ones it skipped. Checkpoints of an older spdf
have no manifest: they are loaded with a warning (nothing to verify them against).
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError
from ..fswrite import read_json, sync_dir, sync_tree, write_json_atomic, writing_dir
from ..layout import (CHECKPOINT_META, CHECKPOINT_PREFIX, MANIFEST_FILE, RNG_STATE_FILE, checkpoint_name,
                      is_checkpoint_name, temporary_dir)
from .nonfinite import all_finite, state_tensors
from ..manifest import ManifestError, files_under, has_manifest, verify_manifest, write_manifest


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and is_checkpoint_name(p.name))


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files do not match its manifest, or (without one) do not load: resume skips it."""


def verify_checkpoint(path: Path, content: bool = True) -> bool:
    """True if `path` matches its manifest (sizes, and with `content` the checksum of every file), False if it has none
    (an older spdf's); DamagedCheckpoint otherwise."""
    if not has_manifest(path):
        return False
    try:
        verify_manifest(path, content, required=files_under(path))
    except ManifestError as e:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: {e}") from None
    return True


def check_checkpoint(path: Path, warn) -> None:
    """Verify checkpoint `path` as resume and `--from` both do: DamagedCheckpoint if it does not match its manifest,
    or has none while a sibling has one (then its manifest was lost); without any (an older spdf's), `warn` and
    accept it unverified."""
    if verify_checkpoint(path):
        return
    if any(has_manifest(p) for p in list_checkpoints(Path(path).parent)):
        raise DamagedCheckpoint(f"checkpoint {path} has lost its {MANIFEST_FILE}")
    warn(f"checkpoint {path} has no {MANIFEST_FILE} (written by an older spdf): loaded unverified")


def _state_bytes(accelerator) -> int:
    """About what a checkpoint needs on disk: every tensor of the prepared models and optimizers."""
    total = sum(t.numel() * t.element_size() for m in accelerator._models for t in m.state_dict().values())
    for opt in accelerator._optimizers:
        for state in opt.state_dict()["state"].values():
            total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return total


def save_checkpoint(accelerator, root: Path, step: int, meta: dict, keep: int) -> Path:
    """Every rank calls this; the main process renames the finished directory into place, verifies it there and only
    then prunes old ones (never the one just written, which is the newest verified)."""
    final = root / checkpoint_name(step)
    tmp = temporary_dir(final)  # one name for every rank of this run (they all write into it); the run lock
    # keeps other runs out
    with writing_dir(tmp, "a checkpoint", _state_bytes(accelerator) if accelerator.is_main_process else 0):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        # accelerate warns that it drops the tied lm_head.weight from model.safetensors; loading re-ties it, so the
        # warning is noise here.
        quiet = logging.getLogger("accelerate.utils.other")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            accelerator.save_state(str(tmp))
        finally:
            quiet.setLevel(level)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # each rank saved its own RNG and data-order state: a resume needs as many processes
            write_json_atomic(tmp / CHECKPOINT_META, {**meta, "processes": accelerator.num_processes})
            write_manifest(tmp)
            sync_tree(tmp)  # every rank's files: on disk before the rename publishes them
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        sync_dir(root)  # the rename too, before rotation deletes the older checkpoints
        # complete where resume will look (every file there, at its size) before anything older is deleted
        verify_checkpoint(final, content=False)
        for old in list_checkpoints(root)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, expect: dict) -> dict:
    """Restore everything `save_checkpoint` saved; returns its spdf.json. A checkpoint of another shape or sparsity,
    gives a CheckpointError and changes nothing; a damaged one a DamagedCheckpoint."""
    try:
        meta = read_json(path / CHECKPOINT_META, "checkpoint")
    except CheckpointError as e:
        raise DamagedCheckpoint(str(e)) from None
    for key, what in (("model", "model shape"), ("targets", "sparse layers")):
        if meta.get(key) != expect[key]:
            raise CheckpointError(f"checkpoint {path} has another {what} than the recipe: {meta.get(key)} vs "
                                  f"{expect[key]}; use a run directory made by this recipe")
    # Every rank reads the same file, so every rank refuses alike. Without this check, a rank whose own RNG file is
    # missing would fall back to an older checkpoint while the others load this one: ranks at different steps.
    # an older spdf's checkpoint does not record it: accelerate's one RNG file per process tells
    saved = meta.get("processes") or len(list(path.glob(RNG_STATE_FILE.format("*")))) or None
    if saved is not None and saved != accelerator.num_processes:
        raise CheckpointError(f"checkpoint {path} was written by {saved} process(es), this launch has "
                              f"{accelerator.num_processes}: each process saved its own random and data-order state "
                              f"(and an FSDP2 run its shards), so a phase resumes on the number it started with: "
                              f"launch it with {saved} (e.g. accelerate launch --num_processes {saved})")
    try:
        # accelerate skips an unreadable RNG state file with a log line only, and the resumed run would then differ
        torch.load(path / RNG_STATE_FILE.format(accelerator.process_index), map_location="cpu", weights_only=False)
        accelerator.load_state(str(path))
    except (SafetensorError, RuntimeError, EOFError, OSError, KeyError, ValueError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        bad = _damaged_file(path)  # accelerate's errors rarely say which file they were reading
        raise DamagedCheckpoint(f"checkpoint {path / bad if bad else path} could not be loaded (corrupt or "
                              f"truncated?): {first}") from None
    if not _loaded_state_finite(accelerator):  # an older spdf saved diverged state: resuming it only fails again
        raise DamagedCheckpoint(f"checkpoint {path} holds NaN or inf weights or optimizer state (saved after the "
                                f"training diverged)")
    return meta


def _loaded_state_finite(accelerator) -> bool:
    """Whether every rank's loaded model and optimizer state is finite (the same answer on every rank)."""
    finite = all(all_finite(state_tensors(m, o)) for m, o in zip(accelerator._models, accelerator._optimizers))
    flag = torch.tensor([0.0 if finite else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    return not bool(flag[0] > 0)


def _damaged_file(path: Path) -> str:
    """The name of the first file of checkpoint `path` that does not load on its own ("" if each one does)."""
    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                load_file(str(file))
            elif file.suffix in (".bin", ".pt", ".pkl"):
                torch.load(file, map_location="cpu", weights_only=False)  # as accelerate loads its own files
        except Exception:  # only to name the file; the error reported is the one load_state raised
            return file.name
    return ""


def resume_checkpoint(accelerator, root: Path, expect: dict, warn) -> Path | None:
    """Load the newest checkpoint under `root` that verifies (and loads); None if there is none at all. Each newer
    damaged one is named through `warn`. If checkpoints exist but none is usable the run stops: starting over would
    let rotation delete them."""
    existing = list_checkpoints(root)
    problems = []
    for path in reversed(existing):
        try:
            check_checkpoint(path, warn)
            load_checkpoint(accelerator, path, expect)
            return path
        except DamagedCheckpoint as e:
            warn(f"{e}; skipped, trying an older checkpoint")
            problems.append(str(e))
    if existing:
        raise CheckpointError(f"no checkpoint under {root} is usable ({len(existing)} damaged; the newest: "
                              f"{problems[0]}); move the checkpoints directory away to start the phase over")
    return None


def remove_interrupted_writes(root: Path) -> None:
    """Remove what killed checkpoint writes left under `root`: their temporary directories, each as large as a
    checkpoint. Only a later save of the same step would have reused one, and a resumed run may never save that step
    again (one killed while checkpointing on a stop signal resumes from the checkpoint before). Called by the main
    process as a phase starts: it holds the run lock, so no other process writes there."""
    for stale in Path(root).glob(f"{temporary_dir(Path(root) / CHECKPOINT_PREFIX).name}*"):
        shutil.rmtree(stale, ignore_errors=True)
