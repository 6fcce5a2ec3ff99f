"""The coordinate check of µP (Yang et al., Tensor Programs V): train a model a few Adam steps and record the scale
of every layer's output at each step. Under a parametrization whose hyper-parameters transfer, these scales do not
depend on the width (µP) or on the sparsity (SµPar); under the standard one they grow with both, step after step.

    rms = activation_rms(model, batch, steps=4, lr=1e-2)     # {"h.0.mlp.c_fc": [step 0, step 1, ...], ...}
    rms = small_gpt_rms("supar", d_model=128, sparsity=0.75)  # the same on a small GPT built here
    spread([rms_a, rms_b, ...], step=4)                        # per layer: max / min across the runs

Used by tests/train/test_coord_check.py (the assertion) and benchmarks/coord_check.py (the plot).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..model import GPT, GPTConfig
from ..sparsity import Sparsifier, sparsify
from .optim import build_adamw
from .parametrization import LearningRates, apply_supar_init

# Outputs recorded: the embedding (after its multiplier), each block's attention projections and MLP layers, the
# block output, and the logits.
WATCHED = ("transformer.drop", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _label(name: str) -> str:
    return "embedding" if name == "transformer.drop" else name.removeprefix("transformer.")


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

    handles = [m.register_forward_hook(hook(_label(name))) for name, m in model.named_modules()
               if name == "transformer.drop" or name.endswith(WATCHED[1:]) or name.rsplit(".", 1)[-1].isdigit()]
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


def small_gpt_rms(parametrization: str, d_model: int, sparsity: float = 0.0, *, base_width: int = 64,
                  n_layer: int = 2, n_head: int = 4, vocab_size: int = 256, seq_len: int = 32, batch_size: int = 8,
                  steps: int = 5, lr: float = 1e-2, seed: int = 0) -> dict[str, list[float]]:
    """activation_rms of a freshly initialised small GPT (d_ff = 4·d_model), static random masks at `sparsity` on
    the paper's layers, on one fixed batch of random tokens (the same for every width, sparsity and seed)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, d_model=d_model, d_ff=4 * d_model, n_ctx=seq_len,
                          vocab_size=vocab_size, parametrization=parametrization, base_width=base_width))
    sparsifier = sparsify(model, sparsity=sparsity, seed=seed) if sparsity > 0 else None
    apply_supar_init(model)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(1234))
    return activation_rms(model, (tokens[:, :-1], tokens[:, 1:]), steps, lr, sparsifier)


def spread(runs: list[dict[str, list[float]]], step: int) -> dict[str, float]:
    """Per layer: the largest over the smallest RMS across `runs` at `step` (1.0: the same scale in every run)."""
    return {layer: max(r[layer][step] for r in runs) / min(r[layer][step] for r in runs) for layer in runs[0]}
