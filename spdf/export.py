"""The export format, in one place: write an export, read it back, and find one from a run, phase or export path.

An export directory holds
    model.safetensors   dense-shaped weights with the zeros in place (compressed layers expanded); a weight tied
                        to another (GPT's `lm_head.weight`, the token embedding) is written once, under the first name
    config.json         {"family": model family, "model": its config's fields, "targets": {layer: target
                        sparsity}, "sparse": bool, ...extra}; an export without "family" is a gpt's (older spdf)
    masks.safetensors   a sparse model's masks, packed 8 per byte, with their shapes in the file's metadata
    tokenizer.json      the tokenizer the model was trained with
and loads with plain torch: `get_family(config["family"])`'s `build(config_from_dict(config["model"]))` +
`load_state_dict(..., strict=False)`.

Training (`spdf.train`), `spdf inspect`, `spdf flops` and evaluation (`spdf.eval`) all read and write exports through
this module, so evaluation never needs the training package.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .fswrite import read_json, remove_abandoned, sync_dir, sync_tree, write_json_atomic, writing_dir
from .layout import (CHECKPOINT_META, CONFIG_FILE, MASKS_FILE, SHARDED_MODEL_DIR, TOKENIZER_FILE, WEIGHTS_FILE,
                     PhaseLayout, RunLayout, temporary_dir)
from .manifest import ManifestError, files_under, has_manifest, verify_manifest, write_manifest
from .model.families import DEFAULT_FAMILY, ModelFamily, family_for_hf, family_of, get_family
from .sparsity import set_masks, sparse_layers, sparsify, state_dict_masks, to_dense_state_dict
from .sharded_state import is_sharded_checkpoint, read_sharded_state
from .sparsity.bitpack import pack_bits, unpack_bits


def layout_meta(model: nn.Module) -> dict:
    """What a checkpoint must agree on with the model it is loaded into: the family, the shape and each layer's target
    sparsity."""
    return {"family": family_of(model).name, "model": model.config.to_dict(),
            "targets": {name: layer.target_sparsity for name, layer in sparse_layers(model).items()}}


# ---- write -------------------------------------------------------------------------------------------------------
def write_export(model: nn.Module, out_dir: Path, tokenizer_file: Path | None = None,
                 extra: dict | None = None) -> Path:
    """Write model.safetensors + config.json (+ masks.safetensors) (+ a copy of tokenizer_file) into out_dir.

    Everything is written into a temporary sibling first, hashed into manifest.json last and renamed into place, so
    a crash never leaves a half export where a reader would look, and a later damaged byte is detected on reading.
    """
    out_dir = Path(out_dir)
    tmp = temporary_dir(out_dir, os.getpid())  # per process: two writers never share it
    remove_abandoned(out_dir.parent.glob(f"{temporary_dir(out_dir).name}.*"), keep=tmp)  # left by killed writers
    tied = tied_aliases(model)
    state = {k: v.detach().cpu().contiguous() for k, v in to_dense_state_dict(model.state_dict()).items()
             if k not in tied}
    with writing_dir(tmp, "the export", sum(t.numel() * t.element_size() for t in state.values())):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / WEIGHTS_FILE))
        layers = sparse_layers(model)
        if layers:
            write_masks({name: layer.mask for name, layer in layers.items()}, tmp / MASKS_FILE)
        write_json_atomic(tmp / CONFIG_FILE, {**layout_meta(model), "sparse": bool(layers), **(extra or {})})
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        write_manifest(tmp)
        sync_tree(tmp)  # on disk before the rename publishes it (and before the phase's done.json says it is there)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    sync_dir(out_dir.parent)
    return out_dir


def write_masks(masks: dict[str, torch.Tensor], masks_file: Path) -> None:
    """{module name: bool mask (out, in)} -> masks.safetensors, packed 8 per byte, shapes in the metadata."""
    packed = {f"{name}.mask_bits": pack_bits(mask) for name, mask in masks.items()}
    shapes = {name: list(mask.shape) for name, mask in masks.items()}
    save_file(packed, str(masks_file), metadata={"shapes": json.dumps(shapes)})


def tied_aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are another parameter under a second name (GPT's LM head is its token embedding):
    written once, under the first name, and left to the tie when loading."""
    return ({name for name, _ in model.named_parameters(remove_duplicate=False)}
            - {name for name, _ in model.named_parameters()})


