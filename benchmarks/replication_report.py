"""benchmarks/results/replication.md and its PNGs from the raw per-run records of replicate.py.

    python benchmarks/replication_report.py      # re-reads benchmarks/results/replication/*.json (partial is fine)

Every number is a mean over the seeds that have finished, ± the sample standard deviation over those seeds (none
with one seed). Gaps to the dense baseline are taken seed by seed (same seed: same data order and initialisation
stream) and then averaged.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
METRICS = (("bleu", "BLEU"), ("rouge_l", "ROUGE-L"), ("chrf", "chrF"))
MODES = (("spdf", "dense (SPDF)"), ("spsf", "sparse (SPSF)"))


def load_runs(raw_dir: Path) -> tuple[dict, list[dict]]:
    """(plan, records of the planned runs that have finished), in the plan's order."""
    plan = json.loads((raw_dir / "plan.json").read_text())
    runs = [json.loads((raw_dir / f"{rid}.json").read_text()) for rid in plan["runs"]
            if (raw_dir / f"{rid}.json").is_file()]
    return plan, runs


def spread(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def downstream(run: dict, name: str) -> float:
    return run["downstream_after"]["metrics"][name]


def _by(runs: list[dict], kind: str, method: str, mode: str | None = None) -> list[dict]:
    return [r for r in runs if r["kind"] == kind and r["method"] == method and r.get("finetune") == mode]


def _gap(runs: list[dict], method: str, value, kind: str, mode: str | None, base_mode: str | None) -> list[float]:
    """Per seed: value(method) - value(dense), both finished; the dense side is fine-tuned with base_mode."""
    base = {r["seed"]: value(r) for r in _by(runs, kind, "dense", base_mode)}
    return [value(r) - base[r["seed"]] for r in _by(runs, kind, method, mode) if r["seed"] in base]


def table_lines(plan: dict, runs: list[dict]) -> list[str]:
    lines = ["| pre-training | sparsity | pre-training FLOPs | pre-train val loss | fine-tuning | downstream val loss "
             "| " + " | ".join(label for _, label in METRICS) + " | seeds |",
             "|---|---|---|---|---|---|" + "---|" * len(METRICS) + "---|"]
    for method in plan["methods"]:
        pre = _by(runs, "pretrain", method)
        if not pre:
            continue
        head = (f"| {pre[0]['label']} | {pre[0]['sparsity']:.0%} | "
                f"{statistics.fmean(r['flops_spent'] for r in pre):.3e} | "
                f"{spread([r['val_loss_after'] for r in pre])} |")
        for mode, label in MODES:
            ft = _by(runs, "finetune", method, mode)
            if not ft:
                continue
            lines.append(f"{head} {label} | {spread([r['val_loss_after'] for r in ft])} | "
                         + " | ".join(spread([downstream(r, n) for r in ft], 2) for n, _ in METRICS)
                         + f" | {len(ft)} |")
            head = "| | | | |"  # the pre-training columns once per method
    return lines


def _sparse_minus_dense(runs: list[dict], method: str) -> list[float]:
    """Per seed: downstream loss after SPSF minus after SPDF of the same pre-trained model."""
    spdf = {r["seed"]: r["val_loss_after"] for r in _by(runs, "finetune", method, "spdf")}
    return [r["val_loss_after"] - spdf[r["seed"]] for r in _by(runs, "finetune", method, "spsf") if r["seed"] in spdf]


def gap_lines(plan: dict, runs: list[dict]) -> list[str]:
    lines = ["| pre-training | pre-train val loss gap | downstream loss gap after SPDF | after SPSF "
             "| SPSF − SPDF (same pre-training) | chrF gap after SPDF | after SPSF | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    loss = lambda r: r["val_loss_after"]  # noqa: E731
    chrf = lambda r: downstream(r, "chrf")  # noqa: E731
    for method in plan["methods"]:
        if method == "dense" or not _by(runs, "pretrain", method):
            continue
        pre = _gap(runs, method, loss, "pretrain", None, None)
        cells = [spread(pre), spread(_gap(runs, method, loss, "finetune", "spdf", "spdf")),
                 spread(_gap(runs, method, loss, "finetune", "spsf", "spdf")),
                 spread(_sparse_minus_dense(runs, method)),
                 spread(_gap(runs, method, chrf, "finetune", "spdf", "spdf"), 2),
                 spread(_gap(runs, method, chrf, "finetune", "spsf", "spdf"), 2)]
        lines.append(f"| {_by(runs, 'pretrain', method)[0]['label']} | " + " | ".join(cells) + f" | {len(pre)} |")
    return lines


def _legend(ax, size: int) -> None:
    if ax.get_legend_handles_labels()[0]:  # a partial replication may have nothing to show yet
        ax.legend(fontsize=size)


def run_lines(runs: list[dict]) -> list[str]:
    lines = ["| run | steps | FLOPs spent | val loss before → after | " + " | ".join(l for _, l in METRICS) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    for r in runs:
        scores = [f"{downstream(r, n):.2f}" for n, _ in METRICS] if r.get("downstream_after") else ["" for _ in METRICS]
        lines.append(f"| {r['id']} | {r['steps']} | {r['flops_spent']:.3e} | {r['val_loss_before']:.3f} → "
                     f"{r['val_loss_after']:.3f} | " + " | ".join(scores) + " |")
    return lines


def plot(plan: dict, runs: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(plan["methods"], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in plan["methods"]:
        for i, r in enumerate(_by(runs, "pretrain", method)):
            points = [p for p in r["val_curve"] if p["step"] > 0]  # step 0 (loss ~ln V) would flatten the rest
            for ax, x in zip(axes, ("tokens", "flops_spent")):
                ax.plot([p[x] for p in points], [p["val_loss"] for p in points], marker=".", color=colors[method],
                        alpha=0.8, label=r["label"] if i == 0 else None)
    for ax, xlabel in zip(axes, ("pre-training tokens", "pre-training FLOPs spent (spdf.flops, analytic)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out validation loss")
        ax.grid(alpha=0.3)
    _legend(axes[0], 8)
    fig.suptitle("Pre-training validation loss, every seed (one line per run)")
    fig.tight_layout()
    curves = out / "replication_loss_curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in plan["methods"]:
        pre = {r["id"]: r for r in _by(runs, "pretrain", method)}
        for mode, label in MODES:
            ft = [r for r in _by(runs, "finetune", method, mode) if r["pretrain_run"] in pre]
            x = [pre[r["pretrain_run"]]["flops_spent"] for r in ft]
            style = dict(color=colors[method], marker="o" if mode == "spdf" else "s", s=36,
                         facecolors=colors[method] if mode == "spdf" else "none",
                         label=f"{pre[ft[0]['pretrain_run']]['label']}, {label}" if ft else None)
            axes[0].scatter(x, [r["val_loss_after"] for r in ft], **style)
            axes[1].scatter(x, [downstream(r, "chrf") for r in ft], **style)
    for ax, ylabel in zip(axes, ("downstream validation loss (lower is better)", "chrF (higher is better)")):
        ax.set_xlabel("pre-training FLOPs spent")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    _legend(axes[0], 7)
    fig.suptitle("Docstring task after fine-tuning vs pre-training compute (one point per run; filled: dense "
                 "fine-tuning, hollow: sparse)")
    fig.tight_layout()
    scatter = out / "replication_downstream_vs_flops.png"
    fig.savefig(scatter, dpi=110)
    plt.close(fig)
    return [curves.name, scatter.name]


def _sessions(plan: dict) -> str:
    done = [s for s in plan.get("sessions", []) if "wall_seconds" in s]
    if not done:
        return ""
    loads = ", ".join(f"{s['load_before']:.1f} → {s['load_after']:.1f}" for s in done)
    return (f"{sum(s['wall_seconds'] for s in done) / 60:.0f} min wall in {len(done)} session(s) on "
            f"{done[-1]['cpu']}, {done[-1]['cpus']} CPUs shared with other jobs (load average {loads}).")


def write_report(raw_dir: Path, out: Path) -> Path:
    plan, runs = load_runs(raw_dir)
    if not runs:
        raise SystemExit(f"no finished runs in {raw_dir}")
    budget = plan["budget"]
    example = next(r for r in runs if r["kind"] == "pretrain")
    tuned = next((r for r in runs if r["kind"] == "finetune" and r.get("downstream_after")), None)
    pngs = plot(plan, runs, out)
    seeds_done = sorted({r["seed"] for r in runs})
    lines = [
        "# The paper's findings in miniature (replicate.py)",
        "",
        f"`{plan['command'].strip()}`: recipes/demo.yaml (tiny GPT, Python standard-library corpus, docstring "
        f"task), every run a real `spdf pretrain` / `spdf finetune --from` in its own process. Pre-training "
        f"{budget['pretrain_steps']} steps ({example['tokens'] * budget['pretrain_steps'] // example['steps']:,} "
        f"tokens) for every method except the FLOP-matched dense run "
        f"({budget['flop_matched_steps']} steps: the most dense steps whose analytic FLOPs do not exceed the static "
        f"75% run's, with its own warm-up and cosine schedule over those steps); fine-tuning "
        f"{budget['finetune_steps']} steps from each pre-training's export, densely (SPDF: masks removed) and, for "
        f"the sparse ones, with the masks kept (SPSF). Seeds {', '.join(map(str, seeds_done))} "
        f"({len(runs)} of {len(plan['runs'])} planned runs finished); {budget['jobs']} runs at a time, "
        f"{budget['threads']} thread(s) each. {_sessions(plan)}",
        "",
        "Mean ± sample standard deviation over seeds. Pre-train val loss: held-out modules at the end of "
        "pre-training. Downstream val loss: the docstring task's validation loss after fine-tuning (completion "
        "tokens only)"
        + (f"; BLEU, ROUGE-L, chrF: the {tuned['downstream_after']['examples']} held-out validation functions' "
           f"docstrings generated ({tuned['downstream_after']['decoding']}) and scored by spdf's evaluation "
           f"(the code of `spdf evaluate`)." if tuned else "."),
        "",
        *table_lines(plan, runs),
        "",
        "## Gaps to dense pre-training (same seed, then mean ± std; positive loss gap = worse than dense; the "
        "dense side is the dense pre-training fine-tuned densely)",
        "",
        *gap_lines(plan, runs),
        "",
        f"Plots: `{pngs[0]}` (validation loss during pre-training vs tokens and vs FLOPs), `{pngs[1]}` "
        "(downstream loss and chrF vs pre-training FLOPs, one point per run). Raw per-run records (command, "
        "losses, validation curve, FLOPs, metrics): `replication/*.json`.",
        "",
        "FLOPs are spdf's analytic training FLOPs as the loop counts them (RigL's dense-gradient steps included); "
        "the masked backend runs dense matmuls on CPU, so wall time does not show the saving.",
        "",
        "## Every run",
        "",
        *run_lines(runs),
    ]
    path = out / "replication.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    print(write_report(args.out / "replication", args.out).read_text())


if __name__ == "__main__":
    main()
