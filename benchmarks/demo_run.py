"""Wall time and throughput of the README's main job, `spdf run recipes/demo.yaml`, as a new user meets it.

    python benchmarks/demo_run.py [--recipe recipes/demo.yaml] [--set key=value ...] [--name NAME]
    python benchmarks/demo_run.py --set model.family=llama --name demo-llama     # the demo as a Llama

Runs the recipe in a fresh temporary run directory and data cache (so tokenizer training and packing are included,
as on a fresh machine) through the real `spdf` command in a subprocess, then reads the run's own records: each
phase's done.json (steps, tokens, training seconds, validation loss before/after, FLOPs) and metrics.jsonl
(tokens/s of every logged window, and the seconds each downstream evaluation took). Writes
benchmarks/results/<recipe name>.{json,md} (demo.*, demo-dense.*, demo-spsf.*), and <recipe name>-generations.json:
every input, references and generation behind the downstream scores (downstream_generations.py), so they can be
re-scored. --generations-only trains the same run but writes only the generations, after checking that its
downstream scores are the committed <recipe name>.json's (a busy machine's timings never replace an idle one's).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from spdf.eval.evaluate import METRIC_LABELS
from spdf.eval.metrics import TASK_METRICS

from downstream_generations import write_generations  # beside this script
from machine import cpu_name  # benchmarks/machine.py, beside this script

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default=None,
                    help="the results' file name (default: the recipe's, e.g. demo); e.g. demo-llama for "
                         "--set model.family=llama, so the demo's own results stay")
    ap.add_argument("--generations-only", action="store_true",
                    help="write only <recipe>-generations.json, after checking the scores against <recipe>.json")
    args = ap.parse_args()
    stem = args.name or args.recipe.stem

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        env = dict(os.environ, SPDF_CACHE_DIR=str(Path(tmp) / "cache"))
        cmd = [sys.executable, "-m", "spdf", "run", str(args.recipe), "--set", f"run_dir={run_dir}",
               "--set", "logging.progress=false", *[a for s in args.sets for a in ("--set", s)]]
        load_before = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        load_after = os.getloadavg()
        if proc.returncode != 0:
            sys.exit(f"spdf run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        phases = []
        for phase_dir in sorted((run_dir / "phases").iterdir(), key=lambda p: (p / "done.json").stat().st_mtime):
            done = json.loads((phase_dir / "done.json").read_text())
            rates = [r["tokens_per_s"] for r in records if r["phase"] == phase_dir.name and "tokens_per_s" in r]
            phases.append({
                "phase": phase_dir.name, "steps": done["steps"], "tokens": done["tokens"],
                "train_seconds": done["train_seconds"], "tokens_per_s": done["tokens"] / done["train_seconds"],
                "tokens_per_s_median_window": statistics.median(rates) if rates else None,
                "val_loss_before": done["val_loss_before"], "val_loss_after": done["val_loss_after"],
                "flops_spent": done["flops_spent"], "flops_dense_equivalent": done["flops_dense_equivalent"],
                "downstream_before": done.get("downstream_before"), "downstream_after": done.get("downstream_after"),
                "downstream_seconds": sum(r["eval_seconds"] for r in records
                                          if r["phase"] == phase_dir.name and "eval_seconds" in r),
                "tokens_by_source": done.get("tokens_by_source"),  # a mixture phase: tokens drawn per source
            })
        if args.generations_only:
            _check_scores(phases, args.out / f"{stem}.json")
        args.out.mkdir(parents=True, exist_ok=True)
        print(write_generations(run_dir, args.out / f"{stem}-generations.json"))
    if args.generations_only:
        return
    trained = sum(p["train_seconds"] for p in phases)
    result = {
        "command": " ".join(["spdf", "run", os.path.relpath(args.recipe, REPO), *[f"--set {s}" for s in args.sets]]),
        "wall_seconds": wall, "train_seconds": trained, "other_seconds": wall - trained,
        "phases": phases,
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_before": load_before[0], "load_after": load_after[0]},
    }
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# The offline demo, end to end (demo_run.py)",
        "",
        f"`{result['command']}` from an empty data cache (tokenizer training and packing included): "
        f"**{wall / 60:.1f} min** wall ({trained:.0f} s in training steps, {wall - trained:.0f} s in "
        f"start-up, corpus, tokenizer, packing, validation, checkpoints and exports).",
        f"{result['machine']['cpu']}, {result['machine']['cpus']} CPUs, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after.",
        "",
        "| phase | steps | tokens | train s | tokens/s | val loss before | val loss after | FLOPs spent | dense-equivalent | saving |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        lines.append(f"| {p['phase']} | {p['steps']} | {p['tokens']:,} | {p['train_seconds']:.0f} | "
                     f"{p['tokens_per_s']:,.0f} | {p['val_loss_before']:.3f} | {p['val_loss_after']:.3f} | "
                     f"{p['flops_spent']:.3e} | {p['flops_dense_equivalent']:.3e} | "
                     f"{p['flops_dense_equivalent'] / p['flops_spent']:.2f}x |")
    mixed = [p for p in phases if p["tokens_by_source"]]
    if mixed:
        lines += ["", "| mixture phase | tokens drawn per source (share) |", "|---|---|"]
        for p in mixed:
            total = sum(p["tokens_by_source"].values())
            lines.append(f"| {p['phase']} | " + ", ".join(f"{name} {n:,} ({100 * n / total:.1f}%)"
                                                         for name, n in p["tokens_by_source"].items()) + " |")
    for p in phases:
        results = [(label, p[key]) for label, key in (("before fine-tuning", "downstream_before"),
                                                      ("after fine-tuning", "downstream_after")) if p[key]]
        if not results:
            continue
        first = results[-1][1]
        names = [n for n in TASK_METRICS.get(first["task"], ()) if n in first["metrics"]]  # done.json sorts keys
        lines += ["", f"Downstream ({p['phase']}): {first['task']} {first['split']} split, {first['examples']} "
                      f"held-out inputs, {first['decoding']} decoding; the evaluations took "
                      f"{p['downstream_seconds']:.1f} s in all (generation, scoring, reference loss).", "",
                  "| model | " + " | ".join(METRIC_LABELS.get(n, n) for n in names) + " | reference loss |", "|---|" + "---|" * (len(names) + 1)]
        lines += [f"| {label} | " + " | ".join(f"{r['metrics'][n]:.2f}" for n in names)
                  + f" | {r['reference_loss']:.3f} |" for label, r in results]
    lines += ["", "tokens/s = tokens / seconds spent in the phase's training steps (validation and checkpoints excluded); FLOPs are spdf's analytic "
              "training FLOPs (the masked backend on CPU still runs dense matmuls: the saving is in FLOPs the "
              "hardware could skip, not in CPU time)."]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _check_scores(phases: list[dict], committed_file: Path) -> None:
    """The run's downstream scores must be the committed ones, or its generations are not theirs."""
    committed = {p["phase"]: p for p in json.loads(committed_file.read_text())["phases"]}
    for p in phases:
        for key in ("downstream_before", "downstream_after"):
            mine = (p.get(key) or {}).get("metrics")
            theirs = (committed.get(p["phase"], {}).get(key) or {}).get("metrics")
            if mine != theirs:
                sys.exit(f"{p['phase']} {key}: this run scored {mine}, {committed_file} holds {theirs}: the "
                         f"generations would not be the committed scores'; not written")


if __name__ == "__main__":
    main()