# ---- find and read -----------------------------------------------------------------------------------------------
def is_export(path: Path) -> bool:
    return (Path(path) / WEIGHTS_FILE).is_file() and (Path(path) / CONFIG_FILE).is_file()


def is_checkpoint(path: Path) -> bool:
    """A training checkpoint: one process's (model.safetensors) or an FSDP2 run's (its sharded model state)."""
    path = Path(path)
    return ((path / WEIGHTS_FILE).is_file() or is_sharded_checkpoint(path)) and (path / CHECKPOINT_META).is_file()


def find_export(path: Path) -> Path:
    """An export directory from a run directory (its last finished phase), a phase directory or an export itself;
    a training checkpoint directory (step-XXXXXXXX) is returned as it is (read_export reads both)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (give an spdf export, phase or run directory)")
    if is_export(path) or is_checkpoint(path):
        return path
    if PhaseLayout(path).export.is_dir():
        return PhaseLayout(path).export
    finished = RunLayout(path).finished_phases()
    if finished:
        return finished[-1].export
    raise CheckpointError(f"{path} is not an spdf export, checkpoint, phase or run directory with a finished phase")


def find_tokenizer(path: Path) -> Path | None:
    """The tokenizer.json of an export, or of a checkpoint's run (<run>/phases/<phase>/checkpoints/step-X)."""
    path = Path(path)
    run = RunLayout.of_checkpoint(path) if not is_export(path) and is_checkpoint(path) else None
    tokenizer = run.tokenizer if run is not None else path / TOKENIZER_FILE
    return tokenizer if tokenizer.is_file() else None


