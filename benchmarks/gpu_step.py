"""One GPU training step, dense vs each sparse backend: time, tokens/s, allocator memory, exact zeros (issues 19, 20).

    python benchmarks/gpu_step.py                       # on a CUDA machine: ~2 minutes on an H200
    python benchmarks/gpu_step.py --profile             # + gpu_step_profile.md: top operations of 3 steps each
    python benchmarks/gpu_step.py --tiny --out DIR      # CPU smoke test of the script itself (not GPU figures)

GPT-3 XL width with 8 layers (d_model 2048, d_ff 8192, 16 heads, context 1024, vocabulary 50304), 75% random masks
on the paper's layers (the block backend: 75% of 128x128 blocks, --block-size; semi_structured: 2:4, 50%), bf16 autocast over fp32 weights, fused AdamW (lr 1e-4, weight decay 0.1), gradient clipping at
1.0. Each backend builds one model on the device and trains it at batch 1 x 1024 and then 8 x 1024 tokens: warm-up
steps (Triton autotuning included), then timed steps, each synchronised; the median is reported. Memory is the CUDA
caching allocator's: `memory_allocated` after a step and `zero_grad(set_to_none=True)` (weights, AdamW moments,
masks or tile indices), and `max_memory_allocated` over the timed steps (activations included), both above what was
allocated before the model was built. At the end every masked weight and every AdamW moment at a masked position
must be exactly zero (backends storing a dense weight: masked, semi_structured) and the compressed and block layers
must store exactly the kept entries. A backend this device cannot run (semi_structured on CPU) is recorded as
refused, with the reason, and measured nothing.
Results are written after every backend (a time limit still leaves what was measured) to gpu_step.{json,md}.

On CPU (--tiny, or no CUDA) the same code runs on a tiny model in fp32 with the process's live tensors (a gc walk)
in place of the allocator figures; the files then say in their title that these are not GPU figures.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from memory import live_bytes, live_storages  # benchmarks/memory.py: process-level memory on CPU
from step_overhead import machine  # one description of the machine for every result file

import spdf
from spdf.flops import analytic_flops
from spdf.sparsity import sparse_layers

XL8 = dict(n_layer=8, n_head=16, d_model=2048, d_ff=8192, n_ctx=1024, vocab_size=50304)
TINY = dict(n_layer=2, n_head=2, d_model=128, d_ff=512, n_ctx=64, vocab_size=256)  # 2 blocks of 64 wide
BACKENDS = ("dense", "masked", "compressed", "block", "semi_structured")
SPARSITY = 0.75
LEVEL = {"semi_structured": 0.5}  # 2:4 keeps half
GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script, measures nothing")
    p.add_argument("--device", default=None, help="default: cuda if available (and not --tiny), else cpu")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 8; --tiny: 1 2)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--block-size", type=int, default=None, help="the block backend's blocks (default 128; --tiny 64)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per batch size (default 5; --tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per batch size (default 20; --tiny 2)")
    p.add_argument("--profile", action="store_true",
                   help="also profile 3 steps per backend at the first batch size (torch.profiler): the top operations "
                        "by self time go to gpu_step_profile.md, to see where a backend's time goes")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    args.shape = TINY if args.tiny else XL8
    args.batches = args.batches or ([1, 2] if args.tiny else [1, 8])
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 20)
    args.gpu = args.device.type == "cuda"
    args.block_size = args.block_size or (64 if args.tiny else 128)
    return args


def mask_init(backend: str, args, masks: dict):
    """The masks a backend trains: the block and 2:4 patterns for their backends, else the shared random masks."""
    if backend == "block":
        return spdf.sparsity.Block(args.block_size)
    if backend == "semi_structured":
        return spdf.sparsity.NM(2, 4)
    return masks or "random"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device, baseline) -> int:
    """Bytes held now above `baseline`: the CUDA allocator's count, or the process's live tensors on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) - baseline
    return live_bytes(baseline)


