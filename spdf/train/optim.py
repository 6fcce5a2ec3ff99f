"""AdamW with the usual decay/no-decay split: matrices decay; biases, norm gains and other vectors do not. Under µP
and SµPar hidden weights get their own groups with an LR scale (`lr_scale`; the loop multiplies the LR by it).

A sparse layer says which of its parameters carry its weight (the compressed backend's are 1-D non-zero values):
those decay like the matrix they stand for."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..sparsity import sparse_layers
from .parametrization import LR_SCALE, SPARSE_LAYER, lr_scales


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decay, no decay] groups, then, under µP/SµPar, one group per LR scale of hidden weights (one per sparse layer
    under supar, whose scale follows that layer's density: spdf.train.parametrization). Each group has `lr_scale`."""
    weights = {id(p) for layer in sparse_layers(model).values() for p in layer.weight_parameters()}
    scales = lr_scales(model)
    groups: dict[tuple, dict] = {
        (True, 1.0, None): {"params": [], "weight_decay": weight_decay, LR_SCALE: 1.0},
        (False, 1.0, None): {"params": [], "weight_decay": 0.0, LR_SCALE: 1.0},
    }
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            decays = p.dim() >= 2 or id(p) in weights
            scale, layer = scales.get(id(p), (1.0, None))
            key = (decays, scale, layer)
            if key not in groups:
                groups[key] = {"params": [], "weight_decay": weight_decay if decays else 0.0, LR_SCALE: scale,
                               **({SPARSE_LAYER: layer} if layer is not None else {})}
            groups[key]["params"].append(p)
    return list(groups.values())


FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel for floating-point parameters


def build_adamw(model: nn.Module, lr: float, betas, eps: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over param_groups(); the fused kernel wherever torch has one.

    Fused is one pass per tensor instead of foreach's several, and on CPU it is also immune to a slow path in
    torch's vectorised sqrt on exact zeros, which is what a sparse model's AdamW state holds at masked positions
    (benchmarks/step_overhead.py measures both: foreach AdamW makes a 75%-sparse step ~4% slower than dense on an
    AVX-512 CPU, fused does not).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    # torch 2.13's CPU fused kernel updates a non-contiguous parameter wrongly (it walks param and grad as if they
    # had the same strides): those models get the foreach path.
    fused = bool(params) and all(p.is_floating_point() and p.device.type in FUSED_DEVICES and p.is_contiguous()
                                 for p in params)
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
                             fused=fused or None)