def read_masks(masks_file: Path) -> dict[str, torch.Tensor]:
    """{module name: bool mask in (out, in) orientation} of a masks.safetensors file ({} if there is none)."""
    masks = {}
    if Path(masks_file).exists():
        try:
            with safe_open(str(masks_file), "pt") as f:
                shapes = json.loads(f.metadata()["shapes"])
                for name, shape in shapes.items():
                    masks[name] = unpack_bits(f.get_tensor(f"{name}.mask_bits"), shape)
        except (SafetensorError, KeyError, OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{masks_file} could not be read (corrupt or truncated?): {e}") from None
    return masks


@dataclass
class Export:
    """What an export holds: its family's dense model with its weights, the masks of a sparse model, config.json, the
    tokenizer."""
    path: Path
    model: nn.Module
    masks: dict[str, torch.Tensor]
    config: dict
    tokenizer_path: Path | None  # None: an export written without one (a user's own, or an old spdf)


def verify_export(path: Path) -> bool:
    """Check an export against its manifest: True if verified, False if it has none (a user's own export or one of an
    older spdf, accepted as it is); a damaged one raises CheckpointError."""
    if not has_manifest(path):
        return False
    # an export must list its weights and config; a checkpoint every file in it (nothing is added after its manifest)
    required = (WEIGHTS_FILE, CONFIG_FILE) if is_export(path) or not is_checkpoint(path) else files_under(path)
    try:
        verify_manifest(path, required=required)
    except ManifestError as e:
        raise CheckpointError(f"{path} is damaged: {e}; use another checkpoint") from None
    return True


def config_family(config: dict) -> ModelFamily:
    """The model family that an export's config.json, a checkpoint's spdf.json or a Hugging Face config.json names
    (ValueError for one no family maps onto); without "family", a gpt's (older spdf wrote only GPTs)."""
    if "model_type" in config:  # written by transformers' save_pretrained
        return family_for_hf(config["model_type"])
    return get_family(config.get("family", DEFAULT_FAMILY))


def _config(path: Path) -> tuple[bool, dict]:
    """(whether `path` is a training checkpoint, its spdf.json; else the export's or Hugging Face config.json)."""
    checkpoint = not is_export(path) and is_checkpoint(path)
    return checkpoint, read_json(path / (CHECKPOINT_META if checkpoint else CONFIG_FILE),
                                 "checkpoint" if checkpoint else "export")


def _family(config: dict, path: Path) -> ModelFamily:
    try:
        return config_family(config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def export_family(path: Path) -> ModelFamily:
    """The model family of an export, a checkpoint or a Hugging Face directory, from its config file alone."""
    return _family(_config(Path(path))[1], path)


def read_export(path: Path) -> Export:
    """Load the export at `path` (an export, a training checkpoint directory or a Hugging Face directory of an
    architecture a model family maps onto; see find_export for run and phase directories), verified against its
    manifest when it has one."""
    path = Path(path)
    verify_export(path)
    checkpoint, config = _config(path)
    what = "checkpoint" if checkpoint else "export"
    if not checkpoint and "model_type" in config:  # written by transformers' save_pretrained
        return read_hf(path, config)
    family = _family(config, path)
    try:
        model = family.build(family.config_from_dict(config["model"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{what} {path}: {CHECKPOINT_META if checkpoint else CONFIG_FILE} does not describe "
                              f"a model ({e})") from None
    try:
        sharded = checkpoint and not (path / WEIGHTS_FILE).is_file()
        state = read_sharded_state(path / SHARDED_MODEL_DIR) if sharded else load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"{what} {path}: {WEIGHTS_FILE} could not be read ({e})") from None
    if checkpoint:  # the sparse layers' own state: masks out of it, compressed weights expanded
        masks, state = state_dict_masks(state), to_dense_state_dict(state)
    else:
        masks = read_masks(path / MASKS_FILE)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise CheckpointError(f"{what} {path} does not fit its config: {str(e).splitlines()[-1].strip()}") from None
    if unexpected or set(missing) - tied_aliases(model):
        raise CheckpointError(f"{what} {path} does not fit its config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    unfit = sorted(name for name, mask in masks.items() if not _mask_fits(model, name, mask))
    if unfit:  # refused here, where the file is named, rather than deep inside sparsify by each reader
        source = WEIGHTS_FILE if checkpoint else MASKS_FILE
        raise CheckpointError(f"{what} {path}: the masks of {unfit[:3]} in {source} fit no linear layer of its "
                              f"model (masks of another model?)")
    return Export(path, model, masks, config, find_tokenizer(path))


def _mask_fits(model: nn.Module, name: str, mask: torch.Tensor) -> bool:
    """Whether `name` is a linear layer of `model` with the mask's shape: what sparsify can make sparse with it."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        return False
    return isinstance(layer, nn.Linear) and tuple(layer.weight.shape) == tuple(mask.shape)


# ---- Hugging Face directories -------------------------------------------------------------------------------------
def read_hf(path: Path, hf: dict) -> Export:
    """A Hugging Face directory (`model.safetensors`, as save_pretrained writes it) of an architecture some model
    family maps onto (its `model_type`: gpt2, ...) as an Export: the family's model with the same weights (the
    family's adapter renames and re-lays them out), the masks of a directory written by spdf.save_pretrained, its
    tokenizer.json if any. What the family's model cannot compute the same way is refused."""
    family = _family(hf, path)
    try:
        model = family.build(family.hf.config_from_hf(hf))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"{path}: {WEIGHTS_FILE} could not be read (a sharded or .bin checkpoint? re-save it "
                              f"with save_pretrained as one safetensors file) ({e})") from None
    try:
        state = family.hf.state_from_hf(state, model.config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit its config: {str(e).splitlines()[-1].strip()}") from None
    if unexpected or set(missing) - tied_aliases(model):
        raise CheckpointError(f"{path} does not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    masks = {family.hf.module_from_hf(n): m for n, m in read_masks(path / MASKS_FILE).items()}
    weights = dict(model.named_parameters())
    for name, mask in masks.items():
        weight = weights.get(f"{name}.weight")
        if weight is None or tuple(weight.shape) != tuple(mask.shape) or (weight.detach()[~mask] != 0).any():
            raise CheckpointError(f"{path}: the mask of {name!r} does not fit its weight (or the weight is not zero "
                                  f"outside it)")
    targets = {name: 1 - int(mask.sum()) / mask.numel() for name, mask in masks.items()}
    config = {"family": family.name, "model": model.config.to_dict(), "targets": targets, "sparse": bool(masks),
              "source": f"hf-{family.hf.model_type}"}
    tokenizer = path / TOKENIZER_FILE
    return Export(path, model, masks, config, tokenizer if tokenizer.is_file() else None)


def model_fingerprint(path: Path) -> str:
    """sha256 of an export's weights and masks (or of a sharded checkpoint's model state, every file of it in name
    order): which model an evaluation report is about."""
    digest = hashlib.sha256()
    path = Path(path)
    sharded = sorted(p for p in (path / SHARDED_MODEL_DIR).rglob("*") if p.is_file()) \
        if is_sharded_checkpoint(path) and not (path / WEIGHTS_FILE).is_file() else []
    for file in [path / WEIGHTS_FILE, path / MASKS_FILE, *sharded]:
        if sharded:  # the file names too: the same bytes in another shard are another model
            digest.update(str(file.relative_to(path)).encode())
        if file.is_file():
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


# ---- load into a model -------------------------------------------------------------------------------------------
def load_weights(model, export: Path | Export) -> None:
    """Load an export into `model` (sparse or dense): shapes, and masks where the model is sparse, must match."""
    exported = export if isinstance(export, Export) else read_export(export)
    export, masks = exported.path, exported.masks
    shape = lambda m: (family_of(m).name, {k: v for k, v in m.config.to_dict().items() if k != "name"})  # a name
    if shape(exported.model) != shape(model):  # is only a label
        raise CheckpointError(f"{export} holds a model of shape {exported.model.config.to_dict()}, but the recipe "
                              f"asks for {model.config.to_dict()}")
    layers = sparse_layers(model)
    if layers and set(masks) != set(layers):
        raise CheckpointError(f"{export} is {'dense' if not masks else 'sparse on other layers'} but the recipe's "
                              f"model is sparse; fine-tune with init: densify or use a matching checkpoint")
    tied = tied_aliases(model)
    state = {k: v for k, v in exported.model.state_dict().items() if k not in tied}
    if layers:  # through the layer protocol: any backend takes its mask and the kept entries of a dense weight
        set_masks(model, masks)
        for name, layer in layers.items():
            layer.load_dense_weight(state.pop(f"{name}.weight"))
    missing, _ = model.load_state_dict(state, strict=False)
    left = [k for k in missing if k not in tied and k.rpartition(".")[0] not in layers]
    if left:
        raise CheckpointError(f"{export} does not hold {left[:3]}")


def sparse_model(export: Path, model: nn.Module | None = None):
    """(model, sparsifier or None): `model` (default: a fresh model of the export's family and shape) with its weights,
    made sparse on exactly the export's masked layers with exactly its masks. A dense export gives sparsifier None."""
    exported = read_export(export)
    model = model if model is not None else family_of(exported.model).build(exported.model.config)
    sparsifier = None
    if exported.masks:  # the export's own layers are made sparse; its masks replace the generated ones below
        sparsifier = sparsify(model, init=exported.masks, param_filter=[f"{name}.weight" for name in exported.masks])
    load_weights(model, exported)
    return model, sparsifier
