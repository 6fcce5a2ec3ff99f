"""Cost of checkpoint manifests: CRC-32 of every file (written last) and its verification, vs writing the checkpoint.

    OMP_NUM_THREADS=1 python benchmarks/manifest_cost.py            # GPT-3 Small shape, 6 layers: ~0.5 GB checkpoint
    python benchmarks/manifest_cost.py --layers 12 --reps 5 --out benchmarks/results

A checkpoint here is what spdf.train.checkpoint writes: accelerate.save_state of a GPT with one AdamW step taken
(weights + two moments + RNG states) plus spdf.json. Timed separately, median of --reps: the save_state write, the
manifest (hash every file + write manifest.json), the fsync of every file and directory before the rename publishes
the checkpoint (spdf.fswrite.sync_tree: until it returns the bytes may exist only in the page cache), the check
after each write (sizes only) and the verification on load (re-hash every file). The files are in the page cache
when hashed, as they are right after a write: verification of a checkpoint on a cold disk is bound by reading it
once. Writes manifest_cost.json and .md under --out.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    from accelerate import Accelerator

    from spdf.fswrite import sync_tree
    from spdf.manifest import verify_manifest, write_manifest
    from spdf.model import GPT, GPTConfig

    acc = Accelerator(cpu=True)
    model = GPT(GPTConfig(n_layer=args.layers, n_head=12, d_model=args.d_model, d_ff=4 * args.d_model,
                          n_ctx=1024, vocab_size=50257))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, opt = acc.prepare(model, opt)
    model(torch.randint(0, 50257, (1, 16)))[0].float().mean().backward()
    opt.step()
    times = {"save_state": [], "write_manifest": [], "sync_tree": [], "verify_sizes": [], "verify_manifest": []}
    root = Path(tempfile.mkdtemp(prefix="spdf-manifest-bench-"))
    try:
        for rep in range(args.reps):
            d = root / f"step-{rep}"
            t = time.perf_counter()
            acc.save_state(str(d))
            (d / "spdf.json").write_text("{}")
            times["save_state"].append(time.perf_counter() - t)
            t = time.perf_counter()
            write_manifest(d)
            times["write_manifest"].append(time.perf_counter() - t)
            t = time.perf_counter()
            sync_tree(d)
            times["sync_tree"].append(time.perf_counter() - t)
            t = time.perf_counter()
            verify_manifest(d, content=False)
            times["verify_sizes"].append(time.perf_counter() - t)
            t = time.perf_counter()
            files = verify_manifest(d)
            times["verify_manifest"].append(time.perf_counter() - t)
            size = sum(p.stat().st_size for p in d.iterdir())
            shutil.rmtree(d)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"params": sum(p.numel() for p in model.parameters()), "checkpoint_bytes": size, "files": files,
              "reps": args.reps, "median_seconds": med, "all_seconds": times,
              "manifest_over_write": med["write_manifest"] / med["save_state"],
              "verify_over_write": med["verify_manifest"] / med["save_state"],
              "sync_over_write": med["sync_tree"] / med["save_state"], "directory": str(root),
              "checksum_MB_per_s": size / med["verify_manifest"] / 1e6, "torch_threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "manifest_cost.json").write_text(json.dumps(result, indent=2))
    md = [f"# Checkpoint manifest cost ({result['params'] / 1e6:.1f}M-parameter GPT, checkpoint "
          f"{size / 1e6:.0f} MB in {files} files, median of {args.reps}, CPU, torch threads {result['torch_threads']})",
          "", "| step | seconds | vs the write |", "|---|---|---|",
          f"| accelerate.save_state + spdf.json (the write) | {med['save_state']:.2f} | 1.00 |",
          f"| write_manifest (CRC-32 of every file) | {med['write_manifest']:.2f} | "
          f"{result['manifest_over_write']:.2f} |",
          f"| sync_tree (fsync every file and directory before the rename) | {med['sync_tree']:.2f} | "
          f"{result['sync_over_write']:.2f} |",
          f"| verify_manifest(content=False) (after each write: sizes) | {med['verify_sizes']:.4f} | "
          f"{med['verify_sizes'] / med['save_state']:.4f} |",
          f"| verify_manifest (on load: re-hash every file) | {med['verify_manifest']:.2f} | "
          f"{result['verify_over_write']:.2f} |",
          "", f"checksum throughput: {result['checksum_MB_per_s']:.0f} MB/s (files in the page cache); fsync to the "
          f"file system of {root.parent}.",
          f"Command: `OMP_NUM_THREADS=1 python benchmarks/manifest_cost.py{''.join(' ' + a for a in sys.argv[1:])}` "
          f"on a shared, loaded 2-core machine."]
    (args.out / "manifest_cost.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
