"""From a recipe's `sparsity` section to the sparsity objects: the mask method, the algorithm, sparsify()."""
from __future__ import annotations

import math

import torch.nn as nn

from ..model import family_of
from ..recipe import Recipe, RecipeError
from ..recipe_schema import SparsitySpec
from ..sparsity import ALGORITHMS, MASK_METHODS, NM, Algorithm, Block, Cosine, MaskMethod, Sparsifier, sparsify
from ..sparsity.schedules import ramp

# RigL's (Evci et al. 2020) and Cerebras' convention: masks stop changing after 3/4 of training.
DEFAULT_STOP_FRACTION = 0.75


def mask_init(spec: SparsitySpec) -> MaskMethod:
    name = spec.init if spec.dynamic else spec.method
    if name == "nm":
        return NM(spec.n, spec.m)
    if name == "block":
        return Block(spec.block_size)
    return MASK_METHODS[name]()


def pretrain_steps(recipe: Recipe) -> int | None:
    """Optimizer steps of the first pre-training phase, when the recipe fixes them (steps or tokens)."""
    phase = next((p for p in recipe.phases if p.kind == "pretrain"), None)
    if phase is None:
        return None
    if phase.steps is not None:
        return phase.steps
    if phase.tokens is not None:
        return math.ceil(phase.tokens / (phase.batch_size * phase.seq_len))
    return None


def algorithm(recipe: Recipe) -> Algorithm:
    spec = recipe.sparsity
    if not spec.dynamic:
        return ALGORITHMS["static"]()
    stop = spec.update_stop
    if stop is None:
        steps = pretrain_steps(recipe)
        if steps is None:
            raise RecipeError(f"sparsity.update_stop: give it for method '{spec.method}' (the recipe has no "
                              f"pre-training phase with a fixed number of steps to take 3/4 of)")
        stop = max(int(steps * DEFAULT_STOP_FRACTION), spec.update_start + 1)
    begin, every = spec.update_start, spec.update_every
    if spec.method == "gmp":
        return ALGORITHMS["gmp"](initial=spec.initial_level, every=every, begin=begin, stop=stop,
                                 schedule=spec.schedule or "cubic")
    kind = spec.schedule or "cosine"
    drop = Cosine(spec.drop_fraction, 0.0, begin, stop) if kind == "cosine" else ramp(kind, spec.drop_fraction, 0.0,
                                                                                      begin, stop)
    return ALGORITHMS[spec.method](drop_fraction=drop, every=every, begin=begin, stop=stop)


def sparsify_recipe(recipe: Recipe, model: nn.Module) -> Sparsifier | None:
    """Sparsify a fresh model as the recipe says (None for method 'none'); without a `sparsity.filter`, on the
    weights its model family's default filter names (the paper's: attention and MLP projections)."""
    sp = recipe.sparsity
    if sp.method == "none":
        return None
    try:
        return sparsify(model, sparsity=sp.level, init=mask_init(sp), seed=recipe.sparsity_seed,
                        param_filter=list(sp.filter or family_of(model).default_filter),
                        overrides=dict(sp.overrides) or None,
                        backend=sp.backend, algorithm=algorithm(recipe))
    except ValueError as e:  # the library's words (param_filter, n, m, …): said as the recipe's keys that chose them
        raise RecipeError(f"sparsity ({_settings(sp)}) does not fit the model: {e}") from None


def _settings(sp: SparsitySpec) -> str:
    name = sp.init if sp.dynamic else sp.method
    keys = ["method", "level"] + {"nm": ["n", "m"], "block": ["block_size"]}.get(name, [])
    keys += [k for k in ("filter", "overrides") if getattr(sp, k)]
    return ", ".join(f"sparsity.{k}={getattr(sp, k)!r}" if not isinstance(getattr(sp, k), str)
                     else f"sparsity.{k}={getattr(sp, k)}" for k in keys)
