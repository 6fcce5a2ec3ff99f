"""µP and SµPar, the trainer's side: per-parameter Adam LR scales and SµPar's density-corrected initialisation.

The model carries the rest (spdf.model.config: init, embedding and logits multipliers, 1/d_head attention).

    sp      every LR scale is 1
    mup     hidden weights (attention and MLP matrices): LR x 1/width_mult; embeddings (and so the tied head), norms
            and biases: x1 (Cerebras-GPT µP)
    supar   as mup, but a sparse hidden weight of density ρ gets LR x 1/(width_mult·ρ) and, at initialisation, its
            kept entries are scaled by 1/sqrt(ρ) on top of µP's std (so std = init_std/sqrt(width_mult·ρ), residual
            projections init_std/sqrt(2·n_layer·width_mult·ρ)) (SµPar, Dey, Bergsma & Hestness 2024)

Why these: a hidden weight's output sums fan_in·ρ non-zero terms. At init each term has variance std², so std must
shrink as 1/sqrt(fan_in·ρ) to keep the output's scale; an Adam update moves every kept entry by about the LR, in a
direction correlated with the input, so the change of the output grows as LR·fan_in·ρ and the LR must shrink as
1/(fan_in·ρ). Densities come from the layers themselves (SparseLayer.density), never from the recipe's level.

Where densities change:
- densify (dense fine-tuning) makes every layer dense: the optimizer of the next phase is built from the dense model,
  so SµPar's scales become µP's (1/width_mult). The formerly masked entries now add to every dot product; keeping
  1/(width_mult·ρ) would make each activation's update 1/ρ times too large (4x at 75%). Sparse fine-tuning
  (init: keep_masks) keeps the sparse layers and their scales.
- a dynamic algorithm whose density moves (GMP prunes from `initial_level` to the target): the init uses the density
  the mask has at initialisation (dense for GMP's default initial 0), and the LR scale follows the current density:
  `LearningRates.set` re-reads it whenever the sparsifier's masks changed (`Sparsifier.mask_version`). SET and RigL
  keep each layer's count, so their scales never change.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import SpdfUserError
from ..model import family_of
from ..sparsity import Sparsifier, sparse_layers
from ..sparsity.sharding import canonical_name

LR_SCALE, SPARSE_LAYER = "lr_scale", "sparse_layer"  # keys this module adds to optimizer param groups


def _config(model: nn.Module):
    config = getattr(model, "config", None)
    return config if config is not None and hasattr(config, "parametrization") else None


def parametrization(model: nn.Module) -> str:
    """The model's parametrization; any model that is not an spdf GPT trains under the standard one."""
    config = _config(model)
    return config.parametrization if config is not None else "sp"


def hidden_layers(model: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
    """Canonical name → (layer, whether it is sparse) for the layers whose weights are µP's hidden weights, as the
    model's family names them (a block's attention and MLP matrices; embeddings, norms and the LM head are not: a
    head tied to the embedding trains as the embedding it is, and µP's readout scale is the logits multiplier).
    A sparse layer outside them is refused: its density correction would silently not be applied."""
    family = family_of(model)
    sparse = {id(layer) for layer in sparse_layers(model).values()}
    found = {}
    for name, m in model.named_modules():
        name = canonical_name(name)
        if family.is_hidden(name) and (id(m) in sparse or isinstance(m, nn.Linear)):
            found[name] = (m, id(m) in sparse)
        elif id(m) in sparse:
            raise ValueError(f"sparse layer {name!r} is not one of the {family.name} model's hidden weights "
                             f"({', '.join(family.hidden_weights)}), which µP and SµPar scale")
    return found


def _weights(layer: nn.Module, sparse: bool) -> list[nn.Parameter]:
    return layer.weight_parameters() if sparse else [layer.weight]


def lr_scale(model: nn.Module, layer: nn.Module, sparse: bool) -> float:
    """The Adam LR scale of a hidden layer's weight under the model's parametrization."""
    config, mode = _config(model), parametrization(model)
    if mode == "sp":
        return 1.0
    density = layer.density if mode == "supar" and sparse else 1.0
    return 1.0 / (config.width_mult * density)


def lr_scales(model: nn.Module) -> dict[int, tuple[float, str | None]]:
    """id(parameter) → (LR scale, sparse layer name or None) for every hidden weight (none under sp).

    Under supar each sparse layer is named: its scale follows its density, which a dynamic algorithm may change."""
    mode = parametrization(model)
    if mode == "sp":
        return {}
    out = {}
    for name, (layer, sparse) in hidden_layers(model).items():
        tracked = name if mode == "supar" and sparse else None
        for p in _weights(layer, sparse):
            out[id(p)] = (lr_scale(model, layer, sparse), tracked)
    return out


@torch.no_grad()
def apply_supar_init(model: nn.Module) -> None:
    """Scale each sparse hidden layer's kept weights by 1/sqrt(density): SµPar's std on top of µP's.

    Call it after sparsify(), on a freshly initialised model: the masks exist (a magnitude mask was chosen from the
    µP weights; scaling keeps their order) and masked entries are zero (they stay zero). No-op unless supar."""
    if parametrization(model) != "supar":
        return
    for name, (layer, sparse) in hidden_layers(model).items():
        if sparse and layer.density < 1.0:
            if layer.density == 0.0:
                raise SpdfUserError(f"supar cannot scale {name}: it keeps no weight (density 0)")
            for p in _weights(layer, sparse):
                p.mul_(1.0 / math.sqrt(layer.density))


class LearningRates:
    """Sets each param group's LR to base × its `lr_scale` before a step; under supar first re-reads the density of
    every tracked sparse layer when the sparsifier's masks have changed since the last call (GMP). The scales live in
    the param groups, so a checkpoint's optimizer state carries them; a resumed run re-reads them from the restored
    masks at its first step, which gives the same numbers."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, sparsifier: Sparsifier | None):
        self.optimizer, self.model, self.sparsifier = optimizer, model, sparsifier
        self._seen = None  # mask_version the scales were last read at; None: never (re-read at the first step)

    def set(self, base_lr: float) -> None:
        if self.sparsifier is not None and self.sparsifier.mask_version != self._seen:
            self._refresh()
            self._seen = self.sparsifier.mask_version
        for group in self.optimizer.param_groups:
            group["lr"] = base_lr * group.get(LR_SCALE, 1.0)

    def _refresh(self) -> None:
        layers = self.sparsifier.layers
        for group in self.optimizer.param_groups:
            name = group.get(SPARSE_LAYER)
            if name is not None:
                group[LR_SCALE] = lr_scale(self.model, layers[name], True)
