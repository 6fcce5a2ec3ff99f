"""Persistent training state of a GPT model: dense vs masked vs compressed backends at 50/75/90% sparsity.

    python benchmarks/memory.py --out benchmarks/results [--model gpt3-small]

Counted from the real modules (built on CPU, nothing is trained): every trainable parameter costs its weight, its
gradient and AdamW's two moments (4 x numel x element size); buffers (masks, tile indices) cost themselves once.
Activations and temporaries are not persistent state and are not counted. Writes memory.json and memory.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn

import spdf
from spdf.sparsity import sparse_layers

SPARSITIES = (0.5, 0.75, 0.9)


def state_bytes(module: nn.Module) -> dict:
    params = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return dict(weights=params + frozen, grads=params, adamw=2 * params, buffers=buffers,
                total=2 * params + 2 * params + frozen + buffers)


def measure(model_name: str, backend: str, sparsity: float | None, tile) -> dict:
    torch.manual_seed(0)
    model = spdf.GPT.from_name(model_name)
    if backend != "dense":
        spdf.sparsify(model, sparsity=sparsity, seed=0, backend=backend, tile=tile)
        layers = list(sparse_layers(model).values())
    else:  # the layers the paper sparsifies, still dense: measured via a masked twin's selection
        twin = spdf.GPT.from_name(model_name)
        spdf.sparsify(twin, sparsity=0.5, seed=0)
        names = set(sparse_layers(twin))
        layers = [m for n, m in model.named_modules() if n in names]
    sparse = {k: sum(state_bytes(m)[k] for m in layers) for k in ("weights", "grads", "adamw", "buffers", "total")}
    return dict(model=model_name, backend=backend, sparsity=sparsity, sparse_layers=sparse,
                whole_model=state_bytes(model))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--model", default="gpt3-small")
    ap.add_argument("--tile", type=int, nargs=2, default=(64, 64))
    args = ap.parse_args(argv)

    rows = [measure(args.model, "dense", None, args.tile)]
    for s in SPARSITIES:
        for backend in ("masked", "compressed"):
            rows.append(measure(args.model, backend, s, args.tile))
            print(f"{backend:10s} {s:.2f}: sparse layers {rows[-1]['sparse_layers']['total'] / 2**20:8.1f} MiB, "
                  f"whole model {rows[-1]['whole_model']['total'] / 2**20:8.1f} MiB")
    dense = rows[0]
    md = [f"# Persistent training state, {args.model} (fp32 weights + grads + AdamW moments + buffers)", "",
          "Counted from the real modules on CPU; activations and per-step temporaries excluded. Ratio = dense / this.",
          f"Compressed tile: {tuple(args.tile)}.", "",
          "| backend | sparsity | sparse layers MiB | ratio | whole model MiB | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        sl, wm = r["sparse_layers"]["total"], r["whole_model"]["total"]
        md.append(f"| {r['backend']} | {r['sparsity'] if r['sparsity'] is not None else '-'} | {sl / 2**20:.1f} | "
                  f"{dense['sparse_layers']['total'] / sl:.2f}x | {wm / 2**20:.1f} | "
                  f"{dense['whole_model']['total'] / wm:.2f}x |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(rows, indent=1))
    (out / "memory.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
