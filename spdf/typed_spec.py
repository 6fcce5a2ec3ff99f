"""Typed settings: the base of every spec class, its RecipeError, and the converter from plain (YAML) data.

A spec is a frozen dataclass. Every constraint lives next to its field: bounds in the field's metadata
(`num(default, gt=0)`), relations between fields in a `_check()` method, both run at construction. `build(cls, data)`
walks the type hints to turn plain data into specs, so a new field needs no parsing code. The recipe schema
(`spdf.recipe_schema`) and the data settings (`spdf.data.specs`) are both made of these.
Errors are `RecipeError`s whose message names the full key path (`phases[0].optimizer.lr`) and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from typing import Any, ClassVar, Literal, Union

from .errors import SpdfUserError

class RecipeError(SpdfUserError):
    """A user-fixable problem in a recipe: one line naming the key path and what is allowed.

    `key` is the path of the offending key relative to where the error was raised; `problem` is a template in which
    `{key}` stands for that path, so an enclosing scope can prefix the path (`at`) without re-wording the message.
    """

    def __init__(self, problem: str, key: str = ""):
        self.key, self.problem = key, problem
        if "{key}" in problem:
            message = problem.replace("{key}", key or "(top level)")
        else:
            message = f"{key}: {problem}" if key else problem
        super().__init__(message)

    def at(self, prefix: str) -> "RecipeError":
        return RecipeError(self.problem, join_path(prefix, self.key))


def join_path(prefix: str, key: str) -> str:
    if not prefix:
        return key
    if not key:
        return prefix
    return prefix + key if key.startswith("[") else f"{prefix}.{key}"


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def num(default: Any = dataclasses.MISSING, *, added_later: bool = False, **bounds) -> Any:
    """A numeric field with bounds: ge, gt, le, lt (checked whenever the value is not None); `added_later` as below."""
    return field(default=default, metadata={"bounds": bounds, ADDED_LATER: added_later})


# Field metadata key: the setting was added after run directories, checkpoints and exports already existed.
ADDED_LATER = "added_later"


def added_later(default: Any) -> Any:
    """A field added after run directories, checkpoints and exports already existed. While it holds `default` (what
    those older ones meant without it) it is left out of fingerprints and compatibility dicts (`compatible_dict`), so
    they still resume and load; once set to anything else it counts."""
    return field(default=default, metadata={ADDED_LATER: True})


def compatible_dict(obj) -> dict:
    """The fields of a dataclass (a spec, a model config) as plain data, less every added-later field that holds its
    default: the form that fingerprints and stored layouts compare, the same as before the field existed."""
    return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
            if not (f.metadata.get(ADDED_LATER) and getattr(obj, f.name) == f.default)}


def one_of(default: Any, choices) -> Any:
    """A field whose allowed values a registry gives: `choices()` is read each time a spec is made, so a value
    registered after this class was defined is allowed too (a Literal is fixed when the class is)."""
    return field(default=default, metadata={"choices": choices})


def check_choice(value, allowed, path: str) -> None:
    """The error of a value outside a Literal's or a one_of field's choices: the choices and the closest one."""
    if value not in allowed or isinstance(value, bool):
        raise RecipeError(f"{{key}} must be one of {', '.join(map(repr, allowed))}, got {value!r}"
                          f"{suggest(value, allowed)}", path)


_OPS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
        "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _describe_bounds(bounds: dict) -> str:
    if set(bounds) in ({"ge", "lt"}, {"ge", "le"}, {"gt", "lt"}, {"gt", "le"}):
        lo = "[" if "ge" in bounds else "("
        hi = "]" if "le" in bounds else ")"
        return f"in {lo}{bounds.get('ge', bounds.get('gt'))}, {bounds.get('le', bounds.get('lt'))}{hi}"
    return " and ".join(f"{_OPS[op][0]} {b}" for op, b in bounds.items())


class Spec:
    """Base of every schema class: checks bounds and `_check()` at construction."""

    # Groups of keys of which at most one may be set; `--set` of one clears the others (see apply_overrides).
    EXCLUSIVE: ClassVar[tuple[tuple[str, ...], ...]] = ()

    def __post_init__(self):
        for f in dataclasses.fields(self):
            bounds = f.metadata.get("bounds")
            value = getattr(self, f.name)
            if bounds and value is not None and not all(_OPS[op][1](value, b) for op, b in bounds.items()):
                raise RecipeError(f"{{key}} must be {_describe_bounds(bounds)}, got {value!r}", f.name)
            if "choices" in f.metadata and value is not None:
                check_choice(value, tuple(f.metadata["choices"]()), f.name)
        self._check()

    def _check(self) -> None:
        pass

    def to_dict(self) -> dict:
        return to_plain(self)


def fail(key: str, problem: str):
    raise RecipeError(problem, key)


def at_most_one(spec, keys):
    chosen = [k for k in keys if getattr(spec, k) is not None]
    if len(chosen) > 1:
        fail(chosen[1], f"{{key}}: set only one of {', '.join(keys)} (got {' and '.join(chosen)})")


def require_for(spec, selector: str, required: dict[str, str]):
    """For each choice of `selector`, the key it requires must be set, and the others' keys must not be."""
    choice = getattr(spec, selector)
    for option, key in required.items():
        value = getattr(spec, key)
        if option == choice and not value:
            fail(key, f"{{key}} is required when {selector} is '{option}'")
        if option != choice and value:
            fail(key, f"{{key}} is only used when {selector} is '{option}' ({selector} is '{choice}')")


