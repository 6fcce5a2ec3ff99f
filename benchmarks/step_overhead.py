"""Cost of keeping weights sparse in a full training step: spdf's masked path vs torch's two masking approaches.

    python benchmarks/step_overhead.py                          # CPU default, ~3 minutes on 2 idle cores
    python benchmarks/step_overhead.py --device cuda --d-model 2048 --layers 8 --batch 8 --seq 1024 --reps 30

One step = forward, backward, clip_grad_norm_(1.0), AdamW(weight_decay=0.1).step(), zero_grad(), with the fused AdamW
kernel that spdf's training loop uses (`--adamw foreach` for torch's default; it writes step_overhead_foreach.*:
on AVX-512 CPUs torch's vectorised sqrt is ~8x slower on exact zeros, which every sparse variant's AdamW state holds
at masked positions, so foreach AdamW charges sparsity a few percent that fused does not). The same GPT (same
initial weights, same masks, same batch) is trained in four variants side by side in one process:

  dense     no sparsity
  spdf      spdf.sparsify(model, s) + sp.attach(opt): plain dense matmul on a weight with exact zeros; a grad hook
            masks the gradient as it accumulates (mul_ by the uint8 view of the bool mask); AdamW's state is zeroed
            when created, and under AdamW/Adam/SGD a masked gradient provably keeps weights and state zero, so
            nothing is re-zeroed after a step
  spdf-rezero
            spdf as it was before issue 19: the weights re-zeroed after every step as well (what any optimizer
            outside AdamW/Adam/SGD still gets), to show what skipping the provable no-op saves
  prune     torch.nn.utils.prune.custom_from_mask: weight = weight_orig * weight_mask recomputed every forward
  param     parametrize.register_parametrization with torch.ao.pruning's FakeSparsity (mask * weight every forward)
  dense-default, spdf-default
            dense and spdf with torch.optim.AdamW's defaults, as a user's own loop most often has it (on CPU torch
            picks its for-loop implementation; spdf's attach switches an Adam/AdamW left at the defaults to the
            fused kernel, see Sparsifier.attach); spdf-default's paired ratio is given against dense-default

Variants run round-robin (start rotating each round) after a warm-up, so machine noise hits them all alike; the
median and IQR of per-step seconds are reported, with ratios to dense (ratio of medians, and the median of the
per-round paired ratios, which is steadier on a busy machine). After the timed steps the benchmark asserts that
spdf's masked weights and their AdamW state are exactly zero and that the three sparse variants trained alike.
A micro-breakdown then times spdf's per-step extras in isolation, next to cheaper alternatives.
Writes step_overhead.json and step_overhead.md under --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune

import spdf

VARIANTS = ("dense", "spdf", "spdf-rezero", "prune", "param", "dense-default", "spdf-default")
GOAL = 1.02  # spdf step time / dense step time on CPU (issue 19), in spdf's loop and with torch's default AdamW

try:  # what torch.ao.pruning's sparsifiers register on each weight
    from torch.ao.pruning.sparsifier.utils import FakeSparsity

    PARAM_KIND = "torch.ao.pruning.sparsifier.utils.FakeSparsity (float mask * weight)"
except ImportError:  # same arithmetic, for torch builds without torch.ao.pruning
    class FakeSparsity(torch.nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.register_buffer("mask", mask)

        def forward(self, x):
            return self.mask * x

    PARAM_KIND = "local FakeSparsity equivalent (float mask * weight; torch.ao.pruning not importable)"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=None, help="default: d_model // 64")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--reps", type=int, default=12, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--adamw", choices=("fused", "foreach"), default="fused")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(variant: str, cfg: spdf.GPTConfig, init: dict, masks: dict, sparsity: float, device: torch.device,
          adamw: str = "fused"):
    """(model, optimizer, sparsifier or None) for one variant, from the shared initial weights and masks."""
    model = spdf.GPT(cfg)
    model.load_state_dict(init)
    model.to(device).train()
    sp = None
    default_adamw = variant.endswith("-default")
    variant = variant.removesuffix("-default")
    rezero = variant == "spdf-rezero"
    variant = variant.removesuffix("-rezero")
    if variant == "spdf":
        sp = spdf.sparsify(model, sparsity, seed=0)
    elif variant == "prune":
        for name, mask in masks.items():
            prune.custom_from_mask(model.get_submodule(name), "weight", mask.to(device))
    elif variant == "param":
        for name, mask in masks.items():
            module = model.get_submodule(name)
            parametrize.register_parametrization(module, "weight", FakeSparsity(mask.to(device, module.weight.dtype)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, **({} if default_adamw else {adamw: True}))
    if sp is not None:
        sp.attach(opt)
        if rezero:  # treat the optimizer like one whose update rule could move a zero: re-zero after every step
            sp._optimizers[0].zero_preserving = False
    return model, opt, sp


def train_step(model, opt, idx, targets) -> float:
    _, loss = model(idx, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def check_zeros(opt, sp, sparsity: float) -> None:
    """Every masked weight and every AdamW state entry at a masked position is exactly zero; counts exact."""
    for name, layer in sp.layers.items():
        dropped = ~layer.weight_mask
        assert int(dropped.sum()) == round(sparsity * dropped.numel()), name
        assert torch.count_nonzero(layer.weight[dropped]) == 0, f"{name}: masked weights are not zero"
        for key, value in opt.state[layer.weight].items():
            if torch.is_tensor(value) and value.shape == layer.weight.shape:
                assert torch.count_nonzero(value[dropped]) == 0, f"{name}: AdamW {key} not zero at masked entries"


def stats(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return dict(median=statistics.median(xs), q1=q[0], q3=q[2], iqr=q[2] - q[0], min=min(xs), n=len(xs))


def median_ms(fn, device, n: int = 15) -> float:
    fn()
    times = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


@torch.no_grad()
def breakdown(model, opt, sp, device) -> dict:
    """Milliseconds of spdf's per-step extras in isolation (on the trained model's real tensors) and alternatives."""
    layers = list(sp.layers.values())
    weights = [layer.weight for layer in layers]
    bool_masks = [layer.weight_mask for layer in layers]
    float_masks = [m.to(w.dtype) for m, w in zip(bool_masks, weights)]
    keep_not = [~m for m in bool_masks]
    grads = [torch.randn_like(w) * m for w, m in zip(weights, bool_masks)]  # what the hook sees, already sparse-ish
    attached = sp._optimizers[0]
    grad_holders = [torch.zeros_like(w) for w in weights]  # stand-ins carrying a .grad, as the hook receives
    for holder, g in zip(grad_holders, grads):
        holder.grad = g
    pairs = [(w, m) for w, m in zip(weights, bool_masks)]  # every tensor enforce() zeroes, with its mask
    pairs += [(v, m) for w, m in zip(weights, bool_masks) for v in opt.state[w].values()
              if torch.is_tensor(v) and v.shape == w.shape]
    all_t = [t for t, _ in pairs]
    all_bool = [m for _, m in pairs]
    all_float = [m.to(t.dtype) for t, m in pairs]
    all_not = [~m for m in all_bool]
    n_sparse = sum(w.numel() for w in weights)
    n_all = sum(p.numel() for p in model.parameters())

    # context: the dense work every variant does in the same step
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ms = {
        "AdamW.step (whole model, incl. spdf post-hook)": median_ms(opt.step, device, 7),
        "clip_grad_norm_ (whole model)": median_ms(lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0),
                                                   device, 7),
    }
    opt.zero_grad(set_to_none=True)
    ms.update({
        # what spdf does now
        "grad hook as shipped: grad.mul_(uint8 view of mask), all sparse layers": median_ms(
            lambda: [layer._mask_grad(w) for layer, w in zip(layers, grad_holders)], device),
        "post-step work as shipped under AdamW (a version check: nothing to re-zero)": median_ms(
            lambda: sp._keep_zeros(attached, layers), device),
        "weights re-zeroed, mul_(uint8 view) (every step before issue 19)": median_ms(
            lambda: [layer.apply_mask_() for layer in layers], device),
        "full enforce(opt): weights + AdamW state (non-zero-preserving optimizers, every step)": median_ms(
            lambda: sp.enforce(opt), device),
        "  layer walk only (sp.layers)": median_ms(lambda: sp.layers, device),
        # alternatives (what spdf did before: multiply by the bool mask, or foreach over bool masks)
        "alt grad hook: grad.mul_(bool mask)": median_ms(lambda: [g.mul_(m) for g, m in zip(grads, bool_masks)],
                                                         device),
        "alt enforce: _foreach_mul_ weights+state, bool masks": median_ms(
            lambda: torch._foreach_mul_(all_t, all_bool), device),
        # alternatives
        "alt grad hook: grad.mul_(float mask)": median_ms(lambda: [g.mul_(m) for g, m in zip(grads, float_masks)],
                                                          device),
        "alt grad hook: grad.masked_fill_(~mask, 0)": median_ms(
            lambda: [g.masked_fill_(m, 0.0) for g, m in zip(grads, keep_not)], device),
        "alt enforce: _foreach_mul_ weights+state, float masks": median_ms(
            lambda: torch._foreach_mul_(all_t, all_float), device),
        "alt enforce: masked_fill_(~mask, 0) weights+state": median_ms(
            lambda: [t.masked_fill_(m, 0.0) for t, m in zip(all_t, all_not)], device),
        "alt enforce: weights only, _foreach_mul_ bool": median_ms(
            lambda: torch._foreach_mul_(weights, bool_masks), device),
        "alt enforce: weights only, masked_fill_(~mask, 0)": median_ms(
            lambda: [w.masked_fill_(m, 0.0) for w, m in zip(weights, keep_not)], device),
    })
    return dict(ms=ms, sparse_params=n_sparse, all_params=n_all, state_tensors_per_weight=len(pairs) // len(weights) - 1)


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = dict(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
                cpus=os.cpu_count(), cpu=cpu, device=str(device))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_markdown(path: Path, res: dict) -> None:
    s, m = res["shape"], res["machine"]
    lines = [
        "# Training-step overhead of sparsity (step_overhead.py)",
        "",
        f"GPT d_model {s['d_model']}, {s['layers']} layers, {s['heads']} heads, vocab {s['vocab']}, batch {s['batch']}"
        f" x seq {s['seq']} ({s['batch'] * s['seq']} tokens/step), {s['params'] / 1e6:.1f}M params"
        f" ({s['sparse_params'] / 1e6:.1f}M sparsified at {s['sparsity']:.0%}); fp32 on {m['device']}.",
        f"Step: forward, backward, clip_grad_norm_(1.0), AdamW({res['adamw']}, wd 0.1), zero_grad. {res['reps']} timed steps per"
        f" variant after {res['warmup']} warm-up, round-robin. torch {m['torch']}, {m['threads']} threads,"
        f" {m.get('gpu', m['cpu'])}; load average {res['load_before'][0]:.2f} before, {res['load_after'][0]:.2f} after.",
        f"param variant: {res['param_kind']}.",
        "",
        "| variant | median s/step | IQR s | ratio to dense (medians) | paired ratio (median) |",
        "|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        r = res["variants"][v]
        lines.append(f"| {v} | {r['median']:.4f} | {r['iqr']:.4f} | {r['ratio']:.3f}x | {r['paired_ratio']:.3f}x |")
    verdict = res["verdict"]
    lines += [
        "",
        f"A user's own loop with torch.optim.AdamW's defaults (spdf's attach switches that AdamW to the fused "
        f"kernel; the dense one keeps torch's for-loop): spdf-default / dense-default paired "
        f"**{res['variants']['spdf-default']['paired_ratio_same_adamw']:.3f}x**; with fused=True (the README's "
        f"snippet, spdf's loop): spdf / dense paired **{res['variants']['spdf']['paired_ratio']:.3f}x**; "
        f"re-zeroing the weights after every step as before issue 19: spdf-rezero / dense paired "
        f"{res['variants']['spdf-rezero']['paired_ratio']:.3f}x.",
        "",
        f"Goal <= {GOAL:.2f}x dense in both loops: spdf's loop **{'met' if verdict['goal_met'] else 'NOT met'}** "
        f"(paired {res['variants']['spdf']['paired_ratio']:.3f}x), a user's loop with the default AdamW "
        f"**{'met' if verdict['default_goal_met'] else 'NOT met'}** "
        f"({res['variants']['spdf-default']['paired_ratio_same_adamw']:.3f}x); cheaper than prune: "
        f"{verdict['cheaper_than_prune']}, cheaper than parametrization: {verdict['cheaper_than_param']}.",
        f"Checked after timing: spdf masked weights and AdamW state exactly zero; final losses "
        + ", ".join(f"{v} {res['final_loss'][v]:.5f}" for v in VARIANTS) + ".",
        "",
        "## spdf per-step extras in isolation (median ms)",
        "",
        "| operation | ms |",
        "|---|---|",
    ]
    lines += [f"| {k.strip()} | {v:.2f} |" for k, v in res["breakdown"]["ms"].items()]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    heads = args.heads or max(1, args.d_model // 64)
    cfg = spdf.GPTConfig(n_layer=args.layers, n_head=heads, d_model=args.d_model, d_ff=4 * args.d_model,
                         n_ctx=args.seq, vocab_size=args.vocab, name="bench")
    torch.manual_seed(0)
    init = copy.deepcopy(spdf.GPT(cfg).state_dict())
    probe = spdf.GPT(cfg)
    masks = {name: layer.mask.clone() for name, layer in spdf.sparsify(probe, args.sparsity, seed=0).layers.items()}
    del probe
    runs = {v: build(v, cfg, init, masks, args.sparsity, device, args.adamw) for v in VARIANTS}
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen).to(device)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    load_before = os.getloadavg()
    print(f"shape: d_model {args.d_model}, {args.layers} layers, {heads} heads, vocab {args.vocab}, "
          f"batch {args.batch} x seq {args.seq}; {args.reps} reps + {args.warmup} warm-up per variant on {device}; "
          f"load {load_before[0]:.2f}", flush=True)
    times = {v: [] for v in VARIANTS}
    losses = {v: [] for v in VARIANTS}
    t0 = time.perf_counter()
    for rnd in range(args.warmup + args.reps):
        order = VARIANTS[rnd % len(VARIANTS):] + VARIANTS[:rnd % len(VARIANTS)]
        for v in order:
            model, opt, _ = runs[v]
            sync(device)
            t = time.perf_counter()
            loss = train_step(model, opt, x, y)
            sync(device)
            if rnd >= args.warmup:
                times[v].append(time.perf_counter() - t)
            losses[v].append(float(loss))
        done = ", ".join(f"{v} {times[v][-1]:.3f}s" for v in VARIANTS) if rnd >= args.warmup else "warm-up"
        print(f"  round {rnd + 1}/{args.warmup + args.reps}: {done}", flush=True)
    load_after = os.getloadavg()

    # The thing timed must still work: spdf's masked weights and their AdamW state are exactly zero ...
    for v in ("spdf", "spdf-rezero", "spdf-default"):
        check_zeros(*runs[v][1:], args.sparsity)
    model, opt, sp = runs["spdf"]
    # ... and the sparse variants trained the same model (same masks, same data; fp rounding aside).
    assert losses["spdf"] == losses["spdf-rezero"], "skipping the weights' re-zero changed the training"
    for v in ("prune", "param", "spdf-default"):
        diff = max(abs(a - b) for a, b in zip(losses["spdf"], losses[v]))
        assert diff < 1e-3, f"spdf and {v} losses diverged by {diff}"

    dense = stats(times["dense"])
    results = {}
    for v in VARIANTS:
        r = stats(times[v])
        r["ratio"] = r["median"] / dense["median"]
        r["paired_ratio"] = statistics.median(a / b for a, b in zip(times[v], times["dense"]))
        r["times"] = times[v]
        results[v] = r
    results["spdf-default"]["paired_ratio_same_adamw"] = statistics.median(
        a / b for a, b in zip(times["spdf-default"], times["dense-default"]))
    spdf_r = results["spdf"]
    verdict = dict(goal=GOAL, goal_met=spdf_r["paired_ratio"] <= GOAL,
                   default_goal_met=results["spdf-default"]["paired_ratio_same_adamw"] <= GOAL,
                   cheaper_than_prune=spdf_r["median"] < results["prune"]["median"],
                   cheaper_than_param=spdf_r["median"] < results["param"]["median"])
    bd = breakdown(model, opt, sp, device)
    res = dict(
        machine=machine(device),
        shape=dict(d_model=args.d_model, layers=args.layers, heads=heads, vocab=args.vocab, batch=args.batch,
                   seq=args.seq, sparsity=args.sparsity, params=bd["all_params"], sparse_params=bd["sparse_params"],
                   dtype="float32"),
        reps=args.reps, warmup=args.warmup, adamw=args.adamw, param_kind=PARAM_KIND, load_before=list(load_before),
        load_after=list(load_after), wall_s=time.perf_counter() - t0, variants=results, verdict=verdict,
        final_loss={v: losses[v][-1] for v in VARIANTS}, breakdown=bd,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "step_overhead" if args.adamw == "fused" else f"step_overhead_{args.adamw}"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(args.out / f"{stem}.md", res)

    print(f"\n{'variant':13} {'median s':>9} {'IQR s':>8} {'ratio':>7} {'paired':>7}")
    for v in VARIANTS:
        r = results[v]
        print(f"{v:13} {r['median']:9.4f} {r['iqr']:8.4f} {r['ratio']:6.3f}x {r['paired_ratio']:6.3f}x")
    print(f"spdf-default / dense-default paired: {results['spdf-default']['paired_ratio_same_adamw']:.3f}x")
    print(f"param = {PARAM_KIND}")
    print(f"spdf goal <= {GOAL}x: {'met' if verdict['goal_met'] else 'NOT met'}, default AdamW: "
          f"{'met' if verdict['default_goal_met'] else 'NOT met'}; cheaper than prune: "
          f"{verdict['cheaper_than_prune']}, than param: {verdict['cheaper_than_param']}")
    print(f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}; masked weights/state verified zero")
    print("\nspdf extras in isolation (median ms):")
    for k, v in bd["ms"].items():
        print(f"  {k:70} {v:8.2f}")
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
