"""The registry of sparse backends: the one place that maps a backend's name to its layer class.

Each backend is a SparseLayer subclass that declares what it supports (class attributes, see protocol.py:
`supports_dynamic`, `supports_fsdp2`, `mask_patterns`, `devices`) and owns its layer building and state-dict
conversion (`build`, `owns_state`, `state_masks`, `dense_state_dict`). The recipe schema, the refusals (sparsify,
the Sparsifier, FSDP2 start-up) and save/load all read these declarations, so adding a backend is one new file with
its layer class plus one line here. Classes are imported on first use: a backend's kernels (triton, torchao) load
only when that backend is asked for.
"""
from __future__ import annotations

import importlib

# name -> "module:class", relative to spdf.sparsity
BACKENDS = {
    "masked": "sparse_linear:SparseLinear",
    "compressed": "compressed:CompressedSparseLinear",
    "block": "block:BlockSparseLinear",
    "semi_structured": "semi_structured:SemiStructuredLinear",
}
BACKEND_NAMES = tuple(BACKENDS)


def backend_class(name: str):
    """The layer class of backend `name` (ValueError naming the allowed ones for an unknown name)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown sparse backend {name!r}; allowed: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def state_form_classes() -> list:
    """One layer class per state-dict form. A backend that stores its layers as another one does (block as
    compressed, semi_structured as masked) inherits that form, so converting or reading a state dict asks each form
    once."""
    return [cls for cls in map(backend_class, BACKENDS) if "owns_state" in vars(cls)]


def spec_problem(backend: str, method: str, settings: dict, dynamic: bool) -> str | None:
    """Why `backend` cannot train masks made by mask method `method` with `settings` ({"n": 2, ...}), changed during
    training if `dynamic`; None when it can. Worded for a user: says what is allowed instead."""
    cls = backend_class(backend)
    if dynamic and not cls.supports_dynamic:
        return (f"backend '{backend}' keeps static masks only; a dynamic algorithm changes them during training: "
                f"use backend 'masked'")
    return cls.pattern_problem(method, settings)
