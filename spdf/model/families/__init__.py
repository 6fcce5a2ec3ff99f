"""Model families: everything spdf needs to know about one kind of model, in one entry per family.

A family (compare torchtitan's `TrainSpec` and litgpt's `Config`) says how to build its model from a config, which
shapes it names, which weights the paper sparsifies, which matmul each weight is for FLOP accounting, which weights
µP/SµPar scale as hidden, which block FSDP2 shards, and how it maps onto a Hugging Face transformers architecture.
The runner, FSDP2, export, FLOPs, inspect, generation and evaluation ask the family (by name, by config or by model);
none of them names a family's modules.

What every family's model must offer (spdf.model.gpt.GPT is the reference): a `config` attribute (a frozen dataclass
with `from_name`, `replace`, `to_dict`, and `n_ctx`, `vocab_size`, `parametrization`, `width_mult`), `forward(idx,
targets=None, *, kv_cache, attention_mask, positions, last_logits_only)` returning (logits, loss) or (logits,
kv_cache), `new_kv_cache(max_len)` (all that generation needs), and `num_parameters()`.

Adding a family: one module in this package with its `ModelFamily`, and one line in `_ENTRIES` below.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch.nn as nn

from ...errors import SpdfUserError

DEFAULT_FAMILY = "gpt"  # what a recipe, export or checkpoint that names no family is (all were GPTs before)


@dataclass(frozen=True)
class HFAdapter:
    """How a family's model maps onto a Hugging Face transformers architecture. Every function raises ValueError for
    what the other side cannot hold (the message says what); no function imports transformers."""

    model_type: str  # transformers' `config.model_type` ("gpt2", "llama")
    label: str  # the architecture's name in messages ("GPT-2")
    config_to_hf: Callable  # model -> keyword arguments of the transformers config class
    state_to_hf: Callable  # dense model -> the transformers model's state dict (its names and layouts)
    config_from_hf: Callable  # a transformers config.json (a dict) -> the family's config
    state_from_hf: Callable  # (transformers state dict, config) -> the family's state dict
    module_to_hf: Callable[[str], str]  # a module name (a sparse layer's, as masks are named) each way
    module_from_hf: Callable[[str], str]


@dataclass(frozen=True)
class ModelFamily:
    name: str
    config_class: type
    model_class: type
    configs: Mapping[str, object]  # named shapes (the family's own dict: an entry added to it is a named shape)
    default_shape: str  # what a recipe that names no shape trains (a tiny one)
    block_class: type  # the repeated block: FSDP2 shards each one, then the root
    # module-name suffix of every weight matmul of a block -> its FLOP component (spdf.flops.WEIGHT_COMPONENTS)
    flop_roles: Mapping[str, str]
    forward_flops: Callable  # (config, seq_len) -> {component: forward FLOPs per token} for every spdf.flops component
    default_filter: tuple[str, ...]  # parameter-name globs the paper sparsifies (a recipe's `sparsity.filter: null`)
    hidden_weights: tuple[str, ...]  # module-name suffixes of µP's hidden weights (LR and init scaled with width)
    hf: HFAdapter | None = field(default=None)

    def config(self, name: str, **overrides):
        return self.config_class.from_name(name, **overrides)

    def config_from_dict(self, data: dict):
        return self.config_class(**data)

    def build(self, config) -> nn.Module:
        return self.model_class(config)

    def role(self, module_name: str) -> str | None:
        """The FLOP component of a weight matmul module, None for any other module."""
        return next((role for suffix, role in self.flop_roles.items() if module_name.endswith(suffix)), None)

    def is_hidden(self, module_name: str) -> bool:
        return module_name.endswith(self.hidden_weights)


def _entries() -> tuple[ModelFamily, ...]:
    from .gpt import FAMILY as GPT
    from .llama import FAMILY as LLAMA

    return (GPT, LLAMA)


FAMILIES: dict[str, ModelFamily] = {family.name: family for family in _entries()}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        close = difflib.get_close_matches(str(name), FAMILIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpdfUserError(f"unknown model family {name!r}{hint}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(config_or_model) -> ModelFamily:
    """The family of a config or of a model (by its config's class)."""
    config = getattr(config_or_model, "config", config_or_model)
    for family in FAMILIES.values():
        if type(config) is family.config_class:
            return family
    raise ValueError(f"{type(config_or_model).__name__} is not a model of any spdf model family "
                     f"({', '.join(FAMILIES)})")


def family_of_shape(name: str) -> ModelFamily | None:
    return next((family for family in FAMILIES.values() if name in family.configs), None)


def family_for_hf(model_type: str | None) -> ModelFamily:
    """The family whose Hugging Face architecture has this `model_type`."""
    for family in FAMILIES.values():
        if family.hf is not None and family.hf.model_type == model_type:
            return family
    known = ", ".join(f.hf.model_type for f in FAMILIES.values() if f.hf is not None)
    raise SpdfUserError(f"a Hugging Face {model_type!r} model has no spdf model family (spdf reads: {known})")


def named_shapes() -> Iterator[tuple[ModelFamily, str, object]]:
    """(family, name, config) of every named shape of every family."""
    for family in FAMILIES.values():
        for name, config in family.configs.items():
            yield family, name, config


def config_by_name(name: str, **overrides):
    """The named shape `name` of whichever family names it (names are unique across families)."""
    family = family_of_shape(name)
    if family is None:
        names = [n for _, n, _ in named_shapes()]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpdfUserError(f"unknown model name {name!r}{hint}; known: {', '.join(names)}")
    return family.config(name, **overrides)


def _check_unique_names() -> None:
    seen: dict[str, str] = {}
    for family, name, _ in named_shapes():
        if name in seen:  # `spdf flops NAME` and a recipe's model.name must mean one shape
            raise RuntimeError(f"shape {name!r} is named by families {seen[name]!r} and {family.name!r}")
        seen[name] = family.name


_check_unique_names()
