"""The coordinate check of µP and SµPar, plotted: activation scale per layer over the first Adam steps,
across widths (SP vs µP) and across sparsity (SP, µP, SµPar).

    OMP_NUM_THREADS=1 python benchmarks/coord_check.py     # ~1 min; writes benchmarks/results/coord_check.{json,md,png}

A small GPT (2 layers, 4 heads, d_ff = 4·d_model, vocabulary 256, 8 x 32 random tokens, the same batch for all runs)
is trained 5 AdamW steps at LR 1e-2 (no weight decay, no clipping) with spdf's parameter groups, LR scales and init
(spdf.train.coord_check). Widths 64..512 are dense with µP's base width 64; the sparsity sweep is at width 128
(width_mult 2) with static random masks on the paper's layers. A curve that stays flat as the width (or the
sparsity) grows is what a parametrization whose hyper-parameters transfer looks like; tests/train/test_coord_check.py
asserts the spreads.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from machine import cpu_name  # benchmarks/machine.py, beside this script
from spdf.train.coord_check import small_model_rms, spread

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
WIDTHS = (64, 128, 256, 512)
SPARSITIES = (0.0, 0.5, 0.75, 0.875)
LAYERS = ("embedding", "h.0.attn.c_attn", "h.1.mlp.c_fc", "h.1.mlp.c_proj", "h.1", "logits")
STEPS, CHECK_STEP = 5, 4
SWEEPS = [("sp", "width"), ("mup", "width"), ("sp", "sparsity"), ("mup", "sparsity"), ("supar", "sparsity")]
NAMES = {"sp": "SP", "mup": "µP", "supar": "SµPar"}


def measure() -> dict:
    out = {}
    for param, axis in SWEEPS:
        xs = WIDTHS if axis == "width" else SPARSITIES
        runs = [small_model_rms(param, x, steps=STEPS) if axis == "width" else
                small_model_rms(param, 128, x, steps=STEPS) for x in xs]
        out[f"{param}/{axis}"] = {"x": list(xs), "rms": runs, "spread": spread(runs, CHECK_STEP)}
    return out


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(SWEEPS), len(LAYERS), figsize=(3.0 * len(LAYERS), 2.5 * len(SWEEPS)), squeeze=False)
    for row, (param, axis) in enumerate(SWEEPS):
        sweep = data[f"{param}/{axis}"]
        for col, layer in enumerate(LAYERS):
            ax = axes[row][col]
            for step in range(STEPS):
                ax.plot(sweep["x"], [r[layer][step] for r in sweep["rms"]], marker="o", markersize=3,
                        color=plt.cm.viridis(step / (STEPS - 1)), label=f"step {step}")
            if axis == "width":
                ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            # at least two decades per panel: an autoscaled axis would blow a 10% wiggle up to full height
            values = [r[layer][step] for r in sweep["rms"] for step in range(STEPS)]
            low, high = min(values), max(values)
            pad = max(1.0, (100 * low / high) ** 0.5)
            ax.set_ylim(low / pad, high * pad)
            ax.set_title(f"{NAMES[param]}: {layer}", fontsize=9)
            ax.set_xlabel("d_model" if axis == "width" else "sparsity", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[row][0].set_ylabel("activation RMS", fontsize=8)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Coordinate check: flat = the scale does not depend on width (µP) or sparsity (SµPar)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    start = time.perf_counter()
    data = measure()
    wall = time.perf_counter() - start
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    (RESULTS / "coord_check.json").write_text(json.dumps({"sweeps": data, "wall_seconds": wall, "machine": machine},
                                                         indent=1) + "\n")
    plot(data, RESULTS / "coord_check.png")
    lines = ["# Coordinate check (coord_check.py)", "",
             f"`OMP_NUM_THREADS=1 python benchmarks/coord_check.py` ({wall:.0f} s, {machine['cpu']}): a 2-layer GPT "
             f"trained {STEPS} AdamW steps at LR 1e-2 on one fixed batch; widths {', '.join(map(str, WIDTHS))} "
             f"(dense, µP base width 64) and sparsity {', '.join(f'{s:.1%}' for s in SPARSITIES)} at width 128. "
             f"Spread = largest / smallest activation RMS of a layer across the sweep at step {CHECK_STEP} (after "
             f"{CHECK_STEP} updates); 1.0 is perfectly flat. tests/train/test_coord_check.py asserts < 2 for µP across "
             f"widths and SµPar across sparsity, > 2 for SP (and for µP across sparsity, on the sparse layers).", "",
             "| layer | " + " | ".join(f"{NAMES[p]} across {a}" for p, a in SWEEPS) + " |",
             "|---|" + "---|" * len(SWEEPS)]
    for layer in data["sp/width"]["spread"]:
        lines.append(f"| {layer} | " + " | ".join(f"{data[f'{p}/{a}']['spread'][layer]:.2f}" for p, a in SWEEPS)
                     + " |")
    lines += ["", "![coordinate check](coord_check.png)", ""]
    (RESULTS / "coord_check.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
