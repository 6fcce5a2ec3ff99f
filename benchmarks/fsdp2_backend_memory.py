"""Training state per rank under FSDP2, by backend: dense, masked, compressed, block. Two gloo CPU processes.

    python benchmarks/fsdp2_backend_memory.py       # GPT-3 XL width (2048), 2 layers: ~2 min, ~4 GB RAM

For each backend a GPT is sparsified (75%: random masks; block: random 64x64 blocks), each Block and the root
`fully_shard`-ed over a 2-rank CPU mesh, an AdamW attached, and one training step taken (1 x 64 tokens). Then, on
each rank, the benchmark sums the bytes of the distinct storages behind what that rank holds: its parameter shards,
their gradients, the AdamW state, and the buffers (the masked backend's mask shards, the compressed and block
backends' replicated layout). That is the state FSDP2 keeps between steps, the part sparsity can shrink; the
activations and the all-gathered weights of one block at a time come on top, alike for every backend. The process's
resident memory after the step is reported beside it, and is a coarse figure here: each rank first builds the whole
dense model on the CPU (then sharded), and freed memory need not return to the OS. Writes fsdp2_backend_memory.json
and .md under --out.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.elastic.utils.distributed import get_free_port

from fsdp_mask_memory import xl_width_arguments, xl_width_gpt  # the same model and options
from machine import cpu_name

MiB = 2 ** 20
BACKENDS = ("dense", "masked", "compressed", "block")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (local shards of DTensors): shared storages counted once."""
    storages = {}
    for tensor in tensors:
        storage = _local(tensor).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _sparsify(model, backend: str, level: float):
    import spdf

    if backend == "dense":
        return None
    if backend == "block":
        return spdf.sparsify(model, sparsity=level, init=spdf.sparsity.Block(64), backend="block")
    return spdf.sparsify(model, sparsity=level, backend=backend)


def _worker(rank: int, world: int, args, port: int, backend: str, out: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = xl_width_gpt(args)
    sp = _sparsify(model, backend, args.sparsity)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if sp is not None:
        sp.attach(opt)
    idx = torch.randint(0, args.vocab, (1, 65), generator=torch.Generator().manual_seed(rank))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    opt.step()
    params = list(model.parameters())
    held = {
        "parameters": _bytes(params),
        "gradients": _bytes([p.grad for p in params if p.grad is not None]),
        "optimizer": _bytes([t for state in opt.state.values() for t in state.values()
                             if torch.is_tensor(t) and t.dim() > 0]),
        "buffers": _bytes(list(model.buffers())),
    }
    held["total"] = sum(held.values())
    held["rss"] = psutil.Process().memory_info().rss
    torch.save(held, os.path.join(out, f"{backend}-rank{rank}.pt"))
    dist.destroy_process_group()


def _table(rows: dict, world: int) -> str:
    dense = rows["dense"]
    lines = ["| backend | parameters | gradients | AdamW state | buffers | state total (vs dense) | RSS after the step |",
             "|---|---|---|---|---|---|---|"]
    for backend, ranks in rows.items():
        mean = {k: sum(r[k] for r in ranks) / world for k in ranks[0]}
        ratio = mean["total"] / (sum(r["total"] for r in dense) / world)
        lines.append(f"| {backend} | {mean['parameters'] / MiB:.1f} | {mean['gradients'] / MiB:.1f} | "
                     f"{mean['optimizer'] / MiB:.1f} | {mean['buffers'] / MiB:.1f} | "
                     f"{mean['total'] / MiB:.1f} ({ratio:.3f}x) | {mean['rss'] / MiB:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    args = xl_width_arguments(__doc__).parse_args()
    world, scratch = 2, Path(args.out) / ".fsdp2_backend_memory"
    scratch.mkdir(parents=True, exist_ok=True)
    rows = {}
    for backend in BACKENDS:
        mp.spawn(_worker, args=(world, args, get_free_port(), backend, str(scratch)), nprocs=world, join=True)
        rows[backend] = [torch.load(scratch / f"{backend}-rank{r}.pt") for r in range(world)]
        for r in range(world):
            (scratch / f"{backend}-rank{r}.pt").unlink()
    scratch.rmdir()
    result = {"config": vars(args), "world": world, "torch": torch.__version__, "machine": cpu_name(),
              "per_rank_bytes": {b: [{k: int(v) for k, v in r.items()} for r in ranks] for b, ranks in rows.items()}}
    out = Path(args.out)
    (out / "fsdp2_backend_memory.json").write_text(json.dumps(result, indent=2))
    (out / "fsdp2_backend_memory.md").write_text(
        f"# Training state per rank under FSDP2, by backend ({world} gloo CPU processes)\n\n"
        f"`python benchmarks/fsdp2_backend_memory.py`: GPT {args.layers} layers, d_model {args.d_model} (GPT-3 XL "
        f"width), vocabulary {args.vocab}, {args.sparsity:.0%} sparsity (random masks; block: random 64x64 blocks) on "
        f"the attention and MLP weights, AdamW, after one step; torch {torch.__version__}, {result['machine']}. MiB "
        f"per rank (mean of the ranks) of the storages each rank holds; RSS is the process's resident memory "
        f"(coarse: each rank built the whole dense model before sharding it).\n\n" + _table(rows, world))
    print(_table(rows, world))


if __name__ == "__main__":
    main()
