"""The GPU-friendly patterns (issue 20): block-sparse and 2:4 products vs cuBLAS, every implementation side by side.

Called by kernel_speed.py (its "Fast patterns" section of kernels.{json,md,png}); on its own:

    python benchmarks/pattern_speed.py --out DIR          # GPU: GPT-3 XL layer shapes, bf16, 4096/16384 tokens
    python benchmarks/pattern_speed.py --quick --out DIR  # GPU: fc1 only (gpu_check.sh); files rewritten per case
    python benchmarks/pattern_speed.py --tiny --out DIR   # CPU dry run: tiny shapes, fp32; checks the script only

Block patterns (64 and 128, 75%): each product (fwd Y = X W^T, dX = dY W, dW at the kept blocks) by every
implementation of spdf.kernels.block -- spdf's block kernels (autotuned), its general tile kernels, torch's BSR
Triton kernels with launch parameters tuned for this device first (torch.sparse._triton_ops_meta), stanford-stk
(MegaBlocks) -- and `best`, the fastest per product, which is what the block backend should ship
(SPDF_BLOCK_PRODUCTS / spdf.kernels.block.CUDA_DEFAULT). 2:4 (50%): torch's semi-structured forward on a weight
compressed once (the kernel alone), the semi_structured backend's forward+backward (compression every step, dX and
dW dense), and torchao's SemiSparseLinear forward+backward (runtime-pruned, for comparison) where torchao imports.
Ratio = dense time / sparse time; an implementation that cannot run a case is recorded with its reason, not guessed.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch.utils import benchmark

from spdf.kernels import pack
from spdf.kernels.block import PRODUCTS, product, tune_bsr

XL = {"qkv": (6144, 2048), "fc1": (8192, 2048), "fc2": (2048, 8192)}
TINY = {"fc1": (256, 128), "fc2": (128, 256)}
BLOCK_IMPLS = ("block", "tiles", "bsr", "stk")
GOALS = [  # (description, pattern, key, threshold): issue 20's goals at >= 4096 tokens
    ("block-128 forward >= 3x cuBLAS", "block128", "best_fwd_ratio", 3.0),
    ("block-128 fwd+dX+dW >= 2.5x", "block128", "best_step_ratio", 2.5),
    ("block-64 forward >= 2.5x", "block64", "best_fwd_ratio", 2.5),
    ("block-64 fwd+dX+dW >= 2x", "block64", "best_step_ratio", 2.0),
    ("2:4 semi_structured backend fwd+bwd >= 1.2x", "2:4", "semi_layer_step_ratio", 1.2),
]


def time_ms(fn, min_run_time: float) -> float:
    fn()  # warm-up: compilation, autotuning
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def _try(fn, min_run_time):
    """(ms, None) or (None, why it could not run)."""
    try:
        return time_ms(fn, min_run_time), None
    except Exception as e:  # a peer that cannot run a case (dtype, device, block size, not installed) is recorded
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def block_record(shape, block, tokens, device, dtype, gen, min_run_time, impls) -> dict:
    n, k = shape
    blocks = torch.rand(n // block, k // block, generator=gen) >= 0.75
    mask = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)
    w = torch.randn(shape, generator=gen).to(device, dtype)
    layout, values = pack(w, mask.to(device), (block, block))
    wm = w * mask.to(device)
    x = torch.randn(tokens, k, device=device, dtype=dtype)
    dy = torch.randn(tokens, n, device=device, dtype=dtype)
    rec = dict(pattern=f"block{block}", density=round(layout.density, 4), errors={})
    dense = {"fwd": lambda: x @ wm.t(), "dx": lambda: dy @ wm, "dw": lambda: dy.t() @ x}
    args = {"fwd": (x, values, layout), "dx": (dy, values, layout), "dw": (dy, x, layout)}
    for p in PRODUCTS:
        rec[f"dense_{p}_ms"] = time_ms(dense[p], min_run_time)
    for impl in impls:
        if impl == "bsr" and device.type == "cuda":
            try:
                tune_bsr(x, values, layout)  # "tuned BSR": the device's launch parameters for these shapes
            except Exception as e:
                rec["errors"]["bsr_tune"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        for p in PRODUCTS:
            fn = product(p, impl)
            ms, why = _try(lambda fn=fn, a=args[p]: fn(*a), min_run_time)
            rec[f"{impl}_{p}_ms"] = ms
            rec[f"{impl}_{p}_ratio"] = rec[f"dense_{p}_ms"] / ms if ms else None
            if why:
                rec["errors"][f"{impl}_{p}"] = why
    dense_step = sum(rec[f"dense_{p}_ms"] for p in PRODUCTS)
    for impl in impls:
        times = [rec[f"{impl}_{p}_ms"] for p in PRODUCTS]
        rec[f"{impl}_step_ratio"] = dense_step / sum(times) if all(times) else None
    for p in PRODUCTS:
        ran = {impl: rec[f"{impl}_{p}_ms"] for impl in impls if rec[f"{impl}_{p}_ms"]}
        rec[f"best_{p}"] = min(ran, key=ran.get) if ran else None
        rec[f"best_{p}_ratio"] = rec[f"dense_{p}_ms"] / ran[rec[f"best_{p}"]] if ran else None
    best = [rec[f"best_{p}"] and rec[f"{rec[f'best_{p}']}_{p}_ms"] for p in PRODUCTS]
    rec["best_step_ratio"] = dense_step / sum(best) if all(best) else None
    return rec


def semi_record(shape, tokens, device, dtype, gen, min_run_time) -> dict:
    from spdf.sparsity.masks import nm_mask
    from spdf.sparsity.semi_structured import SemiStructuredLinear

    n, k = shape
    rec = dict(pattern="2:4", density=0.5, errors={})
    dense_layer = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    mask = nm_mask(shape, 2, 4, 0, "bench").to(device)
    with torch.no_grad():
        dense_layer.weight.mul_(mask)
    x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, n, device=device, dtype=dtype)

    def fwd_bwd(layer):
        def run():
            layer(x).backward(dy)
        return run

    rec["dense_fwd_ms"] = time_ms(lambda: dense_layer(x), min_run_time)
    rec["dense_step_ms"] = time_ms(fwd_bwd(dense_layer), min_run_time)

    def kernel_only():
        from torch.sparse import to_sparse_semi_structured

        compressed = to_sparse_semi_structured(dense_layer.weight.detach())
        return lambda: torch.nn.functional.linear(x.detach(), compressed)

    def backend_layer():
        layer = SemiStructuredLinear.build(torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype), mask,
                                           False, 0.5)
        layer.apply_mask_()
        layer.optimizer_attached = True  # no optimizer in a product benchmark: nothing to warn about
        return fwd_bwd(layer)

    cases = {"semi_fwd": (kernel_only, "dense_fwd_ms"), "semi_layer_step": (backend_layer, "dense_step_ms"),
             "torchao_step": (lambda: fwd_bwd(_torchao_layer(k, n, device, dtype)), "dense_step_ms")}
    for name, (make, dense_key) in cases.items():
        try:
            fn = make()
            ms, why = _try(fn, min_run_time)
        except Exception as e:
            ms, why = None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        rec[f"{name}_ms"], rec[f"{name}_ratio"] = ms, (rec[dense_key] / ms if ms else None)
        if why:
            rec["errors"][name] = why
    return rec


def _torchao_layer(k, n, device, dtype):
    from torchao.sparsity.training import SemiSparseLinear

    return SemiSparseLinear.from_dense(torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype))


def run(device: torch.device, dtype, shapes: dict, tokens, blocks, min_run_time, impls, log=print,
        on_record=None) -> list[dict]:
    """Every case of the grid; `on_record(records)` after each (a time limit still leaves what was measured)."""
    gen = torch.Generator().manual_seed(0)
    records = []
    on_record = on_record or (lambda records: None)
    for layer, shape in shapes.items():
        for t in tokens:
            base = dict(layer=layer, out=shape[0], inp=shape[1], tokens=t)
            for block in blocks:
                rec = {**base, **block_record(shape, block, t, device, dtype, gen, min_run_time, impls)}
                records.append(rec)
                on_record(records)
                log(f"{layer:4s} block{block:<3d} tokens={t:5d}  " + "  ".join(
                    f"{impl}={_fmt(rec[f'{impl}_step_ratio'])}" for impl in impls)
                    + "  best: " + ", ".join(f"{p}={rec[f'best_{p}']} {_fmt(rec[f'best_{p}_ratio'])}"
                                             for p in PRODUCTS))
            rec = {**base, **semi_record(shape, t, device, dtype, gen, min_run_time)}
            records.append(rec)
            on_record(records)
            log(f"{layer:4s} 2:4      tokens={t:5d}  kernel fwd={_fmt(rec['semi_fwd_ratio'])}  backend fwd+bwd="
                f"{_fmt(rec['semi_layer_step_ratio'])}  torchao fwd+bwd={_fmt(rec['torchao_step_ratio'])}")
    return records


def _fmt(v):
    return "n/a" if v is None else f"{v:.2f}x"


def verdicts(checks, on_gpu: bool) -> list[str]:
    """One line per (description, measured ratios, threshold): worst and median against the threshold."""
    lines = []
    for desc, sel, threshold in checks:
        if not on_gpu:
            lines.append(f"- {desc}: not evaluated (no GPU in this run)")
        elif not sel:
            lines.append(f"- {desc}: no measurement in this grid")
        else:
            worst = min(sel)
            verdict = "PASS" if worst >= threshold else f"FAIL (short by {threshold / worst:.2f}x)"
            lines.append(f"- {desc}: worst {worst:.2f}x, median {sorted(sel)[len(sel) // 2]:.2f}x over "
                         f"{len(sel)} cases -> {verdict}")
    return lines


def goals(records, on_gpu) -> list[str]:
    return verdicts([(desc, [r[key] for r in records if r["pattern"] == pattern and r["tokens"] >= 4096
                             and r.get(key)], threshold) for desc, pattern, key, threshold in GOALS], on_gpu)


def fastest(records) -> dict[str, dict[str, str]]:
    """Per block size: the implementation that was fastest for each product most often (the backend's choice)."""
    out = {}
    for pattern in sorted({r["pattern"] for r in records if r["pattern"].startswith("block")}):
        sel = [r for r in records if r["pattern"] == pattern]
        out[pattern] = {}
        for p in PRODUCTS:
            winners = [r[f"best_{p}"] for r in sel if r[f"best_{p}"]]
            out[pattern][p] = max(set(winners), key=winners.count) if winners else None
    return out


def markdown(records, on_gpu, impls) -> list[str]:
    out = ["## Fast patterns: block-sparse and 2:4 vs dense (issue 20)", ""]
    if not on_gpu:
        out += ["**CPU dry run: tiny shapes, not GPU figures.**", ""]
    out += ["Ratio = dense time / sparse time. Block patterns at 75%: each product by each implementation "
            "(block = spdf's block kernels, tiles = spdf's tile kernels, bsr = torch BSR tuned for this device, "
            "stk = stanford-stk), `best` = the fastest per product. 2:4 at 50%: `kernel fwd` = torch's "
            "semi-structured matmul on a weight compressed once; `backend fwd+bwd` = the semi_structured backend "
            "(compresses each step; dX, dW dense); `torchao fwd+bwd` = torchao's SemiSparseLinear (runtime-pruned). "
            "n/a = could not run (reason in the JSON's `errors`).", "", "### Goals (H100/H200, >= 4096 tokens)",
            *goals(records, on_gpu), "", "### Fastest implementation per product (what the block backend ships)", ""]
    out += [f"- {pattern}: " + ", ".join(f"{p}={impl}" for p, impl in choice.items())
            for pattern, choice in fastest(records).items()]
    out += ["", "| layer | pattern | tokens | " + " | ".join(f"{i} fwd/dX/dW" for i in impls)
            + " | best step | 2:4 kernel fwd | 2:4 backend fwd+bwd | torchao fwd+bwd |",
            "|---" * (7 + len(impls)) + "|"]
    for r in records:
        if r["pattern"] == "2:4":
            cells = ["" for _ in impls] + ["", _fmt(r["semi_fwd_ratio"]), _fmt(r["semi_layer_step_ratio"]),
                                           _fmt(r["torchao_step_ratio"])]
        else:
            cells = ["/".join(_fmt(r[f"{i}_{p}_ratio"]) for p in PRODUCTS) for i in impls] + [
                _fmt(r["best_step_ratio"]), "", "", ""]
        out.append(f"| {r['layer']} {r['out']}x{r['inp']} | {r['pattern']} | {r['tokens']} | " + " | ".join(cells)
                   + " |")
    return out + [""]


def plot(ax, records):
    """Best-step ratio per pattern against tokens (geomean over layers) on a matplotlib axis."""
    tokens = sorted({r["tokens"] for r in records})
    for pattern, key in (("block64", "best_step_ratio"), ("block128", "best_step_ratio"),
                         ("2:4", "semi_layer_step_ratio")):
        ys = []
        for t in tokens:
            xs = [r[key] for r in records if r["pattern"] == pattern and r["tokens"] == t and r.get(key)]
            ys.append(math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan"))
        ax.plot(tokens, ys, marker="o", label=pattern)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_title("fast patterns: fwd+dX+dW vs dense")
    ax.set_xlabel("tokens")
    ax.legend(fontsize=7)


def settings(gpu: bool, tiny: bool, quick: bool = False) -> dict:
    """The grid: tiny on CPU (the interpreter's block kernels only); on a GPU the XL layers (quick: fc1 only, as
    gpu_check.sh runs it within its time limit)."""
    if tiny or not gpu:
        return dict(dtype=torch.float32, shapes=TINY, tokens=(32,), blocks=(64,), min_run_time=0.01,
                    impls=("block",) if _interpreted() else ())
    shapes = {"fc1": XL["fc1"]} if quick else XL
    return dict(dtype=torch.bfloat16, shapes=shapes, tokens=(4096, 16384), blocks=(64, 128),
                min_run_time=0.03 if quick else 0.1, impls=BLOCK_IMPLS)


def _interpreted() -> bool:
    from spdf.kernels.ops import triton_interpreted

    return triton_interpreted()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--tiny", action="store_true", help="CPU dry run (tiny shapes): checks the script only")
    ap.add_argument("--quick", action="store_true", help="GPU: fc1 only (gpu_check.sh's time limit)")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.tiny
    s = settings(gpu, args.tiny, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "pattern_speed" if gpu else "pattern_speed_cpu_dry_run"
    device = torch.device("cuda" if gpu else "cpu")
    meta = dict(device=torch.cuda.get_device_name() if gpu else "cpu", torch=torch.__version__,
                dtype=str(s["dtype"]).replace("torch.", ""), impls=list(s["impls"]))

    def save(records):
        res = dict(gpu_figures=gpu, meta=meta, records=records, fastest=fastest(records), goals=goals(records, gpu))
        (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
        (args.out / f"{stem}.md").write_text("\n".join(markdown(records, gpu, s["impls"])))
        return res

    records = run(device, s["dtype"], s["shapes"], s["tokens"], s["blocks"], s["min_run_time"], s["impls"],
                  on_record=save)
    return save(records)


if __name__ == "__main__":
    main()
