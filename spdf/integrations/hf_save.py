"""Save and load sparse Hugging Face models: dense weights in transformers' own files, the masks beside them.

    spdf.save_pretrained(model, "out", sparsifier=sp)     # model.safetensors + config.json (dense, zeros in place)
                                                          # + sparsity.json + masks.safetensors
    AutoModelForCausalLM.from_pretrained("out")            # the right dense model, whatever the backend
    model, sp = spdf.from_pretrained(AutoModelForCausalLM, "out")   # sparse again: same masks, same backend

The weights always go through the model's own `save_pretrained` as a dense state dict, so any transformers tool
reads them; the masks use the packed format of spdf's exports (`spdf.export.write_masks`/`read_masks`). Loading goes
through the class's own `from_pretrained` (key renaming, tied weights, dtype handling included) and then makes the
saved layers sparse with exactly the saved masks. Nothing here imports transformers: it calls the model's methods.
"""
from __future__ import annotations

import ast
import re
import types
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from ..export import CheckpointError, read_masks, write_masks
from ..fswrite import read_json, write_json_atomic
from ..layout import MASKS_FILE
from ..sparsity import ALGORITHMS, Sparsifier, sparse_layers, sparsify, to_dense_state_dict
from ..sparsity.schedules import SCHEDULES, ramp

SPARSITY_FILE = "sparsity.json"
FORMAT_VERSION = 1
SPARSIFIER_ATTR = "_spdf_sparsifier"  # the sparsifier a model's bound save_pretrained records (bind_save)


def save_pretrained(model: nn.Module, save_directory, sparsifier: Sparsifier | None = None, **kwargs) -> None:
    """`model.save_pretrained(save_directory, **kwargs)` with dense weights, plus the masks and sparsity settings.

    A given `state_dict=` (Trainer passes one) is made dense too. A dense model removes stale sparsity files, so
    `from_pretrained` never re-sparsifies weights that were fine-tuned densely since."""
    directory = Path(save_directory)
    sparsifier = sparsifier if sparsifier is not None else model.__dict__.get(SPARSIFIER_ATTR)
    state = kwargs.pop("state_dict", None)
    state = to_dense_state_dict(state if state is not None else model.state_dict())
    # the class's method: an instance attribute may be spdf's own guard or binding (see bind_save, sparsify)
    type(model).save_pretrained(model, directory, state_dict=state, **kwargs)
    if not kwargs.get("is_main_process", True):
        return
    write_sparsity(model, directory, sparsifier)


def write_sparsity(model: nn.Module, directory, sparsifier: Sparsifier | None = None) -> None:
    """sparsity.json + masks.safetensors of `model`'s sparse layers into `directory` (stale ones removed)."""
    directory = Path(directory)
    layers = sparse_layers(model)
    for name in (SPARSITY_FILE, MASKS_FILE):
        (directory / name).unlink(missing_ok=True)
    if not layers:
        return
    write_masks({name: layer.mask for name, layer in layers.items()}, directory / MASKS_FILE)
    tiles = {tuple(layer.tile) for layer in layers.values() if layer.tile is not None}
    meta = {"format": "spdf-sparsity", "version": FORMAT_VERSION,
            "layers": {name: {"target": layer.target_sparsity} for name, layer in layers.items()},
            "tile": list(tiles.pop()) if tiles else None}
    if sparsifier is not None:
        meta.update(config=sparsifier.config, step=sparsifier.step, algorithm=sparsifier.algorithm.settings())
    write_json_atomic(directory / SPARSITY_FILE, meta)


def bind_save(model: nn.Module, sparsifier: Sparsifier) -> None:
    """Make `model.save_pretrained(...)` (as Trainer's checkpoints call it) spdf's save_pretrained for this model.

    A bound method, so copy.deepcopy binds the copy to the copied model."""
    model.__dict__[SPARSIFIER_ATTR] = sparsifier
    model.__dict__["save_pretrained"] = types.MethodType(save_pretrained, model)


