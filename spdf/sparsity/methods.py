"""Mask methods as objects, and the registry that the recipe schema and the string shorthand read.

    spdf.sparsify(model, 0.75, init=Random())          # the paper's; init="random" is the same
    spdf.sparsify(model, init=NM(2, 4))                  # structured; the level is 1 - n/m
    spdf.sparsify(model, 0.9, init=GlobalMagnitude())    # one |w| threshold across layers (prune.global_unstructured)
    spdf.sparsify(model, init={"fc.weight": my_mask})    # user-given masks, or a callable (name, shape, level) -> mask

A method turns the selected layers {parameter name: Target} into {parameter name: (mask, target sparsity)}. Random
masks are a pure function of (seed, canonical parameter name, shape) -- see masks.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

import torch

from .masks import (block_mask, check_sparsity, erk_sparsities, magnitude_mask, n_zeros, nm_mask, random_mask)


@dataclass(frozen=True)
class Target:
    """One selected layer: shape (out, in), the level the filter gave it, its weight in (out, in) orientation, and
    whether its module stores the weight the other way round, (in, out) (Hugging Face Conv1D)."""

    shape: tuple[int, int]
    level: float
    weight: torch.Tensor
    transposed: bool = False


class MaskMethod:
    """Base of the mask methods. Subclasses set `name` and implement `mask` (one layer) or `masks` (all at once)."""

    name: ClassVar[str]
    # Methods that choose each layer's level themselves refuse per-pattern levels instead of silently ignoring them.
    allocates_levels: ClassVar[bool] = False

    def masks(self, targets: Mapping[str, Target], seed: int) -> dict[str, tuple[torch.Tensor, float]]:
        return {name: (self.mask(name, t, seed), t.level) for name, t in targets.items()}

    def mask(self, name: str, target: Target, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def settings(self) -> dict:
        """JSON-able description, recorded in the sparsifier's config and checkpoints."""
        return {"init": self.name}


class Random(MaskMethod):
    """The paper's mask: exactly round(s·n) zeros per tensor at uniformly random positions."""

    name = "random"

    def mask(self, name, target, seed):
        return random_mask(target.shape, target.level, seed, name)


class Magnitude(MaskMethod):
    """Keep the largest |w| of each tensor (exact count)."""

    name = "magnitude"

    def mask(self, name, target, seed):
        return magnitude_mask(target.weight, target.level, name)


class ERK(MaskMethod):
    """Erdős–Rényi-Kernel: a global sparsity spread over layers (denser small layers), random masks per layer."""

    name = "erk"
    allocates_levels = True

    def __init__(self, sparsity: float | None = None):
        self.sparsity = sparsity  # None: sparsify()'s sparsity

    def masks(self, targets, seed):
        levels = {n: t.level for n, t in targets.items()}
        total = self.sparsity if self.sparsity is not None else next(iter(levels.values()))
        levels = erk_sparsities({n: t.shape for n, t in targets.items()}, total)
        return {n: (random_mask(t.shape, levels[n], seed, n), levels[n]) for n, t in targets.items()}

    def settings(self):
        return {"init": self.name, "erk_sparsity": self.sparsity}


class NM(MaskMethod):
    """n of every m consecutive inputs kept at random (level 1 - n/m, whatever sparsify() was given)."""

    name = "nm"
    allocates_levels = True

    def __init__(self, n: int = 2, m: int = 4):
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
            raise ValueError(f"N:M sparsity needs integers 0 < n < m, got n={n!r}, m={m!r}")
        self.n, self.m = n, m

    def masks(self, targets, seed):
        return {name: (nm_mask(t.shape, self.n, self.m, seed, name), 1 - self.n / self.m)
                for name, t in targets.items()}

    def settings(self):
        return {"init": self.name, "n": self.n, "m": self.m}


class Block(MaskMethod):
    """Random size×size blocks kept or dropped whole."""

    name = "block"

    def __init__(self, size: int = 16):
        self.size = size

    def mask(self, name, target, seed):
        return block_mask(target.shape, target.level, self.size, seed, name)

    def settings(self):
        return {"init": self.name, "block_size": self.size}


