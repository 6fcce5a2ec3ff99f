"""Speed of the tiled sparse products vs dense GEMM and peers (torch.sparse CSR/BSR, torch-sparse) on GPT-3 shapes.

    python benchmarks/kernel_speed.py --out benchmarks/results          # GPU: full grid, bf16, Triton kernels
    python benchmarks/kernel_speed.py --out benchmarks/results --quick  # CPU: reduced grid, fp32, reference backend

On CUDA it writes kernels.{json,md,png}; without a GPU it says so and writes kernels_cpu.{json,md,png} (the CPU
reference backend vs dense torch.matmul). On CUDA (or with --patterns) it adds the fast patterns of issue 20 from
pattern_speed.py: block-64/128 products by spdf's block and tile kernels, tuned torch BSR and stanford-stk, and 2:4
(torch semi-structured, the semi_structured backend, torchao); --patterns-only measures just those. Ratios are dense time / sparse time (higher = faster than dense),
measured side by side in one run with torch.utils.benchmark (warm-up, blocked autorange, CUDA synchronisation).
The peers' forward products come from peers.py; torch-sparse is measured only when the `[peers]` extra is installed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
from pathlib import Path

import torch
from torch.utils import benchmark

import pattern_speed  # benchmarks/pattern_speed.py
from peers import TORCH_SPARSE_SKIP, peer_fns, torch_sparse  # benchmarks/peers.py: this script's folder is on sys.path
from spdf.kernels import HAS_TRITON, pack, sddmm, spmm, spmm_t

SHAPES = {  # (out, in) of each linear layer; nn.Linear orientation
    "small": {"qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)},
    "xl": {"qkv": (6144, 2048), "proj": (2048, 2048), "fc1": (8192, 2048), "fc2": (2048, 8192)},
}
GPU_GRID = dict(models=("small", "xl"), tokens=(16, 64, 512, 4096, 16384), sparsity=(0.5, 0.75, 0.9),
                patterns=("unstructured", "block64"), dtype=torch.bfloat16)
CPU_GRID = dict(models=("small", "xl"), tokens=(64, 2048), sparsity=(0.5, 0.75, 0.9),
                patterns=("unstructured", "block64"), dtype=torch.float32)
PRODUCTS = ("spmm", "spmm_t", "sddmm")
PEERS = ("csr", "bsr", "torch_sparse")  # forward products of other libraries (peers.py), vs the dense forward
TARGETS = [  # (description, predicate over a record, product, threshold on the ratio)
    ("block-sparse 75%, tokens >= 4096: forward >= 2.5x cuBLAS",
     lambda r: r["pattern"] == "block64" and r["sparsity"] == 0.75 and r["tokens"] >= 4096, "spmm", 2.5),
    ("unstructured 75%, tokens <= 64: forward >= 1.5x cuBLAS",
     lambda r: r["pattern"] == "unstructured" and r["sparsity"] == 0.75 and r["tokens"] <= 64, "spmm", 1.5),
    ("unstructured, training shapes (tokens >= 4096): fwd+bwd no more than 10% slower",
     lambda r: r["pattern"] == "unstructured" and r["tokens"] >= 4096, "step", 0.9),
]


def make_mask(shape, sparsity, pattern, gen):
    n, k = shape
    if pattern == "unstructured":
        return torch.rand(n, k, generator=gen) >= sparsity
    blocks = torch.rand(math.ceil(n / 64), math.ceil(k / 64), generator=gen) >= sparsity
    return blocks.repeat_interleave(64, 0).repeat_interleave(64, 1)[:n, :k]


def time_ms(fn, min_run_time) -> float:
    fn()  # warm-up (and Triton compilation)
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def run(grid, device, min_run_time, log):
    gen = torch.Generator().manual_seed(0)
    dtype, records = grid["dtype"], []
    for model in grid["models"]:
        for layer, shape in SHAPES[model].items():
            w = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
            for pattern in grid["patterns"]:
                for sparsity in grid["sparsity"]:
                    mask = make_mask(shape, sparsity, pattern, gen).to(device)
                    layout, values = pack(w, mask, (64, 64))
                    wm = w * mask
                    for tokens in grid["tokens"]:
                        x = torch.randn(tokens, shape[1], device=device, dtype=dtype)
                        dy = torch.randn(tokens, shape[0], device=device, dtype=dtype)
                        dense = {"spmm": lambda: x @ wm.t(), "spmm_t": lambda: dy @ wm, "sddmm": lambda: dy.t() @ x}
                        sparse = {"spmm": lambda: spmm(x, values, layout), "spmm_t": lambda: spmm_t(dy, values, layout),
                                  "sddmm": lambda: sddmm(dy, x, layout)}
                        rec = dict(model=model, layer=layer, out=shape[0], inp=shape[1], pattern=pattern,
                                   sparsity=sparsity, density=round(layout.density, 4), tokens=tokens,
                                   tiles=layout.n_nonempty_tiles)
                        for p in PRODUCTS:
                            rec[f"{p}_dense_ms"] = time_ms(dense[p], min_run_time)
                            rec[f"{p}_ms"] = time_ms(sparse[p], min_run_time)
                            rec[f"{p}_ratio"] = rec[f"{p}_dense_ms"] / rec[f"{p}_ms"]
                        rec["step_ratio"] = (sum(rec[f"{p}_dense_ms"] for p in PRODUCTS)
                                             / sum(rec[f"{p}_ms"] for p in PRODUCTS))
                        for name, fn in peer_fns(w, mask, x).items():
                            rec[f"{name}_ms"] = time_ms(fn, min_run_time) if fn else None
                            rec[f"{name}_ratio"] = rec["spmm_dense_ms"] / rec[f"{name}_ms"] if fn else None
                        records.append(rec)
                        log(f"{model:5s} {layer:4s} {pattern:12s} s={sparsity:.2f} tokens={tokens:5d}  "
                            + "  ".join(f"{p}={rec[f'{p}_ratio']:.2f}x" for p in PRODUCTS)
                            + f"  step={rec['step_ratio']:.2f}x  "
                            + "  ".join(f"{p}={_fmt(rec[f'{p}_ratio'])}" for p in PEERS))
    return records


def _fmt(v):
    return "n/a" if v is None else f"{v:.2f}x"


def check_targets(records, on_gpu):
    return pattern_speed.verdicts([(desc, [r[f"{product}_ratio"] for r in records if pred(r)], threshold)
                                   for desc, pred, product, threshold in TARGETS], on_gpu)


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def write_markdown(records, meta, targets, path, patterns=None):
    tokens = sorted({r["tokens"] for r in records})
    out = [f"# Kernel benchmark ({meta['backend']})", "", f"Device: {meta['device']}. Dtype: {meta['dtype']}. "
           f"torch {meta['torch']}, triton available: {meta['has_triton']}, torch-sparse: {meta['torch_sparse']}.", "",
           f"Load average (1/5/15 min) on {meta['cpu_count']} CPUs: {_load(meta['load_before'])} before, "
           f"{_load(meta['load_after'])} after."]
    if max(meta["load_before"][0], meta["load_after"][0]) > meta["cpu_count"]:
        out += ["**Busy machine:** other processes competed for the CPUs during this run, so absolute times are "
                "inflated and noisy; the ratios, measured side by side in one run, are still meaningful."]
    out += [""]
    if not meta["gpu"]:
        out += ["**No GPU in this run.** Measured: the CPU *reference* backend (`spdf.kernels.reference`, "
                "unpack-then-dense) vs dense `torch.matmul`, fp32, reduced grid. These files are "
                "`kernels_cpu.*`; the GPU run (`python benchmarks/kernel_speed.py --out benchmarks/results` on a CUDA "
                "machine) writes `kernels.*` with the Triton kernels in bf16.", ""]
    out += ["Ratio = dense time / sparse time (higher = faster than dense), both timed side by side in one run. "
            "`step` = (fwd + dX + dW dense) / (fwd + dX + dW sparse). Peers, forward (Y = X W^T) vs dense: "
            "csr/bsr = torch.sparse with W as CSR / 64x64 BSR; torch_sparse = PyG's torch-sparse with W as a "
            "`SparseTensor`, computed as (W X^T)^T (the transposes are in its time, <1% of it). n/a = the peer "
            "did not run that case (not installed, or the dtype/layout/device is unsupported).", "",
            "## Targets (H100/H200)", *targets, ""]
    out += peer_summary(records, tokens)
    for product in (*PRODUCTS, "step", *PEERS):
        if all(r.get(f"{product}_ratio") is None for r in records):
            continue
        out += [f"## {product} ratio", "", "| model | layer | pattern | sparsity | " + " | ".join(
            f"{t} tok" for t in tokens) + " |", "|---" * (4 + len(tokens)) + "|"]
        keys = sorted({(r["model"], r["layer"], r["pattern"], r["sparsity"]) for r in records},
                      key=lambda k: (k[0], k[1], k[2], k[3]))
        for key in keys:
            row = {r["tokens"]: r.get(f"{product}_ratio") for r in records
                   if (r["model"], r["layer"], r["pattern"], r["sparsity"]) == key}
            out.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(_fmt(row.get(t)) for t in tokens) + " |")
        out.append("")
    if patterns is not None:
        out += pattern_speed.markdown(patterns, meta["gpu"], meta["pattern_impls"])
    path.write_text("\n".join(out))


def _load(avg):
    return "/".join(f"{x:.2f}" for x in avg)


def peer_summary(records, tokens):
    """Forward ratios of spdf and every peer on unstructured masks, geomean over each model's layers."""
    impls = ("spmm", *PEERS)
    out = ["## Forward vs dense: spdf and its peers (unstructured, geomean over layers)", "",
           "| model | sparsity | tokens | " + " | ".join(impls) + " |", "|---" * (3 + len(impls)) + "|"]
    for model in sorted({r["model"] for r in records}):
        for sparsity in sorted({r["sparsity"] for r in records}):
            for t in tokens:
                sel = [r for r in records if (r["model"], r["sparsity"], r["tokens"], r["pattern"])
                       == (model, sparsity, t, "unstructured")]
                if sel:
                    out.append(f"| {model} | {sparsity} | {t} | " + " | ".join(
                        _fmt(geomean([r[f"{i}_ratio"] for r in sel]) if any(r[f"{i}_ratio"] for r in sel) else None)
                        for i in impls) + " |")
    return out + [""]


