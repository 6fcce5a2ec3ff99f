"""Mask bytes per rank under FSDP2, before and after `attach` shards the masks, two gloo CPU processes.

    python benchmarks/fsdp_mask_memory.py                  # GPT-3 XL width (2048), 2 layers: ~30 s, ~1.5 GB RAM

A GPT is sparsified (75%, random masks), each Block and the root `fully_shard`-ed over a 2-rank CPU mesh, then an
AdamW is attached. Rank by rank the benchmark counts the bytes of the storages behind the sparse layers' mask
buffers: before attach (every rank holds every full bool mask, as spdf did until this change) and after (each rank
holds the shard placed like its weight's). It checks that the full masks were freed (no reference left), that the
gathered masks equal those of the same model sparsified in one process (the masks are still a pure function of
(seed, name, shape)), and that stats() and state_dict() report the global masks. The GPT-3 XL rows are the same
accounting at full depth (24 layers, 12·d² sparse weights per layer, one byte per bool mask entry), which this
machine does not build. Writes fsdp_mask_memory.json and .md under --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.elastic.utils.distributed import get_free_port

MiB = 2 ** 20


def _mask_bytes(sp) -> int:
    """Bytes of the distinct storages this rank holds behind the sparse layers' masks."""
    from spdf.sparsity.sharding import local

    storages = {}
    for layer in sp.layers.values():
        storage = local(layer.weight_mask).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def xl_width_arguments(description: str) -> argparse.ArgumentParser:
    """The FSDP2 benchmarks' options: the model's depth, width and vocabulary, the sparsity, where results go."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return parser


def xl_width_gpt(args):
    """The benchmarks' FSDP2 model: a GPT args.layers deep, args.d_model wide (GPT-3 XL's 2048 by default)."""
    from spdf.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=args.layers, n_head=args.d_model // 128, d_model=args.d_model,
                         d_ff=4 * args.d_model, n_ctx=64, vocab_size=args.vocab))


def _worker(rank: int, world: int, args, port: int):
    import spdf
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = xl_width_gpt(args)
    sp = spdf.sparsify(model, sparsity=args.sparsity, seed=0)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    before = _mask_bytes(sp)
    full_masks = [weakref.ref(layer.weight_mask) for layer in sp.layers.values()]
    sp.attach(torch.optim.AdamW(model.parameters(), lr=1e-4))
    gc.collect()
    after = _mask_bytes(sp)
    freed = all(ref() is None for ref in full_masks)
    masks = sp.masks()  # gathered: a collective
    rows = sp.stats()
    state = sp.state_dict()
    sizes = torch.tensor([before, after], dtype=torch.int64)
    gathered = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(gathered, sizes)
    if rank == 0:
        reference = spdf.sparsify(xl_width_gpt(args), sparsity=args.sparsity, seed=0).masks()
        numel = sum(m.numel() for m in reference.values())
        xl_numel = 24 * 12 * 2048 ** 2
        result = {
            "config": vars(args), "world": world, "torch": torch.__version__,
            "mask_bytes_per_rank_before": [int(g[0]) for g in gathered],
            "mask_bytes_per_rank_after": [int(g[1]) for g in gathered],
            "sparse_weight_entries": numel,
            "full_masks_freed": freed,
            "gathered_masks_equal_one_process": all(torch.equal(masks[k], reference[k]) for k in reference),
            # per layer, the global mask's sparsity; `actual` also counts weights that are zero by chance (the
            # truncated-normal init gives an exact 0.0 about once in 2^24 draws)
            "stats_report_global_masks": rows[-1]["numel"] == numel and all(
                r["mask_sparsity"] == 1 - int(reference[f"{r['name']}.weight"].sum()) / r["numel"] <= r["actual"]
                for r in rows[:-1]),
            "state_dict_global_shapes": all(tuple(v["shape"]) == tuple(reference[f"{k}.weight"].shape)
                                            for k, v in state["layers"].items()),
            "xl_mask_MiB_per_rank": {"before (any world)": xl_numel / MiB,
                                     **{f"after, {n} ranks": xl_numel / n / MiB for n in (2, 8, 16, 64)}},
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fsdp_mask_memory.json").write_text(json.dumps(result, indent=2))
        b, a = result["mask_bytes_per_rank_before"], result["mask_bytes_per_rank_after"]
        (out / "fsdp_mask_memory.md").write_text(
            f"# FSDP2 mask memory per rank ({world} gloo CPU processes)\n\n"
            f"GPT {args.layers} layers, d_model {args.d_model} (GPT-3 XL width), {args.sparsity:.0%} random masks "
            f"on {numel:,} sparse weight entries; torch {torch.__version__}. Bytes of the storages behind each "
            f"rank's mask buffers.\n\n| rank | before attach (full masks) | after attach (own shard) | ratio |\n"
            f"|---|---|---|---|\n"
            + "".join(f"| {r} | {b[r] / MiB:.1f} MiB | {a[r] / MiB:.1f} MiB | {a[r] / b[r]:.3f} |\n"
                      for r in range(world))
            + f"\nFull masks freed after attach: {freed}. Gathered masks equal the one-process masks: "
              f"{result['gathered_masks_equal_one_process']}. stats() reports the global masks: "
              f"{result['stats_report_global_masks']}; state_dict() global shapes: "
              f"{result['state_dict_global_shapes']}.\n\n"
              f"GPT-3 XL (24 layers, {xl_numel:,} sparse entries, 1 byte each), mask MiB per rank:\n\n"
              "| layout | MiB |\n|---|---|\n"
            + "".join(f"| {k} | {v:,.0f} |\n" for k, v in result["xl_mask_MiB_per_rank"].items()))
        print(json.dumps(result, indent=2))
    dist.destroy_process_group()


def main():
    args = xl_width_arguments(__doc__).parse_args()
    mp.spawn(_worker, args=(2, args, get_free_port()), nprocs=2, join=True)


if __name__ == "__main__":
    main()
