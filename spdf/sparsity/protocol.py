"""SparseLayer: what every sparse backend answers, so no code outside spdf/sparsity asks which backend a layer is.

Both backends subclass it: the masked SparseLinear (dense weight with exact zeros) and CompressedSparseLinear (only
the non-zeros stored). Everything else -- the Sparsifier, the optimizer's decay rule, checkpoints, FLOP accounting,
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
"""
from __future__ import annotations

import torch
import torch.nn as nn


class SparseLayer(nn.Module):
    """Base of the sparse backends; see the module docstring for the contract."""

    target_sparsity: float
    transposed: bool
    supports_dynamic: bool = False
    dense_compute: bool = True
    tile: tuple[int, int] | None = None
    keep_dense_grad: bool = False  # RigL's update steps (backends with supports_dynamic only)
    dense_grad: torch.Tensor | None = None
    # Bumped whenever the weight or the mask changed outside an optimizer step (a load, a new mask): the Sparsifier
    # then re-zeroes the weight and the optimizer state after the next step, which it otherwise skips where the
    # update rule keeps zeros zero. A backend that stores no masked entries never needs it.
    zeros_version: int = 0

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
