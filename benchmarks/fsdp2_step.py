"""A masked (75% sparse) FSDP2 training step against the dense FSDP2 step, two gloo CPU processes, side by side.

    python benchmarks/fsdp2_step.py                      # ~2 minutes on 2 idle cores
    python benchmarks/fsdp2_step.py --d-model 512 --layers 4 --reps 30

One step = forward, backward, clip_grad_norm_(1.0), AdamW(weight_decay=0.1).step(), zero_grad() on a GPT whose
Blocks and root are each `fully_shard`-ed over a 2-rank CPU mesh. The dense and the sparse model (same initial
weights, same batch) alternate step by step after a warm-up, so machine noise hits both alike; rank 0 reports the
median per-step seconds of each and the median of the per-round paired ratios (the goal in issue 8: <= 1.05x). The
sparse model's extra work per step: the gradient hook on the sharded weight (FSDP2 calls it after its
reduce-scatter; the mask is sharded like the weight), the post-step re-zeroing of the local weight shard. After the
timed steps the benchmark checks that every masked weight is exactly zero. Writes fsdp2_step.json and fsdp2_step.md
under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.elastic.utils.distributed import get_free_port


def _worker(rank: int, args, port: int):
    import spdf
    from spdf.model import GPT, GPTConfig
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(args.threads)
    mesh = init_device_mesh("cpu", (2,))
    config = GPTConfig(n_layer=args.layers, n_head=max(args.d_model // 64, 1), d_model=args.d_model,
                       d_ff=4 * args.d_model, n_ctx=args.seq, vocab_size=args.vocab)
    variants = {}
    for name in ("dense", "sparse"):
        torch.manual_seed(0)
        model = GPT(config)
        sp = spdf.sparsify(model, sparsity=args.sparsity, seed=0) if name == "sparse" else None
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        if sp is not None:
            sp.attach(opt)
        variants[name] = (model, opt, sp)
    g = torch.Generator().manual_seed(rank)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)

    def step(name: str) -> float:
        model, opt, _ = variants[name]
        dist.barrier()
        start = time.perf_counter()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for name in variants:
            step(name)
    times = {name: [] for name in variants}
    for r in range(args.reps):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            times[name].append(step(name))
    _, _, sp = variants["sparse"]
    rows = sp.stats()  # a collective: every rank gathers
    exact = all(row["actual"] == row["mask_sparsity"] for row in rows)
    if rank == 0:
        ratios = [s / d for s, d in zip(times["sparse"], times["dense"])]
        result = {
            "config": vars(args), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "median_s": {n: statistics.median(t) for n, t in times.items()},
            "ratio_of_medians": statistics.median(times["sparse"]) / statistics.median(times["dense"]),
            "median_paired_ratio": statistics.median(ratios),
            "masked_weights_exactly_zero": exact,
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fsdp2_step.json").write_text(json.dumps(result, indent=2))
        (out / "fsdp2_step.md").write_text(
            f"# FSDP2 step: masked {args.sparsity:.0%} sparse vs dense (2 gloo CPU processes)\n\n"
            f"GPT {args.layers} layers, d_model {args.d_model}, batch {args.batch} x {args.seq} per rank, "
            f"{args.threads} thread(s) per rank, AdamW (torch default), clip 1.0; {args.reps} paired rounds after "
            f"{args.warmup} warm-up; torch {torch.__version__}. A shared, loaded machine: read the paired ratio.\n\n"
            f"| variant | median s/step |\n|---|---|\n"
            + "".join(f"| {n} | {v:.4f} |\n" for n, v in result["median_s"].items())
            + f"\nsparse / dense: ratio of medians {result['ratio_of_medians']:.3f}, median paired ratio "
              f"{result['median_paired_ratio']:.3f} (goal <= 1.05). Masked weights exactly zero after the run: "
              f"{exact}.\n")
        print(json.dumps(result, indent=2))
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    mp.spawn(_worker, args=(args, get_free_port()), nprocs=2, join=True)


if __name__ == "__main__":
    main()