def to_plain(value):
    """Schema objects -> plain YAML-safe data (dicts, lists, str, int, float, bool, None)."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------ the converter
def type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def union_args(tp) -> tuple | None:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return None


_SCALAR_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def strip_optional(tp):
    args = union_args(tp)
    return next(a for a in args if a is not type(None)) if args else tp


def build(tp, value, path: str = ""):
    """Convert plain YAML data `value` to type `tp`, raising RecipeError naming `path` on any mismatch."""
    args = union_args(tp)
    if args is not None:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return build(inner, value, path)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path)
    origin = typing.get_origin(tp)
    if origin is Literal:
        check_choice(value, typing.get_args(tp), path)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{{key}} must be a list, got {value!r}", path)
        item_types = typing.get_args(tp)
        if origin is tuple and item_types[-1] is not Ellipsis:
            if len(value) != len(item_types):
                raise RecipeError(f"{{key}} must be a list of {len(item_types)} items, got {value!r}", path)
        else:
            item_types = (item_types[0],) * len(value)
        return tuple(build(t, v, f"{path}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))
    if origin is dict:
        key_t, val_t = typing.get_args(tp)
        if not isinstance(value, dict):
            raise RecipeError(f"{{key}} must be a mapping, got {value!r}", path)
        return {build(key_t, k, path): build(val_t, v, f"{path}['{k}']") for k, v in value.items()}
    return _build_scalar(tp, value, path)


def _build_scalar(tp, value, path: str):
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp in (int, float) and not isinstance(value, bool):
        number = value
        if isinstance(value, str):  # YAML 1.1 reads "6e-4" and "2.6e10" as strings
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = None
        if isinstance(number, (int, float)) and math.isfinite(number):
            if tp is float:
                return float(number)
            if isinstance(number, int):
                return number
            if number.is_integer():
                return int(number)
    raise RecipeError(f"{{key}} must be {_SCALAR_NAMES.get(tp, tp)}, got {value!r}", path)


def _build_dataclass(cls, value, path: str):
    if not isinstance(value, dict):
        raise RecipeError(f"{{key}} must be a mapping of {cls.__name__} keys, got {value!r}", path)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if key not in fields:
            raise RecipeError(f"unknown key '{join_path(path, str(key))}'{suggest(key, fields)}; allowed: "
                              f"{', '.join(fields)}")
    types_ = type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            if "choices" in f.metadata and value[name] is not None:  # the choices, rather than "must be a string"
                check_choice(value[name], tuple(f.metadata["choices"]()), join_path(path, name))
            kwargs[name] = build(types_[name], value[name], join_path(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError("missing required key '{key}'", join_path(path, name))
    try:
        return cls(**kwargs)
    except RecipeError as err:
        raise err.at(path) from None
