"""µTransfer in miniature: does the best learning rate stay put across sparsity under SµPar, and move under SP?

    OMP_NUM_THREADS=1 python benchmarks/mutransfer.py            # the committed sweep (see results/mutransfer.md)
    python benchmarks/mutransfer.py --lrs 1e-3 3e-3 --seeds 0    # a smaller one

Every run pre-trains recipes/demo.yaml's corpus (the standard library's source, held-out modules for validation)
with a small GPT for a short budget, through the real recipe runner (`spdf.train.runner.run_recipe`, pre-training
only), changing only `--set` keys: the parametrization (sp, supar), sparsity.level (0, 50, 75%: static random masks,
the paper's layers), the peak LR and the seed (model init, masks and data order). The final validation loss of each
run is recorded; per (parametrization, sparsity) the LR with the lowest mean loss over seeds is the optimum.

Resumable: each finished run is appended to the results JSON as it ends, and a rerun skips the runs already there
(delete the JSON to start over). All runs share one tokenizer (trained by the first) and one data cache, so they see
the same tokens. Writes benchmarks/results/mutransfer.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from machine import cpu_name  # benchmarks/machine.py, beside this script

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PARAMETRIZATIONS = ("sp", "supar")
NAMES = {"sp": "SP", "supar": "SµPar"}
SPARSITIES = (0.0, 0.5, 0.75)
LRS = (1e-3, 2.5e-3, 6.3e-3, 1.6e-2, 4e-2, 1e-1)  # x2.5 apart

# The sweep's model and budget: 72 runs of ~10 s on one shared core (measured: 120 steps took ~7 s at load 9). base_width = d_model, so µP's
# width multiplier is 1 and the only differences from SP are µP's init, multipliers and SµPar's density corrections.
D_MODEL = 64
STEPS = 200
SETS = [
    "model.n_layer=2", f"model.d_model={D_MODEL}", "model.n_head=4", "model.n_ctx=64", f"model.base_width={D_MODEL}",
    "tokenizer.vocab_size=1024", "logging.progress=false", "logging.every_steps=1000",
    "phases.pretrain.data.max_bytes=1000000", "phases.pretrain.seq_len=64", "phases.pretrain.batch_size=16",
    "phases.pretrain.schedule.decay=cosine", "phases.pretrain.eval.batches=8",
    "phases.finetune.seq_len=64",  # not run; its seq_len must fit the context
]


def key(row: dict) -> tuple:
    return row["parametrization"], row["sparsity"], row["lr"], row["seed"]


def run_one(tmp: Path, param: str, sparsity: float, lr: float, seed: int, steps: int, tokenizer: Path | None) -> dict:
    from spdf.recipe import load_recipe
    from spdf.train.runner import run_recipe

    run_dir = tmp / f"{param}-s{sparsity}-lr{lr:g}-seed{seed}"
    sets = [*SETS, f"run_dir={run_dir}", f"seed={seed}", f"model.parametrization={param}",
            f"phases.pretrain.steps={steps}", f"phases.pretrain.schedule.warmup_steps={max(1, steps // 10)}",
            f"phases.pretrain.eval.every_steps={steps}", f"phases.pretrain.checkpoint.every_steps={steps}",
            f"phases.pretrain.optimizer.lr={lr}",
            *([f"sparsity.level={sparsity}"] if sparsity > 0 else ["sparsity.method=none"]),
            *([f"tokenizer.kind=file", f"tokenizer.path={tokenizer}"] if tokenizer is not None else [])]
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", sets)
    start = time.perf_counter()
    summary = run_recipe(recipe, kinds=("pretrain",))
    phase = summary["phases"][0]
    loss = phase["val_loss_after"]
    return {"parametrization": param, "sparsity": sparsity, "lr": lr, "seed": seed, "steps": steps,
            "val_loss": loss if loss is not None and math.isfinite(loss) else None,
            "seconds": time.perf_counter() - start, "run_dir": str(run_dir)}


def optimum(rows: list[dict], param: str, sparsity: float) -> tuple[float, float] | None:
    """(LR, mean loss over seeds) of the lowest mean final loss for (param, sparsity); a diverged run (loss None)
    makes its LR's mean infinite."""
    by_lr: dict[float, list[float]] = {}
    for r in rows:
        if r["parametrization"] == param and r["sparsity"] == sparsity:
            by_lr.setdefault(r["lr"], []).append(r["val_loss"] if r["val_loss"] is not None else math.inf)
    if not by_lr:
        return None
    return min(((lr, sum(v) / len(v)) for lr, v in by_lr.items()), key=lambda t: t[1])


