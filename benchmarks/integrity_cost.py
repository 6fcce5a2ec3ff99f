"""Cost of the integrity checks a run makes, each beside the work it guards, in one run:

    OMP_NUM_THREADS=1 python benchmarks/integrity_cost.py                 # 6-layer GPT-3 Small shape, 512 MB cache
    python benchmarks/integrity_cost.py --layers 12 --cache-mb 2048 --reps 5 --out benchmarks/results

- the finiteness check of weights + AdamW state before every checkpoint (spdf.train.nonfinite.check_state_finite:
  one fused 2-norm per tensor) against accelerate.save_state of the same state (the write it guards);
- the data cache's chunk CRC-32s (spdf.data.checksums): made once when the cache is built, verified when a run
  starts, against reading the same file once (the floor for any check of its content), in MB/s;
- the token-id range check of one micro-batch (spdf.train.batches: one max over the CPU batch) against that
  micro-batch's forward and backward on the same model.
The run directory's tokenizer check costs nothing extra: its sha256 was already computed for the data cache key.
Files are in the page cache, as right after a write; a cold disk bounds the verification by one read of the file.
Writes integrity_cost.json and .md under --out.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--cache-mb", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    from accelerate import Accelerator

    from spdf.data.checksums import chunk_checksums, verify_chunk_checksums
    from spdf.model import GPT, GPTConfig
    from spdf.train.nonfinite import check_state_finite

    acc = Accelerator(cpu=True)
    vocab = 50257
    model = GPT(GPTConfig(n_layer=args.layers, n_head=12, d_model=args.d_model, d_ff=4 * args.d_model,
                          n_ctx=1024, vocab_size=vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, opt = acc.prepare(model, opt)
    idx = torch.randint(0, vocab, (args.micro_batch, args.seq_len))

    def step() -> None:
        logits, _ = model(idx)
        torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), idx.view(-1)).backward()

    step()
    opt.step()
    opt.zero_grad(set_to_none=True)
    root = Path(tempfile.mkdtemp(prefix="spdf-integrity-bench-"))
    try:
        counter = iter(range(10**6))
        save = _median_seconds(lambda: acc.save_state(str(root / f"ckpt-{next(counter)}")), args.reps)
        ckpt_bytes = sum(p.stat().st_size for p in (root / "ckpt-0").iterdir())
        finite = _median_seconds(lambda: check_state_finite(acc, model, opt, "bench", 1, None), args.reps)
        for d in root.glob("ckpt-*"):
            shutil.rmtree(d)

        cache = root / "train.bin"
        rng = np.random.default_rng(0)
        cache.write_bytes(rng.integers(0, vocab, size=args.cache_mb * (1 << 20) // 2, dtype=np.uint16).tobytes())
        size = cache.stat().st_size

        def read_once() -> None:
            with open(cache, "rb", buffering=0) as f:
                while f.read(8 << 20):
                    pass

        read = _median_seconds(read_once, args.reps)
        recorded = chunk_checksums(cache)
        make = _median_seconds(lambda: chunk_checksums(cache), args.reps)
        verify = _median_seconds(lambda: verify_chunk_checksums(cache, recorded, root), args.reps)

        batch = idx.clone()
        ids = _median_seconds(lambda: int(batch.max()) >= vocab, max(args.reps, 20))
        fwd_bwd = _median_seconds(step, args.reps)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    params = sum(p.numel() for p in model.parameters())
    result = {"params": params, "checkpoint_bytes": ckpt_bytes, "cache_bytes": size, "reps": args.reps,
              "torch_threads": torch.get_num_threads(),
              "seconds": {"save_state": save, "finite_check": finite, "read_cache_once": read,
                          "cache_checksums_make": make, "cache_checksums_verify": verify,
                          "token_id_check": ids, "micro_batch_forward_backward": fwd_bwd},
              "finite_over_save": finite / save, "verify_over_read": verify / read,
              "verify_MB_per_s": size / verify / 1e6, "read_MB_per_s": size / read / 1e6,
              "token_check_over_micro_batch": ids / fwd_bwd}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "integrity_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    s = result["seconds"]
    md = [f"# Cost of the integrity checks (CPU, torch threads {result['torch_threads']}, median of {args.reps})", "",
          "| check | seconds | the work it guards | seconds | ratio |", "|---|---|---|---|---|",
          f"| finiteness of weights + AdamW state ({params / 1e6:.1f}M parameters) | {s['finite_check']:.3f} | "
          f"accelerate.save_state of that state ({ckpt_bytes / 1e6:.0f} MB) | {s['save_state']:.3f} | "
          f"{result['finite_over_save']:.3f} |",
          f"| data cache chunk CRC-32s, verify at run start ({size / 1e6:.0f} MB) | {s['cache_checksums_verify']:.3f} "
          f"| one read of the same file | {s['read_cache_once']:.3f} | {result['verify_over_read']:.2f} |",
          f"| data cache chunk CRC-32s, made once at build | {s['cache_checksums_make']:.3f} | one read of the same "
          f"file | {s['read_cache_once']:.3f} | {s['cache_checksums_make'] / s['read_cache_once']:.2f} |",
          f"| token ids < vocabulary, one {args.micro_batch}x{args.seq_len} micro-batch | {s['token_id_check']:.6f} | "
          f"its forward + backward | {s['micro_batch_forward_backward']:.3f} | "
          f"{result['token_check_over_micro_batch']:.5f} |",
          "", f"Cache verification: {result['verify_MB_per_s']:.0f} MB/s (a plain read: {result['read_MB_per_s']:.0f} "
          f"MB/s), files in the page cache; at that rate a 52 GB cache (26B uint16 tokens, GPT-3 XL on the Pile) "
          f"takes {52e9 / (result['verify_MB_per_s'] * 1e6):.0f} s at run start, once, against days of training.",
          "The tokenizer's sha256 is the one the data cache key already needed: no extra cost.",
          "Command: `OMP_NUM_THREADS=1 nice -n 5 python benchmarks/integrity_cost.py` on a shared, loaded 2-core "
          "machine."]
    (args.out / "integrity_cost.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