def step(model, opt, idx, targets, amp_dtype) -> None:
    with torch.autocast(idx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        _, loss = model(idx, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def check_zeros(model, opt, backend: str) -> str:
    """What was verified at the end (raises if an invariant does not hold)."""
    layers = sparse_layers(model)
    level = LEVEL.get(backend, SPARSITY)
    dense_weight = backend in ("masked", "semi_structured")
    for name, layer in layers.items():
        if dense_weight:
            dropped = ~layer.weight_mask
            assert int(dropped.sum()) == round(level * dropped.numel()), name
            assert torch.count_nonzero(layer.weight.detach()[dropped]) == 0, f"{name}: a masked weight is non-zero"
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.count_nonzero(opt.state[layer.weight][key][dropped]) == 0, f"{name}: {key} non-zero"
        else:
            tile = layer.tile[0] * layer.tile[1] if backend == "block" else 1  # blocks are counted whole
            units = layer.mask.numel() // tile
            assert layer.nnz == int(layer.mask.sum()) == (units - round(level * units)) * tile, name
    if dense_weight:
        return f"{len(layers)} {backend} weights and their AdamW moments exactly zero at every masked position"
    return f"{len(layers)} {backend} layers store exactly their kept entries (no masked entry exists)"


def run_backend(backend: str, args, cfg: spdf.GPTConfig, masks: dict) -> dict:
    """Build, train and measure one backend. `masks` ({parameter name: bool mask} on the CPU) is filled by the first
    sparse backend and reused by the next: the same masks, and the random masks of 32 XL-width layers made once."""
    device, gpu = args.device, args.gpu
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = live_storages()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with device:
        model = spdf.GPT(cfg)
    sp = None
    if backend != "dense":
        sp = spdf.sparsify(model, LEVEL.get(backend, SPARSITY), seed=0, backend=backend,
                           init=mask_init(backend, args, masks))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    if sp is not None:
        try:
            sp.attach(opt)
        except ValueError as e:  # a backend this device cannot run: said, not measured
            del model, opt, sp
            return dict(backend=backend, refused=str(e), batches={})
    out = dict(backend=backend, build_s=time.perf_counter() - t0, after_build=allocated(device, baseline), batches={})
    amp_dtype = torch.bfloat16 if gpu else None
    gen = torch.Generator().manual_seed(1)
    for batch in args.batches:
        idx = torch.randint(0, cfg.vocab_size, (batch, cfg.n_ctx + 1), generator=gen).to(device)
        x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step(model, opt, x, y, amp_dtype)
        sync(device)
        warm_s = time.perf_counter() - t0
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.steps):
            sync(device)
            t = time.perf_counter()
            step(model, opt, x, y, amp_dtype)
            sync(device)
            times.append(time.perf_counter() - t)
        median = statistics.median(times)
        out["batches"][str(batch)] = dict(
            tokens=batch * cfg.n_ctx, ms=median * 1e3, min_ms=min(times) * 1e3, tokens_per_s=batch * cfg.n_ctx / median,
            after_step=allocated(device, baseline),
            peak=(torch.cuda.max_memory_allocated(device) - baseline) if gpu else None, warmup_s=warm_s)
        print(f"  {backend:10s} batch {batch} x {cfg.n_ctx}: {median * 1e3:8.1f} ms/step, "
              f"{out['batches'][str(batch)]['after_step'] / GIB:.2f} GiB after a step", flush=True)
    out["checked"] = check_zeros(model, opt, backend) if backend != "dense" else "no sparse layer"
    if args.profile:
        out["profile"] = profile(model, opt, args, cfg, amp_dtype)
    if sp is not None and not masks and backend in ("masked", "compressed"):  # the random masks, for the next one
        masks.update({name: mask.cpu() for name, mask in sp.masks().items()})
    del model, opt, sp
    return out


def profile(model, opt, args, cfg, amp_dtype) -> str:
    """The 25 operations with the most self time over 3 profiled steps at the first batch size (a table)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    idx = torch.randint(0, cfg.vocab_size, (args.batches[0], cfg.n_ctx + 1)).to(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.gpu else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step(model, opt, idx[:, :-1], idx[:, 1:], amp_dtype)
        sync(args.device)
    key = "self_cuda_time_total" if args.gpu else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=25)


def write(args, cfg, res: dict, profiles: dict[str, str]) -> None:
    gpu, shape = args.gpu, args.shape
    not_gpu = "" if gpu else " -- CPU SMOKE RUN, NOT GPU FIGURES"
    flops = analytic_flops(cfg, SPARSITY)
    m = res["machine"]
    lines = [f"# One training step on a GPU: dense vs each sparse backend (gpu_step.py){not_gpu}", ""]
    if not gpu:
        lines += ["**These numbers come from a CPU smoke run of the script (`--tiny` or no CUDA): a tiny model in fp32, "
                  "process live tensors instead of the CUDA allocator. They say nothing about GPUs.**", ""]
    lines += [
        f"GPT {', '.join(f'{k} {v}' for k, v in shape.items())}; {SPARSITY:.0%} random masks on the paper's layers; "
        f"{'bf16 autocast, ' if gpu else 'fp32, '}fused AdamW (wd 0.1), clip 1.0; {args.warmup} warm-up + "
        f"{args.steps} timed steps per batch size, median. {m.get('gpu', m['cpu'])}, torch {m['torch']}"
        f"{', triton ' + res['triton'] if res.get('triton') else ''}.",
        f"FLOPs per token on paper (analytic, {flops.seq_len}-token context): dense {flops.dense_train / 1e9:.3g} "
        f"GFLOP; the masked backend computes the same dense products (its zeros are multiplied); the compressed "
        f"and block backends compute only kept products, {flops.sparse_train / 1e9:.3g} GFLOP "
        f"({flops.reduction:.2f}x fewer; block: {args.block_size}x{args.block_size} blocks); semi_structured "
        f"(2:4, 50%) computes its forward on the sparse tensor cores, dX and dW densely.",
        "", f"| backend | batch | ms/step | vs dense | tokens/s | {'allocator' if gpu else 'live'} GiB after a step "
        f"| vs dense | peak GiB |", "|---|---|---|---|---|---|---|---|"]
    dense = res["backends"].get("dense")
    for r in res["backends"].values():
        if "refused" in r:
            lines.append(f"| {r['backend']} | refused on this device: {r['refused']} |||||||")
        for batch, b in r["batches"].items():
            d = dense["batches"].get(batch) if dense else None
            ratio = lambda key: f"{b[key] / d[key]:.2f}x" if d else "-"  # noqa: E731
            peak = f"{b['peak'] / GIB:.2f}" if b["peak"] is not None else "n/a (CPU)"
            lines.append(f"| {r['backend']} | {batch} x {shape['n_ctx']} | {b['ms']:.1f} | {ratio('ms')} | "
                         f"{b['tokens_per_s']:,.0f} | {b['after_step'] / GIB:.3f} | {ratio('after_step')} | {peak} |")
    lines += [""] + [f"- {r['backend']}: {r['checked']}" for r in res["backends"].values() if "checked" in r]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_step.json").write_text(json.dumps(res, indent=1) + "\n")
    if profiles:
        text = [f"# Where a step's time goes (gpu_step.py --profile{not_gpu})", "",
                f"3 steps at batch {args.batches[0]} x {shape['n_ctx']}, top operations by self time.", ""]
        for name, table in profiles.items():
            text += [f"## {name}", "", "```", table, "```", ""]
        (args.out / "gpu_step_profile.md").write_text("\n".join(text))
    (args.out / "gpu_step.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = spdf.GPTConfig(name="gpu-step", **args.shape)
    res = dict(gpu_figures=args.gpu, machine=machine(args.device), shape=args.shape, sparsity=SPARSITY,
               autocast="bf16" if args.gpu else None, warmup=args.warmup, steps=args.steps,
               block_size=args.block_size, backends={})
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        pass
    profiles: dict[str, str] = {}
    masks: dict[str, torch.Tensor] = {}
    if not args.gpu:
        print("CPU run: these are NOT GPU figures (tiny model, fp32, process live tensors)", flush=True)
    for backend in args.backends:
        res["backends"][backend] = run_backend(backend, args, cfg, masks)
        if "profile" in res["backends"][backend]:
            profiles[backend] = res["backends"][backend].pop("profile")
        write(args, cfg, res, profiles)
    print((args.out / "gpu_step.md").read_text())
    return res


if __name__ == "__main__":
    main()