def write_plot(records, meta, path, patterns=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = sorted({r["tokens"] for r in records})
    fig, axes = plt.subplots(1, 6 if patterns else 5, figsize=(26 if patterns else 22, 4.2), sharey=True)
    if patterns:
        pattern_speed.plot(axes[-1], patterns)
        axes = axes[:-1]
    for ax, product in zip(axes, ("spmm", "spmm_t", "sddmm", "step")):
        for pattern in sorted({r["pattern"] for r in records}):
            for sparsity in sorted({r["sparsity"] for r in records}):
                ys = [geomean([r[f"{product}_ratio"] for r in records if r["tokens"] == t
                               and r["pattern"] == pattern and r["sparsity"] == sparsity]) for t in tokens]
                ax.plot(tokens, ys, marker="o", ls="-" if pattern == "unstructured" else "--",
                        label=f"{pattern} {int(sparsity * 100)}%")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{product} (geomean over layers)")
        ax.set_xlabel("tokens")
    peers_ax = axes[-1]  # the forward of spdf and of each peer that ran, on the paper's sparsity
    for impl in ("spmm", *PEERS):
        ys = [geomean([r[f"{impl}_ratio"] for r in records if r["tokens"] == t and r["pattern"] == "unstructured"
                       and r["sparsity"] == 0.75]) for t in tokens]
        if not all(math.isnan(y) for y in ys):
            peers_ax.plot(tokens, ys, marker="s", label="spdf spmm" if impl == "spmm" else impl)
    peers_ax.axhline(1.0, color="k", lw=0.8)
    peers_ax.set_xscale("log", base=2)
    peers_ax.set_title("forward: spdf vs peers (unstructured 75%)")
    peers_ax.set_xlabel("tokens")
    peers_ax.legend(fontsize=7)
    axes[0].set_ylabel("speed-up vs dense (higher is better)")
    axes[-2].legend(fontsize=7)
    fig.suptitle(f"spdf tiled sparse kernels, {meta['backend']}, {meta['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for the result files")
    ap.add_argument("--quick", action="store_true", help="reduced grid and shorter timing (the CPU default)")
    ap.add_argument("--cpu", action="store_true", help="measure on CPU even when a GPU is present")
    ap.add_argument("--patterns", action="store_true", help="add the fast patterns (the default on a GPU)")
    ap.add_argument("--patterns-only", action="store_true", help="measure only the fast patterns (pattern_speed.py)")
    ap.add_argument("--no-patterns", action="store_true", help="leave the fast patterns out (gpu_check.sh runs them "
                    "as their own part, pattern_speed.py)")
    args = ap.parse_args(argv)

    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    if gpu and not HAS_TRITON:
        print("WARNING: CUDA present but triton is not installed: measuring the reference backend")
    if not gpu:
        print("NO GPU: measuring the CPU reference backend vs dense torch.matmul (fp32, reduced grid); "
              "the GPU targets are not evaluated.")
        torch.set_num_threads(max(1, torch.get_num_threads()))
    if torch_sparse is None:
        print(f"torch_sparse: {TORCH_SPARSE_SKIP}")
    grid = dict(GPU_GRID) if gpu else dict(CPU_GRID)
    if args.quick and gpu:
        grid.update(models=("small",), tokens=(16, 4096), sparsity=(0.75,))
    min_run_time = 0.02 if (args.quick or not gpu) else 0.1
    meta = dict(gpu=gpu, device=torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or 'cpu'}, "
                f"{torch.get_num_threads()} threads)", dtype=str(grid["dtype"]).replace("torch.", ""),
                backend="Triton kernels" if gpu and HAS_TRITON else "reference backend", torch=torch.__version__,
                has_triton=HAS_TRITON, grid={k: list(v) if isinstance(v, tuple) else str(v) for k, v in grid.items()},
                torch_sparse=torch_sparse.__version__ if torch_sparse else TORCH_SPARSE_SKIP,
                cpu_count=os.cpu_count(), load_before=os.getloadavg())
    records = [] if args.patterns_only else run(grid, device, min_run_time, print)
    patterns = None
    if (gpu and not args.no_patterns) or args.patterns or args.patterns_only:
        ps = pattern_speed.settings(gpu, tiny=not gpu, quick=args.quick)
        meta["pattern_impls"] = list(ps["impls"])
        patterns = pattern_speed.run(device, ps["dtype"], ps["shapes"], ps["tokens"], ps["blocks"],
                                     ps["min_run_time"], ps["impls"])
    meta["load_after"] = os.getloadavg()
    targets = check_targets(records, gpu)
    print("\n".join(["Targets (H100/H200):", *targets]))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "kernels" if gpu else ("kernels_cpu_patterns" if args.patterns_only else "kernels_cpu")
    extra = {} if patterns is None else dict(patterns=patterns, pattern_fastest=pattern_speed.fastest(patterns),
                                             pattern_goals=pattern_speed.goals(patterns, gpu))
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, targets=targets, records=records, **extra),
                                                 indent=1))
    write_markdown(records, meta, targets, out / f"{stem}.md", patterns)
    write_plot(records, meta, out / f"{stem}.png", patterns)
    print(f"wrote {out / stem}.json/.md/.png")


if __name__ == "__main__":
    main()