class GlobalMagnitude(MaskMethod):
    """Keep the largest |w| over all selected layers together (like torch.nn.utils.prune.global_unstructured):
    exactly round(s·N) zeros in total, spread over layers by their weights' magnitudes."""

    name = "global_magnitude"
    allocates_levels = True

    def masks(self, targets, seed):
        level = check_sparsity(next(iter(targets.values())).level, "sparsity")
        names = list(targets)
        flat = torch.cat([targets[n].weight.detach().float().abs().flatten().cpu() for n in names])
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[torch.topk(flat, flat.numel() - n_zeros(flat.numel(), level), sorted=False).indices] = True
        out, start = {}, 0
        for n in names:
            numel = math.prod(targets[n].shape)
            mask = keep[start:start + numel].view(targets[n].shape)
            out[n] = (mask, 1 - int(mask.sum()) / numel)
            start += numel
        return out


class UserMask(MaskMethod):
    """Masks given by the user: {parameter or module name: bool tensor}, or a callable (parameter name, shape (out,
    in), level) -> bool tensor. Every selected layer needs a mask. As in set_masks, a mask keyed by the parameter's name
    ("x.weight") may be shaped like that parameter (as Sparsifier.masks() gives them), one keyed by the module's name
    ("x") is in (out, in) orientation; either is also taken in the other orientation where only that one fits."""

    name = "user"
    allocates_levels = True

    def __init__(self, source: Mapping[str, torch.Tensor] | Callable):
        self.source = source

    def masks(self, targets, seed):
        out = {}
        for name, t in targets.items():
            stored_layout = False  # whether the mask is in the parameter's own layout, where both would fit
            if callable(self.source):
                mask = self.source(name, t.shape, t.level)
            else:
                module = name[: -len(".weight")] if name.endswith(".weight") else name
                mask = self.source.get(name, self.source.get(module))
                if mask is None:
                    raise ValueError(f"no user mask for {name!r} (give one for every selected layer)")
                # a square Conv1D weight fits both orientations: its parameter's name says which (masks() round trips)
                stored_layout = t.transposed and name in self.source
            if not torch.is_tensor(mask) or mask.dtype != torch.bool:
                raise ValueError(f"the user mask for {name!r} must be a bool tensor")
            mask = mask.cpu()
            if stored_layout and tuple(mask.shape[::-1]) == t.shape:
                mask = mask.t()
            elif tuple(mask.shape) != t.shape and tuple(mask.shape[::-1]) == t.shape:
                mask = mask.t()  # given in the weight's stored layout (Conv1D)
            if tuple(mask.shape) != t.shape:
                raise ValueError(f"the user mask for {name!r} has shape {tuple(mask.shape)}, the weight {t.shape}")
            out[name] = (mask.contiguous(), 1 - int(mask.sum()) / mask.numel())
        if not callable(self.source):
            unused = set(self.source) - set(targets) - {n[: -len(".weight")] for n in targets}
            if unused:
                raise ValueError(f"user masks for layers that are not selected: {sorted(unused)[:3]}")
        return out


MASK_METHODS: dict[str, type[MaskMethod]] = {
    cls.name: cls for cls in (Random, Magnitude, ERK, NM, Block, GlobalMagnitude)}


def mask_method(init) -> MaskMethod:
    """A MaskMethod from an object, a registry name (with default settings), masks by name, or a callable."""
    if isinstance(init, MaskMethod):
        return init
    if isinstance(init, type) and issubclass(init, MaskMethod):
        return init()
    if isinstance(init, str):
        if init not in MASK_METHODS:
            raise ValueError(f"unknown sparsity init {init!r}; allowed: {', '.join(MASK_METHODS)}, a MaskMethod, "
                             f"a {{name: bool mask}} dict or a callable")
        return MASK_METHODS[init]()
    if isinstance(init, Mapping) or callable(init):
        return UserMask(init)
    raise ValueError(f"sparsity init must be a name ({', '.join(MASK_METHODS)}), a MaskMethod, a dict of masks or "
                     f"a callable, got {type(init).__name__}")
