"""Which weights get sparsified: linear-layer discovery and glob filters on parameter names.

Candidates are the weights of `nn.Linear` modules and of Hugging Face GPT-2's `Conv1D` (recognised by its class name
and shape, without importing transformers). The default filter is the paper's: every such weight except the output
projection and task heads — in a GPT that is exactly the attention projections and MLP weights. The output
projection is found by what the model says, not only by its name: any weight tied to an embedding (never a
candidate), the model's `get_output_embeddings()` (Pythia's `embed_out`, BERT's `cls.predictions.decoder`), every
module outside a Hugging Face model's `base_model` (task heads: `cls.*`, `classifier`, `score`), and the globs of
DEFAULT_EXCLUDE (`lm_head`, poolers, classifiers, OPT's embedding projections by name).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import torch.nn as nn

from .sharding import canonical_name

ParamFilter = Union[None, str, Sequence[str], Mapping[str, Union[float, None]]]
# OPT's project_in/project_out map between its embedding width and its hidden width: part of the embedding and
# output path, not of a block's attention or MLP
DEFAULT_EXCLUDE = ("*lm_head*", "*pooler*", "*classifier*", "*.project_in.*", "*.project_out.*")


@dataclass(frozen=True)
class Candidate:
    name: str  # canonical parameter name (wrapper prefixes stripped), e.g. "transformer.h.0.mlp.c_fc.weight"
    module_name: str
    module: nn.Module
    transposed: bool  # weight stored (in, out), as Conv1D does

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's shape in nn.Linear orientation (out, in)."""
        rows, cols = self.module.weight.shape
        return (cols, rows) if self.transposed else (rows, cols)


def is_conv1d(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def linear_candidates(model: nn.Module) -> list[Candidate]:
    """Every dense linear layer of the model, skipping weights shared with a non-linear module (tied embeddings)."""
    linear = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            linear[module_name] = Candidate(canonical_name(_join(module_name, "weight")), module_name, module, False)
        elif is_conv1d(module):
            linear[module_name] = Candidate(canonical_name(_join(module_name, "weight")), module_name, module, True)
    shared = {
        id(p)
        for name, module in model.named_modules()
        if name not in linear
        for p in module.parameters(recurse=False)
    }
    return [c for c in linear.values() if id(c.module.weight) not in shared]


def default_dense(model: nn.Module) -> set[str]:
    """Parameter names the default filter leaves dense because the model says they are its output or task head."""
    names: set[str] = set()
    while type(model).__name__ in ("DistributedDataParallel", "DataParallel"):  # ask the model, not its wrapper
        model = model.module
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if isinstance(head, nn.Module) and getattr(head, "weight", None) is not None:
        names.update(canonical_name(n) for n, p in model.named_parameters(remove_duplicate=False)
                     if p is head.weight)
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:  # Hugging Face: everything outside the base is a head
        inside = {id(p) for p in base.parameters()}
        names.update(canonical_name(n) for n, p in model.named_parameters(remove_duplicate=False)
                     if id(p) not in inside)
    return names


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _split(patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [p[1:] for p in patterns if p.startswith("!")]
    return include, exclude


def select(
    model: nn.Module,
    sparsity: float,
    param_filter: ParamFilter = None,
    overrides: Mapping[str, float] | None = None,
) -> dict[str, tuple[Candidate, float]]:
    """Map parameter name → (candidate, target sparsity). Raises ValueError for patterns that match nothing."""
    candidates = linear_candidates(model)
    if not candidates:
        raise ValueError("the model has no nn.Linear or Conv1D layer to sparsify")
    levels: dict[str, float | None] = {}
    if param_filter is None:
        patterns: list[str] = ["*"] + [f"!{p}" for p in DEFAULT_EXCLUDE]
    elif isinstance(param_filter, str):
        patterns = [param_filter]
    elif isinstance(param_filter, Mapping):
        patterns, levels = list(param_filter), dict(param_filter)
    else:
        patterns = list(param_filter)
    include, exclude = _split(patterns)
    if not include:
        raise ValueError(f"param_filter {patterns!r} has no include pattern (only '!' exclusions)")
    names = [c.name for c in candidates]
    for where, pattern in [("param_filter", p) for p in include] + [("overrides", p) for p in overrides or {}]:
        if not fnmatch.filter(names, pattern):
            raise ValueError(
                f"{where} pattern {pattern!r} matched no linear weight; candidates look like {names[0]!r}"
                f" (glob patterns on parameter names, '!pattern' excludes)"
            )
    protected = default_dense(model) if param_filter is None else set()
    chosen: dict[str, tuple[Candidate, float]] = {}
    for c in candidates:
        hits = [p for p in include if fnmatch.fnmatchcase(c.name, p)]
        if not hits or c.name in protected or any(fnmatch.fnmatchcase(c.name, p) for p in exclude):
            continue
        level = next((levels[p] for p in hits if levels.get(p) is not None), sparsity)
        level = next((v for p, v in (overrides or {}).items() if fnmatch.fnmatchcase(c.name, p)), level)
        chosen[c.name] = (c, level)
    if not chosen:
        raise ValueError(f"param_filter {patterns!r} selected no weight (every match was excluded)")
    return chosen
