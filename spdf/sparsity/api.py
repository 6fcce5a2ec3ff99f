"""sparsify() / densify() and state-dict helpers: the verbs of the library surface."""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from .algorithms import ALGORITHMS, Algorithm
from .backends import BACKEND_NAMES, backend_class, spec_problem, state_form_classes
from .masks import check_sparsity
from .methods import MaskMethod, Target, mask_method
from .protocol import sparse_layers
from .selection import ParamFilter, select
from .sharding import SUPPORTED, model_problem
from .sparsifier import Sparsifier, matching_layers

BACKENDS = BACKEND_NAMES  # the registry's names (backends.py)


def _replace(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _algorithm(algorithm) -> Algorithm:
    if algorithm is None:
        return ALGORITHMS["static"]()
    if isinstance(algorithm, Algorithm):
        return algorithm
    if isinstance(algorithm, str) and algorithm in ("static",):
        return ALGORITHMS[algorithm]()
    raise ValueError(f"algorithm must be an Algorithm object (Static(), GMP(...), SET(...), RigL(...)) or "
                     f"'static', got {algorithm!r}")


def sparsify(
    model: nn.Module,
    sparsity: float = 0.75,
    init: str | MaskMethod | dict | object = "random",
    param_filter: ParamFilter = None,
    seed: int = 0,
    overrides: dict[str, float] | None = None,
    backend: str = "masked",
    tile: tuple[int, int] = (64, 64),
    algorithm: Algorithm | str | None = None,
) -> Sparsifier:
    """Swap the selected linear layers of `model` (in place) for sparse ones and return their Sparsifier.

    init: a mask method -- Random() (the paper's), Magnitude(), ERK(), NM(n, m), Block(size), GlobalMagnitude(),
    their registry names ("random", "nm", ...), a {name: bool mask} dict or a callable (name, shape, level) -> mask.
    param_filter: None (the paper's layers), a glob, a list of globs ("!glob" excludes), or {glob: sparsity}.
    overrides: {glob: sparsity} applied on top of the filter's levels. backend: one of BACKENDS ("masked",
    "compressed", "block", "semi_structured"; see spdf/sparsity/backends.py for what each supports).
    algorithm: Static() (default), GMP(...), SET(...) or RigL(...): how the masks change after optimizer steps.
    """
    method = mask_method(init)
    algorithm = _algorithm(algorithm)
    layer_cls = backend_class(backend)  # refuses an unknown name
    settings = method.settings()
    problem = spec_problem(backend, method.name, settings, algorithm.dynamic)
    if problem:
        raise ValueError(problem)
    tile = layer_cls.tile_for(settings, tile)
    check_sparsity(sparsity, "sparsity")
    for pattern, level in (overrides or {}).items():
        check_sparsity(level, pattern)
    if sparse_layers(model):
        raise ValueError("the model is already sparsified; densify() it first")
    problem = model_problem(model)
    if problem:  # the sparse layers would take over parameters that the sharding wrapper manages
        raise ValueError(f"cannot sparsify a sharded model: {problem}. Sparsify the bare model, then shard it "
                         f"({SUPPORTED})")
    chosen = select(model, sparsity, param_filter, overrides)
    for name, (candidate, level) in chosen.items():
        check_sparsity(level, name)
        if not candidate.module_name:
            raise ValueError("cannot sparsify a bare layer in place: wrap it in a module (e.g. nn.Sequential(layer))")
    if method.allocates_levels and (overrides or isinstance(param_filter, dict)):
        raise ValueError(f"init={method.name!r} chooses per-layer sparsity itself: per-pattern levels and overrides "
                         f"cannot be combined with it")
    meta = [name for name, (c, _) in chosen.items() if c.module.weight.is_meta]
    if meta:  # a mask moved to the meta device holds no data: after to_empty() it would be uninitialised memory
        raise ValueError(f"cannot sparsify a model on the meta device ({meta[0]!r} has no data, so its mask would be "
                         f"lost at to_empty()): materialise it first (model.to_empty(device=...) and initialise "
                         f"its weights), then sparsify, then shard it")
    targets = {}
    for name, (c, level) in chosen.items():
        weight = c.module.weight.t() if c.transposed else c.module.weight
        targets[name] = Target(c.shape, algorithm.initial_sparsity(level), weight, c.transposed)
    # Every mask, then every layer, then every swap: a bad layer (say N:M on an indivisible width) or any failure
    # while building leaves the model untouched, its weights unchanged and its modules in place.
    masks = method.masks(targets, seed)
    built: dict[str, nn.Module] = {}
    try:
        for name, (candidate, level) in chosen.items():
            mask, made_at = masks[name]
            mask = mask.t() if candidate.transposed else mask
            # A dynamic algorithm starts below its target (GMP); the layer's target stays the one asked for.
            target = level if algorithm.initial_sparsity(level) != level else made_at
            try:
                built[name] = layer_cls.build(candidate.module, mask, candidate.transposed, target, tile)
            except ValueError as e:  # the layer's own check (a user-given mask of another pattern): say which
                raise ValueError(f"{name}: {e}") from None
    except BaseException:
        for layer in built.values():
            layer.release()
        raise
    for name, layer in built.items():
        layer.apply_mask_()
        _replace(model, chosen[name][0].module_name, layer)
    config = dict(sparsity=sparsity, **method.settings(), seed=seed, backend=backend, **algorithm.settings(),
                  param_filter=param_filter if param_filter is None or isinstance(param_filter, str) else
                  (dict(param_filter) if isinstance(param_filter, dict) else list(param_filter)),
                  overrides=dict(overrides or {}))
    if not layer_cls.stores_dense_weight and callable(getattr(type(model), "save_pretrained", None)):
        model.__dict__["save_pretrained"] = _refuse_plain_save
        if DENSE_SAVE_HOOK not in model.__dict__:
            model.__dict__[DENSE_SAVE_HOOK] = model.register_state_dict_post_hook(_dense_for_transformers_save)
    try:
        return Sparsifier(model, config, algorithm)
    except ValueError:
        densify(model)  # refused (a dynamic algorithm on a static backend): leave the model dense as it came
        raise


def _refuse_plain_save(*args, **kwargs):
    # Hugging Face's save_pretrained would write a compressed layer's values and tile buffers, which its
    # from_pretrained does not know: the layer would load back randomly initialised, with only a log line saying so.
    raise ValueError("save_pretrained on a model with compressed or block sparse layers would save weights that "
                     "from_pretrained loads as random layers: use spdf.save_pretrained(model, directory) (dense "
                     "weights, masks beside them) or spdf.densify(model) first")


DENSE_SAVE_HOOK = "_spdf_dense_save_hook"


def _dense_for_transformers_save(module, state_dict, prefix, local_metadata) -> None:
    # `PreTrainedModel.save_pretrained(model, d)`, called on the class, passes the guard above and asks the model for
    # its state dict itself (spdf.save_pretrained hands it a dense one): it gets the dense weights, zeros in place,
    # which its from_pretrained loads right, as it does a masked model's (instead of random compressed layers).
    if prefix or not _inside_transformers_save_pretrained():
        return
    dense = to_dense_state_dict(state_dict)
    state_dict.clear()
    state_dict.update(dense)


def _inside_transformers_save_pretrained() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "save_pretrained" and frame.f_globals.get("__name__", "").startswith("transformers"):
            return True
        frame = frame.f_back
    return False


def densify(model: nn.Module, names: str | list[str] | None = None) -> nn.Module:
    """Replace sparse layers by their original dense module type, zeros in place, no masks or hooks: all of them,
    or those whose module or parameter name matches `names` (globs), like torch.nn.utils.prune.remove."""
    if not sparse_layers(model):
        raise ValueError("the model has no sparse layer to densify")
    for name, layer in matching_layers(model, names).items():
        _replace(model, name, layer.to_dense())
    if not sparse_layers(model) and model.__dict__.get("save_pretrained") is _refuse_plain_save:
        del model.__dict__["save_pretrained"]
    if not sparse_layers(model) and DENSE_SAVE_HOOK in model.__dict__:
        model.__dict__.pop(DENSE_SAVE_HOOK).remove()
    return model


def is_sparse_state_dict(state_dict: dict) -> bool:
    return any(cls.owns_state(state_dict) for cls in state_form_classes())


def load_state_dict(model: nn.Module, state_dict: dict, densify_model: bool = False, strict: bool = True):
    """Load a model state dict, refusing a sparse/dense mismatch with a clear message unless asked to densify.

    With densify_model=True a sparse checkpoint loads into a dense model (its zeros come along), and a sparsified
    model is densified before a dense checkpoint is loaded into it."""
    sparse_ckpt, sparse_model = is_sparse_state_dict(state_dict), bool(sparse_layers(model))
    if sparse_ckpt and sparse_model:
        problem = _form_problem(model, state_dict)
        if problem and not densify_model:
            raise ValueError(f"{problem}: sparsify the model with a backend of the checkpoint's form, or load with "
                             f"densify_model=True to take its weights densely")
        if problem:  # densify the model and take the checkpoint's weights densely, zeros in place
            densify(model)
            state_dict = to_dense_state_dict(state_dict)
    if sparse_ckpt and not sparse_model:
        if not densify_model:
            raise ValueError("the checkpoint is sparse but the model is dense: sparsify the model with the same "
                             "settings first, or load with densify_model=True to take its weights densely")
        state_dict = to_dense_state_dict(state_dict)
    elif sparse_model and not sparse_ckpt:
        if not densify_model:
            raise ValueError("the checkpoint is dense but the model is sparse: densify the model first, "
                             "or load with densify_model=True")
        densify(model)
    return model.load_state_dict(state_dict, strict=strict)


def _form_problem(model: nn.Module, state_dict: dict) -> str | None:
    """Why the sparse layers of `state_dict` do not load into `model`'s: they are stored in another backend's form
    (a masked model would keep its own weights for compressed layers, silently under strict=False), or None."""
    forms = state_form_classes()
    theirs = {cls for cls in forms if cls.owns_state(state_dict)}
    ours = {cls for layer in sparse_layers(model).values() for cls in forms if isinstance(layer, cls)}
    if theirs == ours:
        return None
    names = lambda classes: " and ".join(sorted(cls.backend for cls in classes))  # noqa: E731
    return (f"the checkpoint stores its sparse layers in the form of backend {names(theirs)}, the model's layers are "
            f"of backend {names(ours)}")


def to_dense_state_dict(state_dict: dict) -> dict:
    """The state dict a dense model of the same shape loads: each backend turns its layers into dense weights (zeros
    in place) and drops its masks."""
    for cls in state_form_classes():
        if cls.owns_state(state_dict):
            state_dict = cls.dense_state_dict(state_dict)
    return state_dict


def state_dict_masks(state_dict: dict) -> dict[str, torch.Tensor]:
    """Module name -> bool mask read from a sparse model's state dict (any backend): in the stored weight's layout
    for masked layers (`weight_mask`), in (out, in) orientation for compressed ones (they store no weight)."""
    masks = {}
    for cls in state_form_classes():
        if cls.owns_state(state_dict):
            masks.update(cls.state_masks(state_dict))
    return masks
