"""Generation speed: spdf's KV cache vs none, greedy vs beam 10, side by side with transformers' own `generate`.

    python benchmarks/generation.py                  # CPU, ~5 minutes on 2 idle cores
    python benchmarks/generation.py --device cuda --bf16 --reps 5

The same random weights run in spdf.GPT and in transformers' GPT2LMHeadModel (GPT.hf_gpt2_state_dict), on the
same prompts (random token ids, mixed lengths), sorted by length and left-padded in batches the same way, with the
same decoding settings: greedy, and the `paper` beam search (10 beams, length penalty 0.8, no 4-gram repeats). No
EOS is set, so every row makes exactly --new-tokens tokens and both libraries do the same amount of work. Variants
run round-robin after a warm-up; the median time of each is reported as new tokens per second. Then the question
of the issue: how long evaluating a few thousand prompts (`paper` decoding, 64 new tokens) takes with the demo's
`tiny` model, measured on --eval-prompts prompts and extrapolated. Writes generation.json and generation.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import spdf
from spdf.eval.generate import DecodingConfig, generate

sys.path.insert(0, str(Path(__file__).parent))
from step_overhead import machine  # noqa: E402  (one description of the machine for every result file)

# Per model shape: prompts, prompt length range, new tokens, whether the no-cache variants run (quadratic cost),
# and timed rounds (tiny's runs take a fraction of a second: more rounds steady the median on a shared machine).
SHAPES = {
    "tiny": dict(prompts=16, lengths=(16, 48), new_tokens=32, uncached=True, reps=7),
    "gpt3-small": dict(prompts=4, lengths=(16, 40), new_tokens=32, uncached=True, reps=2),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--reps", type=int, default=None, help="timed runs per variant after a small warm-up call "
                   "(default: per shape, see SHAPES)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-prompts", type=int, default=64, help="prompts for the 2000-prompt extrapolation (0: skip)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="run everything under bf16 autocast")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p.parse_args()


def hf_twin(model: spdf.GPT):
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(**model.hf_gpt2_config(), bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.load_state_dict(model.hf_gpt2_state_dict())
    return hf.to(next(model.parameters()).device), transformers.__version__


def hf_generate(hf, prompts, config: DecodingConfig, batch_size: int, use_cache: bool) -> list[list[int]]:
    """transformers' generate with spdf's batching: longest prompts first, left padding, results in prompt order."""
    device = next(hf.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.tensor([[0] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk], device=device)
        with torch.inference_mode():
            seqs = hf.generate(ids, attention_mask=mask, max_new_tokens=config.max_new_tokens, do_sample=False,
                               num_beams=config.num_beams, length_penalty=config.length_penalty,
                               no_repeat_ngram_size=config.no_repeat_ngram_size or None,
                               early_stopping=config.early_stopping, use_cache=use_cache, pad_token_id=0)
        for i, row in zip(chunk, seqs):
            out[i] = row[width:].tolist()
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_prompts(n: int, lengths: tuple[int, int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=g).tolist()
    return [torch.randint(1, vocab, (k,), generator=g).tolist() for k in sizes]


def run_variants(variants: dict, reps: int, device, autocast) -> dict:
    """Round-robin timing of `variants` ({name: fn(small: bool) -> outputs}) after a small warm-up call of each;
    returns per variant the median seconds, all times and the outputs of the last run."""
    names = list(variants)
    times = {v: [] for v in names}
    outputs = {}
    with autocast():
        for v in names:
            variants[v](True)
    for rnd in range(reps):
        for v in names[rnd % len(names):] + names[:rnd % len(names)]:
            sync(device)
            t = time.perf_counter()
            with autocast():
                outputs[v] = variants[v](False)
            sync(device)
            times[v].append(time.perf_counter() - t)
        print(f"  round {rnd + 1}/{reps}: " + ", ".join(f"{v} {times[v][-1]:.2f}s" for v in names), flush=True)
    return {v: dict(median_s=statistics.median(times[v]), times_s=times[v], outputs=outputs[v]) for v in names}


def bench_shape(name: str, spec: dict, args, device, autocast) -> dict:
    torch.manual_seed(0)
    model = spdf.GPT.from_name(name).to(device).eval()
    hf, hf_version = hf_twin(model)
    prompts = random_prompts(spec["prompts"], spec["lengths"], model.config.vocab_size)
    n, bs = spec["new_tokens"], args.batch_size
    presets = {"greedy": "greedy", "beam 10": "paper"}

    def variant(library: str, kind: str, use_cache: bool = True):
        def run(small: bool):
            config = DecodingConfig.from_name(presets[kind], max_new_tokens=4 if small else n)
            ps = prompts[:2] if small else prompts
            if library == "spdf":
                return generate(model, ps, config, eos_id=None, batch_size=bs, use_cache=use_cache)
            return hf_generate(hf, ps, config, bs, use_cache)
        return run

    variants = {f"{lib} {kind}": variant(lib, kind) for kind in presets for lib in ("spdf", "transformers")}
    if spec["uncached"]:
        for lib in ("spdf", "transformers"):
            variants[f"{lib} greedy, no cache"] = variant(lib, "greedy", use_cache=False)
    print(f"{name}: {len(prompts)} prompts of {spec['lengths'][0]}-{spec['lengths'][1]} tokens, {n} new tokens, "
          f"batch {bs}", flush=True)
    reps = args.reps or spec["reps"]
    res = run_variants(variants, reps, device, autocast)
    tokens = len(prompts) * n
    for v, r in res.items():
        assert all(len(o) == n for o in r["outputs"]), f"{v}: a row stopped early"
        r["tokens_per_s"] = tokens / r["median_s"]
    for kind in presets:  # same weights, same settings: how many prompts got identical tokens
        a, b = res[f"spdf {kind}"]["outputs"], res[f"transformers {kind}"]["outputs"]
        res[f"spdf {kind}"]["same_tokens_as_transformers"] = sum(x == y for x, y in zip(a, b)) / len(a)
    for r in res.values():
        del r["outputs"]
    return dict(model=name, params=model.num_parameters(), prompts=len(prompts), prompt_lengths=spec["lengths"],
                new_tokens=n, batch_size=bs, reps=reps, transformers=hf_version, variants=res)


def bench_eval_estimate(args, device, autocast) -> dict:
    """The tiny demo model, `paper` decoding, 64 new tokens (no EOS: every prompt runs the full 64, a worst case)."""
    torch.manual_seed(0)
    model = spdf.GPT.from_name("tiny").to(device).eval()
    prompts = random_prompts(args.eval_prompts, (24, 64), model.config.vocab_size, seed=1)
    config = DecodingConfig.from_name("paper")
    out = {}
    for bs in (16, 64):
        generate(model, prompts[:bs], config, eos_id=None, batch_size=bs)  # warm-up
        sync(device)
        t = time.perf_counter()
        with autocast():
            generate(model, prompts, config, eos_id=None, batch_size=bs)
        sync(device)
        s = time.perf_counter() - t
        out[bs] = dict(seconds=s, prompts_per_s=len(prompts) / s, minutes_for_2000=2000 / (len(prompts) / s) / 60)
        print(f"  eval estimate, batch {bs}: {len(prompts)} prompts in {s:.1f}s -> 2000 prompts in "
              f"{out[bs]['minutes_for_2000']:.1f} min", flush=True)
    return dict(model="tiny", prompts=len(prompts), prompt_lengths=(24, 64), decoding="paper (64 new tokens, no EOS)",
                by_batch_size=out)


def write_markdown(path: Path, res: dict) -> None:
    m = res["machine"]
    lines = [
        "# Generation speed (generation.py)",
        "",
        f"spdf.eval.generate vs transformers {res['transformers']} `generate` on the same GPT-2-shaped weights"
        f" (random), {'bf16 autocast' if res['bf16'] else 'fp32'} on {m['device']}; torch {m['torch']}, {m['threads']} threads,"
        f" {m.get('gpu', m['cpu'])}; load average {res['load_before'][0]:.2f} before, {res['load_after'][0]:.2f} after"
        + (f": the machine's {m['cpus']} cores were shared with other jobs while this ran, hence absolute"
           " numbers vary; the spdf/transformers ratios come from interleaved runs."
           if max(res["load_before"][0], res["load_after"][0]) > 1.5 else "."),
        *(["With --threads 1 each process uses one thread: on shared cores two OpenMP threads per process wait on"
           " each other and every timing becomes several times slower and noisier."] if m["threads"] == 1 else []),
        "No EOS: every row generates exactly the stated new tokens in both libraries. Median of the stated number "
        "of round-robin runs after a small warm-up call. beam 10 = the `paper` decoding (length penalty 0.8, no "
        "repeated 4-grams). tokens/s = new tokens returned per second.",
        "",
        f"Command: `{res['command']}`",
        "",
    ]
    for shape in res["shapes"]:
        v = shape["variants"]
        lines += [f"## {shape['model']} ({shape['params'] / 1e6:.1f}M parameters): {shape['prompts']} prompts of "
                  f"{shape['prompt_lengths'][0]}-{shape['prompt_lengths'][1]} tokens, {shape['new_tokens']} new "
                  f"tokens, batch {shape['batch_size']}, median of {shape['reps']} runs", "",
                  "| decoding | spdf tokens/s | transformers tokens/s | spdf speed-up | same tokens as transformers |",
                  "|---|---|---|---|---|"]
        for kind in ("greedy", "beam 10", "greedy, no cache"):
            if f"spdf {kind}" not in v:
                continue
            a, b = v[f"spdf {kind}"], v[f"transformers {kind}"]
            same = a.get("same_tokens_as_transformers")
            lines.append(f"| {kind} | {a['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | "
                         f"{b['median_s'] / a['median_s']:.2f}x | {'' if same is None else f'{same:.0%}'} |")
        if "spdf greedy, no cache" in v:
            lines.append(f"\nKV cache speed-up (spdf greedy): "
                         f"{v['spdf greedy, no cache']['median_s'] / v['spdf greedy']['median_s']:.1f}x; "
                         f"greedy is {v['spdf beam 10']['median_s'] / v['spdf greedy']['median_s']:.1f}x faster than "
                         f"beam 10.")
        lines.append("")
    est = res.get("eval_estimate")
    if est:
        lines += [f"## Evaluating 2000 prompts with the demo's `tiny` model ({est['decoding']})", "",
                  f"Measured on {est['prompts']} prompts of {est['prompt_lengths'][0]}-{est['prompt_lengths'][1]} "
                  "tokens, extrapolated linearly. Random weights never emit EOS, so every prompt runs all 64 steps "
                  "with 10 beams: a worst case (a fine-tuned model stops at EOS and its finished rows leave the "
                  "batch).", "",
                  "| batch size | measured s | prompts/s | minutes for 2000 prompts |", "|---|---|---|---|"]
        for bs, r in est["by_batch_size"].items():
            lines.append(f"| {bs} | {r['seconds']:.1f} | {r['prompts_per_s']:.2f} | {r['minutes_for_2000']:.1f} |")
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    shapes = [bench_shape(name, SHAPES[name], args, device, autocast) for name in args.shapes]
    estimate = bench_eval_estimate(args, device, autocast) if args.eval_prompts else None
    res = dict(machine=machine(device), bf16=args.bf16, transformers=shapes[0]["transformers"],
               command="python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
               load_before=list(load_before), load_after=list(os.getloadavg()), wall_s=time.perf_counter() - t0,
               shapes=shapes, eval_estimate=estimate)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "generation" if device.type == "cpu" else f"generation_{device.type}"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(args.out / f"{stem}.md", res)
    print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