def read_sparsity(directory) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(sparsity.json, {saved module name: bool mask (out, in)}) of a directory, or None for a dense save."""
    directory = Path(directory)
    has_meta, has_masks = (directory / SPARSITY_FILE).is_file(), (directory / MASKS_FILE).is_file()
    if not has_meta and not has_masks:
        return None
    if has_meta != has_masks:
        raise CheckpointError(f"{directory} holds {SPARSITY_FILE if has_meta else MASKS_FILE} without "
                              f"{MASKS_FILE if has_meta else SPARSITY_FILE}: the sparsity state is incomplete")
    meta = read_json(directory / SPARSITY_FILE, "sparsity settings")
    if meta.get("format") != "spdf-sparsity" or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory / SPARSITY_FILE} is not an spdf sparsity file of version {FORMAT_VERSION}")
    masks = read_masks(directory / MASKS_FILE)
    if set(masks) != set(meta["layers"]):
        raise CheckpointError(f"{directory}: {MASKS_FILE} and {SPARSITY_FILE} name different layers")
    return meta, masks


def _spellings(name: str, prefix: str) -> list[str]:
    # transformers loads a head model from a base checkpoint (and back) by adding or stripping `base_model_prefix`
    if not prefix:
        return [name]
    return [name, f"{prefix}.{name}"] + ([name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [])


def rename_to_model(model: nn.Module, saved: dict) -> dict:
    """Saved module names -> this model's, by transformers' own prefix rule. A name that fits no module is refused."""
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for name, value in saved.items():
        found = next((c for c in _spellings(name, prefix) if c in modules), None)
        if found is None:
            raise CheckpointError(f"the saved mask of {name!r} fits no module of {type(model).__name__}; its "
                                  f"modules look like {next(iter(n for n in modules if n), '')!r}")
        out[found] = value
    return out


def _schedule(value):
    """A schedule as Algorithm.settings() records it (its repr, e.g. "Cosine(initial=0.3, final=0.0, begin=0, end=9)")
    back into the object; any other value unchanged."""
    match = re.fullmatch(r"(\w+)\((.*)\)", value) if isinstance(value, str) else None
    if match is None or match[1].lower() not in SCHEDULES:
        return value
    fields = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in match[2].split(", "))}
    # ramp() builds every kind from the same four fields (a Constant takes only its value)
    return ramp(match[1].lower(), fields["initial"], fields["final"], fields["begin"], fields["end"])


def _algorithm(meta: dict, algorithm):
    if algorithm is not None:
        return algorithm
    settings = dict(meta.get("algorithm") or {"algorithm": "static"})
    name = settings.pop("algorithm")
    try:
        return ALGORITHMS[name](**{k: _schedule(v) for k, v in settings.items()})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"the saved sparsity algorithm {name!r} ({settings}) cannot be rebuilt ({e}); pass "
                              f"algorithm=... to from_pretrained") from None


def from_pretrained(cls, directory, backend: str | None = None, algorithm=None, **kwargs):
    """(model, sparsifier): `cls.from_pretrained(directory, **kwargs)` (a model class or an Auto class), then the
    saved layers made sparse with exactly the saved masks; sparsifier None for a directory without masks.

    backend: a registered backend's name (spdf.sparsity.backends; default: the saved one). The loaded weights must already be zero outside
    the masks: masks that do not belong to the weights are refused, never applied silently."""
    if kwargs.get("output_loading_info"):
        raise ValueError("spdf.from_pretrained returns (model, sparsifier); load with cls.from_pretrained(..., "
                         "output_loading_info=True) to see transformers' loading report")
    model = cls.from_pretrained(directory, **kwargs)
    saved = read_sparsity(directory)
    if saved is None:
        return model, None
    meta, masks = saved
    targets = rename_to_model(model, meta["layers"])
    masks = rename_to_model(model, masks)
    config = dict(meta.get("config") or {})
    backend = backend or config.get("backend", "masked")
    nonzero = {name: int(torch.count_nonzero(model.get_submodule(name).weight)) for name in masks}
    sparsifier = sparsify(model, sparsity=config.get("sparsity", 0.5), init=masks, seed=config.get("seed", 0),
                          param_filter=[f"{name}.weight" for name in masks], backend=backend,
                          tile=tuple(meta.get("tile") or (64, 64)), algorithm=_algorithm(meta, algorithm))
    for name, layer in sparse_layers(model).items():
        if int(torch.count_nonzero(layer.dense_weight())) != nonzero[name]:
            raise CheckpointError(f"{directory}: the weights of {name!r} are not zero outside its saved mask; the "
                                  f"masks do not belong to these weights (fine-tuned densely since?)")
        layer.target_sparsity = float(targets[name]["target"])
    sparsifier.config = {**config, "backend": backend} if config else sparsifier.config
    sparsifier.step = int(meta.get("step", 0))
    return model, sparsifier


def restore(model: nn.Module, sparsifier: Sparsifier, directory) -> None:
    """Put a save's masks, sparse weights and step count back into an already sparsified model (Trainer's resume:
    it loads the dense weights with strict=False, which a compressed layer does not take)."""
    saved = read_sparsity(directory)
    if saved is None:
        raise CheckpointError(f"{directory} holds no {SPARSITY_FILE}/{MASKS_FILE}: it was not saved by spdf, so its "
                              f"masks are unknown; resuming a sparse model from it would be silently wrong")
    meta, masks = saved
    sparsifier.load_masks(rename_to_model(model, masks))
    weights = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        if file.name != MASKS_FILE:
            with safe_open(str(file), "pt") as f:
                weights.update({k: f.get_tensor(k) for k in f.keys()})
    prefix = getattr(model, "base_model_prefix", "") or ""
    for name, layer in sparse_layers(model).items():
        key = next((f"{s}.weight" for s in _spellings(name, prefix) if f"{s}.weight" in weights), None)
        if key is None:
            raise CheckpointError(f"{directory} holds no weight for the sparse layer {name!r}")
        layer.load_dense_weight(weights[key])
        if int(torch.count_nonzero(layer.dense_weight())) != int(torch.count_nonzero(weights[key])):
            raise CheckpointError(f"{directory}: the weights of {name!r} are not zero outside its saved mask")
    targets = rename_to_model(model, meta["layers"])
    for name, layer in sparse_layers(model).items():
        layer.target_sparsity = float(targets[name]["target"])
    sparsifier.step = int(meta.get("step", sparsifier.step))
