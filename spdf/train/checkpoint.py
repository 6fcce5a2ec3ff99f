"""Training checkpoints: exact resume (exports, the plain safetensors a user loads, are spdf.export's).

A checkpoint is a directory `step-00000100/` written by `accelerate.save_state` (model with its masks, optimizer,
scheduler, RNG states of every rank, and our TrainState) plus `spdf.json` describing the model and sparsity. It is
written under a temporary name and renamed when complete, so a crash mid-write never leaves a half checkpoint
where resume would look.
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

from ..export import CheckpointError, read_json, write_json_atomic

CHECKPOINT_PREFIX = "step-"
META_FILE = "spdf.json"


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def save_checkpoint(accelerator, root: Path, step: int, meta: dict, keep: int) -> Path:
    """Every rank calls this; the main process renames the finished directory into place and prunes old ones."""
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
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
        write_json_atomic(tmp / META_FILE, meta)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, expect: dict) -> dict:
    """Restore everything `save_checkpoint` saved; returns its spdf.json. A checkpoint of another shape or sparsity,
    or a damaged one, gives a CheckpointError and changes nothing."""
    meta = read_json(path / META_FILE, "checkpoint")
    for key, what in (("model", "model shape"), ("targets", "sparse layers")):
        if meta.get(key) != expect[key]:
            raise CheckpointError(f"checkpoint {path} has another {what} than the recipe: {meta.get(key)} vs "
                                  f"{expect[key]}; use a run directory made by this recipe")
    try:
        # accelerate skips an unreadable RNG state file with a log line only, and the resumed run would then differ
        torch.load(path / f"random_states_{accelerator.process_index}.pkl", map_location="cpu", weights_only=False)
        accelerator.load_state(str(path))
    except (SafetensorError, RuntimeError, EOFError, OSError, KeyError, ValueError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        bad = _damaged_file(path)  # accelerate's errors rarely say which file they were reading
        raise CheckpointError(f"checkpoint {path / bad if bad else path} could not be loaded (corrupt or "
                              f"truncated?): {first}") from None
    return meta


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
