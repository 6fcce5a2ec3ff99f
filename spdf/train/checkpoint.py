"""Training checkpoints (exact resume) and exports (plain safetensors a user loads with torch alone).

A checkpoint is a directory `step-00000100/` written by `accelerate.save_state` (model with its masks, optimizer,
scheduler, RNG states of every rank, and our TrainState) plus `spdf.json` describing the model and sparsity. It is
written under a temporary name and renamed when complete, so a crash mid-write never leaves a half checkpoint
where resume would look. An export is `model.safetensors` (dense-shaped weights, zeros in place), `config.json`
and, for a sparse model, `masks.safetensors` (masks packed 8 per byte).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..model import GPT, GPTConfig
from ..sparsity import sparse_layers, to_dense_state_dict
from ..sparsity.bitpack import pack_bits, unpack_bits

CHECKPOINT_PREFIX = "step-"
META_FILE = "spdf.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated or does not fit the recipe."""


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what}: {path} is corrupt ({e})") from None


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


def layout_meta(model: nn.Module) -> dict:
    """What a checkpoint must agree on with the model it is loaded into: the shape and each layer's target sparsity."""
    return {"model": model.config.to_dict(),
            "targets": {name: layer.target_sparsity for name, layer in sparse_layers(model).items()}}


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


# ---- exports -----------------------------------------------------------------------------------------------------
def export_model(model: nn.Module, out_dir: Path, extra: dict | None = None) -> Path:
    """Write model.safetensors + config.json (+ masks.safetensors) atomically into out_dir."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Always dense weights with zeros in place (compressed layers expanded), masks beside them in masks.safetensors.
    state = {k: v.detach().cpu().contiguous() for k, v in to_dense_state_dict(model.state_dict()).items()
             if k != "lm_head.weight"}  # lm_head is tied to the token embedding
    save_file(state, str(tmp / "model.safetensors"))
    layers = sparse_layers(model)
    if layers:
        masks = {f"{name}.mask_bits": pack_bits(layer.mask) for name, layer in layers.items()}
        shapes = {name: list(layer.mask.shape) for name, layer in layers.items()}
        save_file(masks, str(tmp / "masks.safetensors"), metadata={"shapes": json.dumps(shapes)})
    config = {**layout_meta(model), "sparse": bool(layers), **(extra or {})}
    write_json_atomic(tmp / "config.json", config)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def load_export(path: Path) -> tuple[GPT, dict[str, torch.Tensor], dict]:
    """(dense GPT with the exported weights, {module name: mask in (out, in) orientation}, config.json)."""
    path = Path(path)
    config = read_json(path / "config.json", "export")
    model = GPT(GPTConfig(**config["model"]))
    try:
        state = load_file(str(path / "model.safetensors"))
    except (SafetensorError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"export {path}: model.safetensors could not be read ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise CheckpointError(f"export {path} does not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    masks = {}
    if (path / "masks.safetensors").exists():
        from safetensors import safe_open

        with safe_open(str(path / "masks.safetensors"), "pt") as f:
            shapes = json.loads(f.metadata()["shapes"])
            for name, shape in shapes.items():
                masks[name] = unpack_bits(f.get_tensor(f"{name}.mask_bits"), shape)
    return model, masks, config