def mean_losses(rows, param, sparsity) -> tuple[list[float], list[float]]:
    by_lr: dict[float, list[float]] = {}
    for r in rows:
        if r["parametrization"] == param and r["sparsity"] == sparsity and r["val_loss"] is not None:
            by_lr.setdefault(r["lr"], []).append(r["val_loss"])
    lrs = sorted(by_lr)
    return lrs, [sum(by_lr[lr]) / len(by_lr[lr]) for lr in lrs]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PARAMETRIZATIONS), figsize=(5.5 * len(PARAMETRIZATIONS), 4), sharey=True)
    for ax, param in zip(axes, PARAMETRIZATIONS):
        for sparsity in SPARSITIES:
            lrs, losses = mean_losses(rows, param, sparsity)
            if not lrs:
                continue
            line, = ax.plot(lrs, losses, marker="o", label=f"{sparsity:.0%} sparse")
            best = optimum(rows, param, sparsity)
            if best is not None and math.isfinite(best[1]):
                ax.plot([best[0]], [best[1]], marker="*", markersize=14, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xticks(LRS, [f"{lr:g}" for lr in LRS])
        ax.minorticks_off()
        ax.set_xlabel("peak learning rate")
        ax.set_title(f"{NAMES[param]}" + (" (standard parametrization)" if param == "sp" else ""))
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("final validation loss (mean of seeds)")
    fig.suptitle("LR sweep across sparsity on the demo corpus (star: best LR)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(result: dict, out: Path) -> None:
    rows = result["rows"]
    b = result["budget"]
    lines = [
        "# µTransfer across sparsity in miniature (mutransfer.py)",
        "",
        f"`{result['command']}`: {len(rows)} runs of recipes/demo.yaml's pre-training (standard-library corpus), "
        f"GPT with 2 layers, d_model {D_MODEL}, 4 heads, BPE vocabulary 1024, {b['steps']} steps of "
        f"{b['tokens_per_step']} tokens ({b['steps'] * b['tokens_per_step']:,} tokens), warm-up {b['warmup_steps']} "
        f"steps then cosine to 10%, AdamW (0.9, 0.95) wd 0.1 clip 1.0; static random masks on the paper's layers; "
        f"SµPar with base width {D_MODEL} (width_mult 1). Seeds {', '.join(map(str, b['seeds']))} (init, masks and "
        f"data order). Loss: final validation loss on held-out modules ({'8'} batches).",
        f"{result['machine']['cpu']}, torch threads {result['machine']['torch_threads']}, torch "
        f"{result['machine']['torch']}; {result['wall_seconds'] / 60:.1f} min of runs in all.",
        "",
        "Final validation loss, mean over seeds (best LR of each row in bold; `diverged` = non-finite):",
        "",
        "| parametrization | sparsity | " + " | ".join(f"LR {lr:g}" for lr in b["lrs"]) +
        " | best LR | best LR per seed |",
        "|---|---|" + "---|" * (len(b["lrs"]) + 2),
    ]
    for param in PARAMETRIZATIONS:
        for sparsity in SPARSITIES:
            best = optimum(rows, param, sparsity)
            cells = []
            for lr in b["lrs"]:
                vals = [r["val_loss"] for r in rows if key(r)[:3] == (param, sparsity, lr)]
                if not vals:
                    cells.append("")
                elif any(v is None for v in vals):
                    cells.append("diverged")
                else:
                    text = f"{sum(vals) / len(vals):.4f}"
                    cells.append(f"**{text}**" if best is not None and best[0] == lr else text)
            per_seed = [optimum([r for r in rows if r["seed"] == seed], param, sparsity) for seed in b["seeds"]]
            lines.append(f"| {param} | {sparsity:.0%} | " + " | ".join(cells) +
                         (f" | {best[0]:g} | " if best is not None else " | | ") +
                         ", ".join(f"{o[0]:g}" for o in per_seed if o is not None) + " |")
    moves = "; ".join(f"{NAMES[p]} " + " → ".join(f"{o[0]:g}" if (o := optimum(rows, p, s)) else "?"
                                                    for s in SPARSITIES) for p in PARAMETRIZATIONS)
    lines += ["", f"Best LR at {' / '.join(f'{s:.0%}' for s in SPARSITIES)} sparsity: {moves} (grid steps are "
              f"x2.5 apart).", "", "![final loss vs LR per sparsity](mutransfer.png)", ""]
    (out / "mutransfer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=None, help="run directories and data cache (default: a temp dir)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "mutransfer.json"
    budget = {"steps": args.steps, "tokens_per_step": 16 * 64, "warmup_steps": max(1, args.steps // 10),
              "lrs": args.lrs, "seeds": args.seeds}
    command = "OMP_NUM_THREADS=1 python benchmarks/mutransfer.py" + (
        "" if (args.steps, args.lrs, args.seeds) == (STEPS, list(LRS), [0, 1]) else
        f" --steps {args.steps} --lrs {' '.join(map(str, args.lrs))} --seeds {' '.join(map(str, args.seeds))}")
    result = json.loads(results_file.read_text()) if results_file.is_file() else {"rows": [], "wall_seconds": 0.0}
    if result.get("budget", budget) != budget:
        sys.exit(f"{results_file} holds a sweep of another budget ({result['budget']}); delete it to start over")
    done = {key(r) for r in result["rows"]}
    work = args.work or Path(tempfile.mkdtemp(prefix="mutransfer-"))
    os.environ.setdefault("SPDF_CACHE_DIR", str(work / "cache"))
    tokenizer = work / "tokenizer.json"
    todo = [(p, s, lr, seed) for seed in args.seeds for p in PARAMETRIZATIONS for s in SPARSITIES for lr in args.lrs
            if (p, s, lr, seed) not in done]
    print(f"{len(done)} runs done, {len(todo)} to go; work directory {work}", flush=True)
    for i, (param, sparsity, lr, seed) in enumerate(todo):
        row = run_one(work, param, sparsity, lr, seed, args.steps, tokenizer if tokenizer.is_file() else None)
        if not tokenizer.is_file():
            tokenizer.write_bytes((Path(row["run_dir"]) / "tokenizer.json").read_bytes())
        result["rows"].append(row)
        result["wall_seconds"] += row["seconds"]
        result.update(budget=budget, command=command, machine={
            "cpu": cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__})
        results_file.write_text(json.dumps(result, indent=2) + "\n")  # after every run: a rerun resumes here
        print(f"[{i + 1}/{len(todo)}] {param} {sparsity:.0%} lr {lr:g} seed {seed}: val loss {row['val_loss']} "
              f"({row['seconds']:.1f} s)", flush=True)
    plot(result["rows"], args.out / "mutransfer.png")
    report(result, args.out)


if __name__ == "__main__":
    main()
