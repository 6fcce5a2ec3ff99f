"""Two CPU processes under DDP (gloo): RigL takes identical decisions on every rank from the all-reduced gradients,
though each rank sees other data."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import spdf
from spdf.sparsity import RigL, sparse_layers


def _worker(rank: int, world: int, out_dir: str):
    # a rendezvous file in the test's own directory, not a port: a free port found before the spawn can be taken by
    # another test's processes in between
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = spdf.GPT.from_name("tiny-test")
    sp = spdf.sparsify(model, sparsity=0.75, seed=0, algorithm=RigL(0.3, every=2))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, fused=True)
    sp.attach(opt)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    masked_grads_zero = []
    for step in range(4):
        idx = torch.randint(0, 128, (2, 17), generator=g)
        _, loss = ddp(idx[:, :-1], idx[:, 1:])
        loss.backward()
        if step % 2 == 0:  # not an update step: the reduced gradient is masked
            masked_grads_zero.append(all((l.weight.grad[~l.weight_mask] == 0).all().item()
                                         for l in sparse_layers(model).values()))
        opt.step()
        opt.zero_grad(set_to_none=True)
    masks = {n: l.mask for n, l in sparse_layers(model).items()}
    torch.save({"masks": masks, "masked_grads_zero": masked_grads_zero, "step": sp.step},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_rigl_decisions_are_identical_on_every_rank(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["step"] == r1["step"] == 4
    assert all(r0["masked_grads_zero"]) and all(r1["masked_grads_zero"])
    torch.manual_seed(0)
    fresh = spdf.GPT.from_name("tiny-test")
    spdf.sparsify(fresh, sparsity=0.75, seed=0)
    initial = {n: l.mask for n, l in sparse_layers(fresh).items()}
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
    assert any(not torch.equal(r0["masks"][n], initial[n]) for n in initial)  # the masks did move
