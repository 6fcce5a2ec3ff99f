"""`spdf inspect`: per-layer sparsity of a checkpoint, export or run directory, read from files alone; with --verify,
a check of every checkpoint and export under a path against its manifest."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import CheckpointError
from .export import config_family, find_export, is_export, read_masks
from .fswrite import read_json
from .layout import (CHECKPOINT_META, CONFIG_FILE, MANIFEST_FILE, MASKS_FILE, SHARDED_MODEL_DIR, WEIGHTS_FILE,
                     is_checkpoint_name, is_temporary)
from .manifest import ManifestError, files_under, has_manifest, verify_manifest
from .sharded_state import read_sharded_state
from .sparsity import state_dict_masks, to_dense_state_dict


def _weights_file(path: Path) -> Path:
    """A weights file given directly, a checkpoint's or export's, or that of a phase's or run's export (or the
    directory of an FSDP2 checkpoint's sharded model state)."""
    if path.is_file():
        return path
    if (path / WEIGHTS_FILE).exists():  # an export, or a training checkpoint (accelerate names it the same)
        return path / WEIGHTS_FILE
    if (path / SHARDED_MODEL_DIR).is_dir():
        return path / SHARDED_MODEL_DIR
    try:
        return find_export(path) / WEIGHTS_FILE
    except CheckpointError:
        raise FileNotFoundError(f"no {WEIGHTS_FILE} found at {path} (give a checkpoint, export or run directory)"
                                ) from None


def _load_state(file: Path) -> dict[str, torch.Tensor]:
    if file.is_dir():
        return read_sharded_state(file)
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the (weights-only) unpickler fails on arbitrary bytes in arbitrary
        # ways (KeyError, IndexError, UnpicklingError…); whatever it raised, the file is not a readable checkpoint
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file} could not be read (corrupt or truncated, or not a weights file?): "
                              f"{first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a state dict")
    return state


def _masks(file: Path, state: dict) -> dict[str, torch.Tensor]:
    """Module name → mask in the weight's stored orientation, from the sparse layers' own state (any backend) or a
    masks.safetensors file."""
    masks = state_dict_masks(state)
    if not masks:
        for name, mask in read_masks(file.with_name(MASKS_FILE)).items():
            weight = state.get(f"{name}.weight")
            masks[name] = mask.t() if weight is not None and tuple(weight.shape) != tuple(mask.shape) else mask
    return masks


def checkpoint_stats(path: str | Path) -> dict:
    """{"file", "sparse", "layers": [per 2-D weight: name, shape, target, mask_sparsity, actual, nnz, numel], totals}.

    target comes from the checkpoint's spdf.json or the export's config.json; actual counts the weight's zeros."""
    file = _weights_file(Path(path))
    state = _load_state(file)
    masks = _masks(file, state)
    state = to_dense_state_dict(state)  # compressed layers' weights as dense tensors, zeros in place
    meta = {}
    for meta_file in (file.with_name(CHECKPOINT_META), file.with_name(CONFIG_FILE)):  # checkpoint / export
        if meta_file.exists():
            meta = read_json(meta_file, "checkpoint or export")
    targets, family = meta.get("targets", {}), _family(meta)
    rows = []
    for key, tensor in state.items():
        name = key[: -len(".weight")]
        # the weight matmuls of the blocks, as the model's family names them (embeddings and the head are not)
        if not key.endswith(".weight") or tensor.dim() != 2 or (family is not None and family.role(name) is None):
            continue
        numel = tensor.numel()
        nnz = int(torch.count_nonzero(tensor))
        mask = masks.get(name)
        rows.append(dict(name=name, shape=tuple(tensor.shape), numel=numel, nnz=nnz, actual=1 - nnz / numel,
                         target=targets.get(name),
                         mask_sparsity=None if mask is None else 1 - int(mask.sum()) / mask.numel()))
    total = sum(r["numel"] for r in rows) or 1
    return {"file": str(file), "sparse": bool(masks), "layers": rows,
            "total_numel": total, "total_nnz": sum(r["nnz"] for r in rows)}


def _family(meta: dict):
    """The model family that wrote these weights (a file alone, or a meta file without one: gpt, as older spdf wrote
    only GPTs); None for a Hugging Face architecture no family maps onto (then every 2-D weight is listed)."""
    try:
        return config_family(meta)
    except ValueError:
        return None


def format_stats(stats: dict) -> str:
    lines = [f"{stats['file']} ({'sparse: masks present' if stats['sparse'] else 'dense: no masks'})",
             f"{'layer':44s} {'shape':>14s} {'target':>7s} {'mask sp.':>9s} {'zeros':>7s} {'non-zeros':>11s}"]
    for r in stats["layers"]:
        mask = f"{r['mask_sparsity']:.2%}" if r["mask_sparsity"] is not None else "-"
        target = f"{r['target']:.2%}" if r["target"] is not None else "-"
        lines.append(f"{r['name']:44s} {'x'.join(map(str, r['shape'])):>14s} {target:>7s} {mask:>9s} {r['actual']:7.2%} "
                     f"{r['nnz']:11,d}")
    lines.append(f"{'linear weights in blocks':44s} {'':>14s} {'':>7s} {'':>9s} "
                 f"{1 - stats['total_nnz'] / stats['total_numel']:7.2%} {stats['total_nnz']:11,d}")
    return "\n".join(lines)


def _saved_dirs(path: Path) -> list[Path]:
    """Every checkpoint (step-*) and export directory at or under `path`."""
    if path.is_dir() and (has_manifest(path) or is_export(path) or is_checkpoint_name(path.name)):
        return [path]
    found = {p.parent for p in path.rglob(WEIGHTS_FILE)} | {p.parent for p in path.rglob(MANIFEST_FILE)}
    return sorted(p for p in found if not is_temporary(p))


def verify_saved(path: str | Path) -> list[tuple[str, Path, str]]:
    """[(status, directory, detail)] for each checkpoint/export under `path`: "ok", "unverified" (no manifest: an
    older spdf's or a user's own), "DAMAGED", or "removed" (gone while being verified: a live run's rotation deleted
    it, which is no damage)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (give a run, phase, checkpoint or export directory)")
    dirs = _saved_dirs(path)
    if not dirs:
        raise CheckpointError(f"no checkpoint or export found under {path}")
    results = []
    for d in dirs:
        status, detail = _verify_one(d)
        if status != "ok" and not d.exists():
            status, detail = "removed", "deleted while being verified (a running run keeps only its newest checkpoints)"
        results.append((status, d, detail))
    return results


def _verify_one(d: Path) -> tuple[str, str]:
    if not has_manifest(d):
        return "unverified", "no manifest.json"
    try:
        # a checkpoint's manifest lists every file in it, as resume checks (an export may gain files later)
        required = files_under(d) if is_checkpoint_name(d.name) else ()
        return "ok", f"{verify_manifest(d, required=required)} files match their checksums"
    except (ManifestError, FileNotFoundError) as e:
        return "DAMAGED", str(e)
