"""Recipes: the typed, versioned description of a run (model, sparsity, tokenizer, phases), read from YAML.

One schema (the dataclasses of `spdf.recipe_schema`, re-exported here) drives YAML loading, `--set` overrides and
validation; the converter below walks the type hints, so a new field needs no parsing code.

Public API
----------
``load_recipe(path, overrides: Sequence[str] = ()) -> Recipe``
    Read a YAML file, apply ``--set`` overrides, validate. Any problem is a `RecipeError` naming the file.
``recipe_from_dict(data: dict) -> Recipe``
    Validate plain data (as YAML gives it). ``recipe_from_dict(r.to_dict()) == r``.
``Recipe.to_dict() -> dict``
    Plain YAML-safe data with every field, defaults included.
``dump_recipe(recipe: Recipe, path) -> None``
    Write the full recipe as YAML atomically (temp file, then rename).
``apply_overrides(data: dict, overrides: Sequence[str]) -> dict``
    Apply ``"a.b.c=value"`` overrides to a copy of `data`. `value` is parsed with ``yaml.safe_load``
    (``phases.0.steps=10``, ``sparsity.level=0.5``, ``sparsity.filter=[a,b]``, ``run_dir=`` for null). List items
    are addressed by index or, for phases, by name (``phases.pretrain.steps=10``). Paths are checked against the
    schema, so optional keys absent from the YAML can be set. Setting one of a group of exclusive keys (a phase's
    steps/tokens/epochs budget; warmup_steps/warmup_tokens) clears the others in that group.
``recipe_fingerprint(recipe: Recipe) -> str``
    sha256 of what makes a run directory incompatible with another recipe: model, sparsity (with its resolved
    seed), tokenizer, the named sources, and each phase's name, kind, init, data/task/mixture, seq_len and
    batch_size. Logging, eval and
    checkpoint cadence, budgets, optimizer/schedule, precision and micro batch size do not count. A setting added
    after run directories existed (its field says so: spdf.typed_spec.added_later) counts only once it leaves its
    default, so those directories still resume: `model.family: gpt` is every older recipe's fingerprint.
``model_config(recipe: Recipe, vocab_size: int | None = None)``
    The config of the recipe's model family (model.family): its named shape with the recipe's overrides. The
    vocabulary is, in order: model.vocab_size, the `vocab_size` argument (the loaded tokenizer's real size),
    tokenizer.vocab_size for kind=train, the named shape's.
``Recipe.run_path -> Path``, ``Recipe.phase(name) -> PhaseSpec``, ``Recipe.sparsity_seed -> int``.
``RecipeError`` (an ``spdf.errors.SpdfUserError``): one line naming the key path and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Sequence

import yaml

from .fswrite import write_text_atomic
from .recipe_schema import (CheckpointSpec, DataSpec, EvalSpec, GenerationEvalSpec, LoggingSpec, ModelSpec,
                            OptimizerSpec, PhaseSpec, Recipe, RecipeError, ScheduleSpec, SourceSpec, SparsitySpec,
                            TaskSpec, TokenizerSpec, join_path, suggest, to_plain)
from .typed_spec import build, compatible_dict, strip_optional, type_hints

__all__ = ["CheckpointSpec", "DataSpec", "EvalSpec", "GenerationEvalSpec", "LoggingSpec", "ModelSpec", "OptimizerSpec",
           "PhaseSpec", "Recipe", "RecipeError", "ScheduleSpec", "SourceSpec", "SparsitySpec", "TaskSpec", "TokenizerSpec",
           "apply_overrides", "dump_recipe", "load_recipe", "model_config", "recipe_fingerprint", "recipe_from_dict"]


# ------------------------------------------------------------------------------------------------- public API
def recipe_from_dict(data: dict) -> Recipe:
    recipe = build(Recipe, data)
    model_config(recipe)  # the shape overrides must make a valid model (e.g. d_model divisible by n_head)
    return recipe


def load_recipe(path, overrides: Sequence[str] = ()) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read the recipe ({err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{path}{where}: malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the top level of a recipe must be a mapping of keys, got {type(data).__name__}")
    try:
        return recipe_from_dict(apply_overrides(data, overrides))
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None


def dump_recipe(recipe: Recipe, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    data = copy.deepcopy(data)
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"--set {override!r}: expected KEY=VALUE, e.g. phases.0.steps=10")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or err
            raise RecipeError(f"--set {key}: cannot parse the value {text!r} ({problem})") from None
        try:
            _set_path(data, key.split("."), value)
        except RecipeError as err:
            raise RecipeError(f"--set {key}: {err}") from None
    return data


def _set_path(data: dict, parts: list[str], value) -> None:
    """Walk `parts` through the schema types and the data together; set the last key to `value`."""
    tp, node, path = Recipe, data, ""
    for i, part in enumerate(parts):
        tp, owner = strip_optional(tp), None
        if dataclasses.is_dataclass(tp):
            hints = type_hints(tp)  # ClassVars (EXCLUSIVE, SHAPE_KEYS) are hints too, but not keys
            fields = {f.name: hints[f.name] for f in dataclasses.fields(tp)}
            if part not in fields:
                raise RecipeError(f"unknown key '{join_path(path, part)}'{suggest(part, fields)}; allowed: "
                                  f"{', '.join(fields)}")
            owner, key, tp = tp, part, fields[part]
        elif typing.get_origin(tp) in (list, tuple):
            key, tp = _list_index(node, part, path), typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:  # glob keys may contain dots: the rest of the path is the key
            node[".".join(parts[i:])] = value
            return
        else:
            raise RecipeError(f"'{path}' is a single value; it has no key '{part}'")
        path = join_path(path, f"[{key}]" if isinstance(key, int) else key)
        if i == len(parts) - 1:
            for group in (owner.EXCLUSIVE if owner is not None and value is not None else ()):
                for other in group:
                    if key in group and other != key:
                        node.pop(other, None)
            node[key] = value
            return
        child = node.get(key) if isinstance(node, dict) else node[key]
        if child is None:
            inner = strip_optional(tp)
            child = [] if typing.get_origin(inner) in (list, tuple) else {}
            node[key] = child
        if not isinstance(child, (dict, list)):
            raise RecipeError(f"'{path}' is {child!r}, not a mapping or a list; it has no key '{parts[i + 1]}'")
        node = child


def _list_index(node, part: str, path: str) -> int:
    if not isinstance(node, list):
        raise RecipeError(f"'{path}' must be a list to take item '{part}', got {node!r}")
    if part.isdigit():
        if int(part) >= len(node):
            raise RecipeError(f"index {part} is out of range: '{path}' has {len(node)} item(s)")
        return int(part)
    names = [item.get("name") for item in node if isinstance(item, dict)]
    if part in names:
        return names.index(part)
    raise RecipeError(f"'{path}' has no item named '{part}'{suggest(part, [n for n in names if n])}; "
                      f"use an index (0..{len(node) - 1}) or one of: {', '.join(map(str, names))}")


# Data keys that only cap how much is read, so raising them to extend a run keeps the run directory compatible.
_BUDGET_DATA_KEYS = ("max_tokens",)
# How the data is made, not what it is: never part of the fingerprint (the packed tokens are the same for any value)
_HOW_DATA_KEYS = ("workers",)
_FINGERPRINT_PHASE_KEYS = ("name", "kind", "init", "data", "task", "seq_len", "batch_size")


def _fingerprint_part(spec, drop=()) -> dict | None:
    """A section as the fingerprint counts it: settings added after run directories existed (their fields say so,
    spdf.typed_spec.added_later) are left out while they hold their defaults, so those directories resume."""
    if spec is None:
        return None
    return {k: v for k, v in compatible_dict(spec).items() if k not in drop}


def recipe_fingerprint(recipe: Recipe) -> str:
    phases = []
    for phase in recipe.phases:
        entry = {k: to_plain(getattr(phase, k)) for k in _FINGERPRINT_PHASE_KEYS}
        entry["data"] = _fingerprint_part(phase.data, drop=_BUDGET_DATA_KEYS + _HOW_DATA_KEYS)
        entry["task"] = _fingerprint_part(phase.task)
        if phase.mixture is not None:  # added later: absent from the fingerprints of single-corpus phases
            entry["mixture"] = dict(phase.mixture)
        phases.append(entry)
    payload = {
        "version": recipe.version,
        "model": _fingerprint_part(recipe.model),
        "sparsity": {**_fingerprint_part(recipe.sparsity), "seed": recipe.sparsity_seed},
        "tokenizer": _fingerprint_part(recipe.tokenizer),
        "phases": phases,
    }
    if recipe.sources:
        payload["sources"] = {s.name: _fingerprint_part(s.data, drop=_BUDGET_DATA_KEYS + _HOW_DATA_KEYS)
                              for s in recipe.sources}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def model_config(recipe: Recipe, vocab_size: int | None = None):
    spec, tok = recipe.model, recipe.tokenizer
    if spec.vocab_size is not None:
        if vocab_size is not None and vocab_size > spec.vocab_size:
            raise RecipeError(f"model.vocab_size ({spec.vocab_size}) is smaller than the tokenizer's vocabulary "
                              f"({vocab_size}); raise it or remove it to take the tokenizer's")
        vocab = spec.vocab_size
    elif vocab_size is not None:
        vocab = vocab_size
    elif tok.kind == "train":
        vocab = tok.vocab_size
    else:
        vocab = spec.shape.vocab_size
    shape = {k: getattr(spec, k) for k in ModelSpec.SHAPE_KEYS + ModelSpec.PARAMETRIZATION_KEYS
             if getattr(spec, k) is not None}
    try:
        return spec.model_family.config(spec.name, vocab_size=vocab, dropout=spec.dropout, **shape)
    except ValueError as err:
        raise RecipeError(str(err)) from None
