"""The coordinate check of µP (Yang et al., Tensor Programs V): train a model a few Adam steps and record the scale
of every layer's output at each step. Under a parametrization whose hyper-parameters transfer, these scales do not
depend on the width (µP) or on the sparsity (SµPar); under the standard one they grow with both, step after step.

    rms = activation_rms(model, batch, steps=4, lr=1e-2)     # {"h.0.mlp.c_fc": [step 0, step 1, ...], ...}
    rms = small_model_rms("supar", d_model=128, sparsity=0.75)  # the same on a small model built here (any family:
                                                                # shape="llama-tiny-test")
    spread([rms_a, rms_b, ...], step=4)                        # per layer: max / min across the runs

Used by tests/train/test_coord_check.py (the assertion) and benchmarks/coord_check.py (the plot).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..model import config_by_name, family_of
from ..sparsity import Sparsifier, sparsify
from .optim import build_adamw
from .parametrization import LearningRates, apply_supar_init

# Outputs recorded: the embedding (the first block's input: after its multiplier), each of the family's hidden weight
# matmuls (attention projections and MLP layers), each block's output, and the logits.


def activation_rms(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], steps: int, lr: float,
                   sparsifier: Sparsifier | None = None) -> dict[str, list[float]]:
    """Root-mean-square of each watched layer's output, of every block and of the logits, in the forward pass of
    step 0 (at initialisation) … steps-1, training on the same batch with AdamW (no weight decay, no clipping) whose
    LR is scaled per parameter as the model's parametrization says."""
    optimizer = build_adamw(model, lr, (0.9, 0.95), 1e-8, 0.0)
    if sparsifier is not None:
        sparsifier.attach(optimizer)
    rates = LearningRates(optimizer, model, sparsifier)
    record: dict[str, list[float]] = {}
    current: dict[str, float] = {}

    def hook(label):
        def save(module, args, output):
            current[label] = output.detach().float().pow(2).mean().sqrt().item()
        return save

    family = family_of(model)
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, family.block_class)]
    root = blocks[0][0].rsplit(".", 2)[0] + "." if blocks[0][0].count(".") >= 2 else ""  # "transformer." of GPT's

    def embedding(module, args):
        current["embedding"] = args[0].detach().float().pow(2).mean().sqrt().item()

    handles = [blocks[0][1].register_forward_pre_hook(embedding)]
    handles += [m.register_forward_hook(hook(name.removeprefix(root))) for name, m in model.named_modules()
                if family.is_hidden(name) or isinstance(m, family.block_class)]
    try:
        idx, targets = batch
        for _ in range(steps):
            current.clear()
            logits, loss = model(idx, targets)
            current["logits"] = logits.detach().float().pow(2).mean().sqrt().item()
            for label, value in current.items():
                record.setdefault(label, []).append(value)
            rates.set(lr)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
        if sparsifier is not None:
            sparsifier.detach()
    return record


def small_model_rms(parametrization: str, d_model: int, sparsity: float = 0.0, *, shape: str = "tiny-test",
                    base_width: int = 64, n_layer: int = 2, n_head: int = 4, vocab_size: int = 256, seq_len: int = 32,
                    batch_size: int = 8, steps: int = 5, lr: float = 1e-2, seed: int = 0) -> dict[str, list[float]]:
    """activation_rms of a freshly initialised small model: the named `shape` (of any family; its MLP ratio kept) at
    width `d_model`, static random masks at `sparsity` on its family's default layers, on one fixed batch of random
    tokens (the same for every width, sparsity and seed)."""
    torch.manual_seed(seed)
    config = config_by_name(shape, n_layer=n_layer, n_head=n_head, d_model=d_model, n_ctx=seq_len,
                            vocab_size=vocab_size, parametrization=parametrization, base_width=base_width)
    family = family_of(config)
    model = family.build(config)
    sparsifier = (sparsify(model, sparsity=sparsity, seed=seed, param_filter=list(family.default_filter))
                  if sparsity > 0 else None)
    apply_supar_init(model)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(1234))
    return activation_rms(model, (tokens[:, :-1], tokens[:, 1:]), steps, lr, sparsifier)


def spread(runs: list[dict[str, list[float]]], step: int) -> dict[str, float]:
    """Per layer: the largest over the smallest RMS across `runs` at `step` (1.0: the same scale in every run)."""
    return {layer: max(r[layer][step] for r in runs) / min(r[layer][step] for r in runs) for layer in runs[0]}
