"""SparseLayer: what every sparse backend answers, so no code outside spdf/sparsity asks which backend a layer is.

Every backend of the registry (backends.py) subclasses it: the masked SparseLinear (dense weight with exact zeros),
CompressedSparseLinear (only the non-zeros stored), BlockSparseLinear (whole blocks, only kept ones computed) and
SemiStructuredLinear (2:4 on the sparse tensor cores). Everything else -- the Sparsifier, the optimizer's decay rule, checkpoints, FLOP accounting,
the CLI -- talks to a layer through these members only:

    mask                 bool (out, in), nn.Linear orientation, True = kept
    transposed           whether the dense module stores its weight (in, out) (Hugging Face Conv1D)
    target_sparsity      what the user asked for (a dynamic algorithm moves it)
    density              kept fraction of the mask; actual_sparsity(): zeros of the weight itself
    dense_weight()       a dense (out, in) copy of the weight, zeros in place
    to_dense()           the original module type (nn.Linear, Conv1D, ...) with a dense trainable weight
    enforce(optimizer)   make masked entries exactly zero in the weight and the optimizer state
    weight_parameters()  the parameters that carry the weight: they take weight decay like any matrix
    set_mask(mask)       install another mask (a loaded state, a dynamic update)
    zeros_version        bumped when the weight or mask changed outside a step (the Sparsifier re-zeroes then)
    load_dense_weight(w) take the weight from a dense tensor in the dense module's layout (an export's weight)
    supports_dynamic     whether set_mask may change the mask while an optimizer holds this layer's state
    sharding_problem(d)  why the zeros cannot be kept as the layer's weight is now wrapped or sharded (None: fine)
    mask_grad_()         mask a gradient that no hook has masked (a sharded weight's), before the optimizer steps
    shard_mask()         keep only this rank's part of the mask where the weight is sharded (FSDP2), at attach
    dense_compute        whether the forward computes a dense matmul (zeros included) or only kept products
    tile                 the (rows, cols) tile of a tiled storage layout, None for a dense weight (what a saved model
                         needs to rebuild the same layout)

What a backend supports, declared on its class and read by the registry's users (backends.py): `backend` (its name),
`supports_dynamic`, `supports_fsdp2`, `mask_patterns` (which mask methods, with which settings, it can compute),
`devices`, `stores_dense_weight` (its state dict holds each weight densely, so any dense loader reads it). It owns
its building (`build`, `tile_for`) and its state-dict form (`owns_state`, `state_masks`, `dense_state_dict`).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn


class SparseLayer(nn.Module):
    """Base of the sparse backends; see the module docstring for the contract."""

    target_sparsity: float
    transposed: bool
    backend: ClassVar[str]
    supports_dynamic: bool = False
    supports_fsdp2: ClassVar[bool] = False
    # mask method name -> {setting: allowed values}; None: masks of any pattern. User-given masks ("user") are
    # checked by the layer itself when it is built.
    mask_patterns: ClassVar[dict[str, dict[str, tuple]] | None] = None
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    stores_dense_weight: ClassVar[bool] = True
    dense_compute: bool = True
    tile: tuple[int, int] | None = None
    keep_dense_grad: bool = False  # RigL's update steps (backends with supports_dynamic only)
    dense_grad: torch.Tensor | None = None
    # Bumped whenever the weight or the mask changed outside an optimizer step (a load, a new mask): the Sparsifier
    # then re-zeroes the weight and the optimizer state after the next step, which it otherwise skips where the
    # update rule keeps zeros zero. A backend that stores no masked entries never needs it.
    zeros_version: int = 0

    # ---- what the backend is (class level: the registry asks before any layer exists) -------------------------------
    @classmethod
    def pattern_problem(cls, method: str, settings: dict) -> str | None:
        """Why masks of mask method `method` with `settings` ({"n": 2, "block_size": 64, ...}) cannot be computed by
        this backend, or None."""
        if cls.mask_patterns is None or method == "user":
            return None
        allowed = " or ".join(
            f"'{name}'" + (" with " if keys else "") + ", ".join(f"{key} {' or '.join(map(str, values))}"
                                                               for key, values in keys.items())
            for name, keys in cls.mask_patterns.items())
        keys = cls.mask_patterns.get(method)
        if keys is None or any(settings.get(key) not in values for key, values in keys.items()):
            shown = ", ".join(f"{key} {settings.get(key)}" for key in (keys or {}))
            return (f"backend '{cls.backend}' computes masks of sparsity.method {allowed} only, not "
                    f"'{method}'{' with ' + shown if shown else ''}: use backend 'masked' for those")
        return None

    @classmethod
    def device_problem(cls, device_type: str) -> str | None:
        if device_type in cls.devices:
            return None
        return (f"backend '{cls.backend}' computes on {' or '.join(cls.devices)} only, not {device_type}: "
                f"use backend 'masked' (the same masks, computed densely) there")

    @classmethod
    def tile_for(cls, method_settings: dict, tile: tuple[int, int]) -> tuple[int, int]:
        """The tile this backend lays its layers out in for masks made with `method_settings`."""
        return tile

    @classmethod
    def build(cls, dense: nn.Module, mask: torch.Tensor, transposed: bool, target_sparsity: float,
              tile: tuple[int, int]) -> "SparseLayer":
        """A layer replacing `dense` (mask in its weight's layout) that leaves `dense`'s weights untouched until
        `apply_mask_()`; `release()` undoes it where sparsify() fails on a later layer."""
        raise NotImplementedError

    def apply_mask_(self) -> None:
        """Zero the masked entries of a weight shared with the dense module (after every layer was built)."""

    def release(self) -> None:
        """Give the dense module back what `build` took (a later layer failed to build)."""

    # ---- the backend's state-dict form ---------------------------------------------------------------------------
    @classmethod
    def owns_state(cls, state_dict: dict) -> bool:
        """Whether `state_dict` holds layers in this backend's form."""
        raise NotImplementedError

    @classmethod
    def state_masks(cls, state_dict: dict) -> dict[str, torch.Tensor]:
        """Module name -> bool mask of every layer of this backend's form in `state_dict`."""
        raise NotImplementedError

    @classmethod
    def dense_state_dict(cls, state_dict: dict) -> dict:
        """`state_dict` with this backend's layers in the dense model's form (a `weight`, zeros in place)."""
        raise NotImplementedError

    # ---- one layer -----------------------------------------------------------------------------------------------
    def take_dense_grad(self) -> None:
        """Keep the current dense gradient as `dense_grad` (out, in), then mask the gradient for the step."""
        raise NotImplementedError

    @property
    def mask(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def density(self) -> float:
        mask = self.mask
        return int(mask.sum()) / mask.numel()

    def actual_sparsity(self) -> float:
        weight = self.dense_weight()
        return 1.0 - int(torch.count_nonzero(weight)) / weight.numel()

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        raise NotImplementedError

    def enforce(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        raise NotImplementedError

    def weight_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def set_mask(self, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
        """Install `mask` (bool, (out, in)); return the bool (out, in) tensor of entries whose status changed.

        Entries that become kept start at zero; every optimizer-state tensor of the weight's shape is reset at
        changed entries."""
        raise NotImplementedError

    def load_dense_weight(self, weight: torch.Tensor) -> None:
        """Copy the kept entries of `weight` (the dense module's layout) into this layer."""
        raise NotImplementedError

    def sharding_problem(self, dynamic: bool) -> str | None:
        """Why this layer cannot keep its zeros under the sharding its weight is in now (with a dynamic algorithm
        if `dynamic`), or None. Sparsifier.attach refuses to train on any answer."""
        raise NotImplementedError

    def mask_grad_(self) -> None:
        """Zero masked gradient entries that no gradient hook reached (nothing to do for most layouts)."""

    def shard_mask(self) -> None:
        """Where the weight is sharded, keep only this rank's part of the mask (nothing to do for most layouts)."""


def sparse_layers(model: nn.Module) -> dict[str, SparseLayer]:
    """Module name → sparse layer (any backend) of a sparsified model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLayer)}
