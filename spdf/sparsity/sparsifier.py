"""sparsify() / densify() and the Sparsifier that keeps masked weights exactly zero while training.

    sp = spdf.sparsify(model, sparsity=0.75, init="random", seed=0)
    opt = torch.optim.AdamW(model.parameters(), ...)
    sp.attach(opt)          # after every opt.step(): masked weights and optimizer state re-zeroed
    ...
    spdf.densify(model)     # plain modules again, zeros in place, every weight trainable
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from .bitpack import pack_bits, unpack_bits
from .masks import METHODS, check_sparsity, erk_sparsities, make_mask
from .selection import ParamFilter, select
from .sparse_linear import SparseLinear

STATE_VERSION = 1


def sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name → sparse layer (any backend) of a sparsified model."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "weight_mask") or hasattr(m, "to_dense")}


def _replace(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# Optimizers whose update leaves a state entry and a weight at exactly zero when the gradient there is zero and the
# state entry is zero (moments decay from 0 to 0; decoupled or L2 weight decay of a zero weight is zero).
ZERO_PRESERVING = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)


class Sparsifier:
    """Owns the masks of a sparsified model: keeps them enforced, reports on them, saves and restores them."""

    def __init__(self, model: nn.Module, config: dict):
        self.model = model
        self.config = config
        self._optimizers: list[tuple[torch.optim.Optimizer, list]] = []

    @property
    def layers(self) -> dict[str, nn.Module]:
        return sparse_layers(self.model)

    # ---- keeping the zeros -------------------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> "Sparsifier":
        """After every `optimizer.step()` re-zero masked weights and every optimizer-state tensor of their shape.

        Wrapped optimizers (accelerate's AcceleratedOptimizer, …) are unwrapped through their `.optimizer`."""
        while not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__name__ == "AcceleratedOptimizer":
            optimizer = optimizer.optimizer
        zeroed_state: dict[int, weakref.ref] = {}  # state tensors already zeroed, for zero-preserving optimizers
        handles = [
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self.enforce(opt, zeroed_state)),
            optimizer.register_load_state_dict_post_hook(lambda opt: self.enforce(opt)),
        ]
        self._optimizers.append((optimizer, handles))
        for layer in self.layers.values():
            layer.optimizer_attached = True
        self.enforce(optimizer)
        return self

    def detach(self) -> None:
        for _, handles in self._optimizers:
            for h in handles:
                h.remove()
        self._optimizers.clear()

    @torch.no_grad()
    def enforce(self, optimizer: torch.optim.Optimizer | None = None, zeroed_state: dict | None = None) -> None:
        """Zero masked entries of the weights and of `optimizer`'s state tensors of the weight's shape.

        With `zeroed_state` (what attach() passes after each step) and an optimizer of ZERO_PRESERVING type, a state
        tensor is zeroed once, when it first appears: with masked gradients these optimizers' updates keep a zero
        state entry exactly zero, so zeroing it again every step would only cost two passes over memory
        (benchmarks/step_overhead.py). Weights are re-zeroed every step whatever the optimizer.
        """
        # One in-place multiply per tensor by the uint8 view of the mask: faster on CPU than torch._foreach_mul_,
        # which falls back to a slow per-tensor path for mixed dtypes.
        once = zeroed_state is not None and optimizer is not None and type(optimizer) in ZERO_PRESERVING
        for layer in self.layers.values():
            if not isinstance(layer, SparseLinear):
                continue  # the compressed backend stores no masked entries at all
            layer.apply_mask_()
            keep = layer.mask_multiplier
            state = optimizer.state.get(layer.weight, {}) if optimizer is not None else {}
            for value in state.values():
                if not (torch.is_tensor(value) and value.shape == layer.weight.shape):
                    continue
                if once:
                    seen = zeroed_state.get(id(value))
                    if seen is not None and seen() is value:
                        continue
                    zeroed_state[id(value)] = weakref.ref(value)
                value.mul_(keep)

    # ---- reporting ---------------------------------------------------------------------------------------------
    def stats(self) -> list[dict]:
        return layer_stats(self.model)

    # ---- saving and restoring ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        layers = {}
        for name, layer in self.layers.items():
            mask = layer.mask
            layers[name] = {"shape": list(mask.shape), "bits": pack_bits(mask), "target": layer.target_sparsity}
        return {"version": STATE_VERSION, "config": dict(self.config), "layers": layers}

    def load_state_dict(self, state: dict) -> None:
        """Restore masks saved by state_dict() into this (already sparsified) model; weights are re-zeroed."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"sparsifier state has version {state.get('version')!r}, expected {STATE_VERSION}")
        ours, theirs = self.layers, state["layers"]
        if set(ours) != set(theirs):
            missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
            raise ValueError(f"sparsifier state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, layer in ours.items():
            shape = tuple(theirs[name]["shape"])
            if tuple(layer.mask.shape) != shape:
                raise ValueError(f"mask of {name!r} has shape {shape}, the model's layer has {tuple(layer.mask.shape)}")
            mask = unpack_bits(theirs[name]["bits"], shape)
            layer.weight_mask.copy_(mask.t() if layer.transposed else mask)
            layer.target_sparsity = float(theirs[name]["target"])
        self.config = dict(state["config"])
        self.enforce()
        for optimizer, _ in self._optimizers:
            self.enforce(optimizer)


def layer_stats(model: nn.Module) -> list[dict]:
    """Per sparse layer: name, shape, target and actual sparsity, non-zeros (actual counts the weight's zeros too)."""
    rows = []
    for name, layer in sparse_layers(model).items():
        mask = layer.mask
        numel = mask.numel()
        kept = int(mask.sum())
        weight = layer.dense_weight() if hasattr(layer, "dense_weight") else layer.weight
        nonzero = int(torch.count_nonzero(weight))
        rows.append(
            dict(name=name, shape=tuple(mask.shape), target=layer.target_sparsity, mask_sparsity=1 - kept / numel,
                 actual=1 - nonzero / numel, nnz=nonzero, numel=numel)
        )
    return rows


def sparsify(
    model: nn.Module,
    sparsity: float = 0.75,
    init: str = "random",
    param_filter: ParamFilter = None,
    seed: int = 0,
    overrides: dict[str, float] | None = None,
    n: int = 2,
    m: int = 4,
    block_size: int = 16,
    backend: str = "masked",
    tile: tuple[int, int] = (64, 64),
) -> Sparsifier:
    """Swap the selected linear layers of `model` (in place) for sparse ones and return their Sparsifier.

    init: "random" (the paper's), "magnitude", "erk" (global `sparsity` spread by Erdős–Rényi-Kernel), "nm" (n:m along
    the input dimension; `sparsity` is then 1 - n/m) or "block" (random block_size² blocks).
    param_filter: None (the paper's layers), a glob, a list of globs ("!glob" excludes), or {glob: sparsity}.
    overrides: {glob: sparsity} applied on top of the filter's levels. backend: "masked" or "compressed".
    """
    if init not in METHODS:
        raise ValueError(f"unknown sparsity init {init!r}; allowed: {', '.join(METHODS)}")
    if backend not in ("masked", "compressed"):
        raise ValueError(f"unknown sparse backend {backend!r}; allowed: masked, compressed")
    check_sparsity(sparsity, "sparsity")
    for pattern, level in (overrides or {}).items():
        check_sparsity(level, pattern)
    if sparse_layers(model):
        raise ValueError("the model is already sparsified; densify() it first")
    chosen = select(model, sparsity, param_filter, overrides)
    for name, (candidate, level) in chosen.items():
        check_sparsity(level, name)
        if not candidate.module_name:
            raise ValueError("cannot sparsify a bare layer in place: wrap it in a module (e.g. nn.Sequential(layer))")
    if init == "erk":
        if overrides or isinstance(param_filter, dict):
            raise ValueError("init='erk' allocates per-layer sparsity itself: per-pattern levels and overrides "
                             "cannot be combined with it")
        levels = erk_sparsities({name: c.shape for name, (c, _) in chosen.items()}, sparsity)
        chosen = {name: (c, levels[name]) for name, (c, _) in chosen.items()}
    if init == "nm":
        chosen = {name: (c, 1 - n / m) for name, (c, _) in chosen.items()}
    # Every mask first, then every swap: a bad layer (say N:M on an indivisible width) leaves the model untouched.
    masks = {}
    for name, (candidate, level) in chosen.items():
        weight = candidate.module.weight
        mask = make_mask(init, name, candidate.shape, level, seed, weight=(weight.t() if candidate.transposed else weight),
                         n=n, m=m, block_size=block_size)
        masks[name] = mask.t() if candidate.transposed else mask
    for name, (candidate, level) in chosen.items():
        layer = SparseLinear(candidate.module, masks[name], candidate.transposed, level)
        if backend == "compressed":
            from .compressed import CompressedSparseLinear

            layer = CompressedSparseLinear.from_masked(layer, tile=tile)
        _replace(model, candidate.module_name, layer)
    config = dict(sparsity=sparsity, init=init, seed=seed, n=n, m=m, block_size=block_size, backend=backend,
                  param_filter=param_filter if param_filter is None or isinstance(param_filter, str) else
                  (dict(param_filter) if isinstance(param_filter, dict) else list(param_filter)),
                  overrides=dict(overrides or {}))
    return Sparsifier(model, config)


def densify(model: nn.Module) -> nn.Module:
    """Replace every sparse layer by its original dense module type, zeros in place, no masks or hooks."""
    layers = sparse_layers(model)
    if not layers:
        raise ValueError("the model has no sparse layer to densify")
    for name, layer in layers.items():
        _replace(model, name, layer.to_dense())
    return model


def is_sparse_state_dict(state_dict: dict) -> bool:
    return any(k.endswith("weight_mask") or k.endswith("tile_bitmap") for k in state_dict)


def load_state_dict(model: nn.Module, state_dict: dict, densify_model: bool = False, strict: bool = True):
    """Load a model state dict, refusing a sparse/dense mismatch with a clear message unless asked to densify.

    With densify_model=True a sparse checkpoint loads into a dense model (its zeros come along), and a sparsified
    model is densified before a dense checkpoint is loaded into it."""
    sparse_ckpt, sparse_model = is_sparse_state_dict(state_dict), bool(sparse_layers(model))
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


def to_dense_state_dict(state_dict: dict) -> dict:
    """The state dict a dense model of the same shape loads: masks dropped, compressed layers expanded to dense
    weights (zeros in place) by their backend."""
    if any(k.endswith("tile_bitmap") for k in state_dict):
        from .compressed import dense_state_dict

        state_dict = dense_state_dict(state_dict)
    return {k: v for k, v in state_dict.items() if not k.endswith("weight_mask")}
