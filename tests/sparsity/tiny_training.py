"""The short training run the backend-parity tests share: tiny-test GPT at 75%, the same masks and data whatever the
backend or optimizer, so two runs can be compared entry by entry."""
from __future__ import annotations

import torch
import torch.nn as nn

import spdf

TILE = (16, 16)  # the compressed backend's tiles: tiny-test's 40 x 56 weights are not a multiple (partial edge tiles)


def plain_adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)


def train_tiny_gpt(backend: str, steps: int = 20, make_optimizer=plain_adamw) -> tuple[list[float], nn.Module]:
    """`steps` optimizer steps (grad clipping; weight decay as the optimizer has it); the losses and the model."""
    torch.manual_seed(0)
    model = spdf.GPT.from_name("tiny-test")
    sp = spdf.sparsify(model, sparsity=0.75, seed=0, backend=backend, tile=TILE)
    opt = make_optimizer(model)
    sp.attach(opt)
    # two fixed batches in turn: learnable, so the losses fall and the comparison means something
    data = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, model.config.vocab_size, (4, 17), generator=data) for _ in range(2)]
    losses = []
    for step in range(steps):
        idx = batches[step % 2]
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


def autocast_steps(model: nn.Module, opt: torch.optim.Optimizer, idx: torch.Tensor, steps: int = 3) -> list[float]:
    """`steps` optimizer steps on one batch under bf16 autocast (the GPU tests of the fast backends); the losses."""
    losses = []
    for _ in range(steps):
        with torch.autocast(idx.device.type, dtype=torch.bfloat16):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def linear_stack(widths: list[int], dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Sequential:
    """Linear layers of widths[0] -> widths[1] -> ... with tanh between, seeded: the property tests' model, whose
    every weight the param_filter "*" selects."""
    torch.manual_seed(seed)
    layers = []
    for n_in, n_out in zip(widths, widths[1:]):
        layers += [nn.Linear(n_in, n_out), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)
