"""Two CPU processes (gloo) under FSDP2: weights, gradients and AdamW state sharded across ranks keep every masked
entry exactly zero, and the run matches one process training on the whole batch. Ranks that made other masks are
stopped at attach. A run saved with torch.distributed.checkpoint and resumed in fresh processes' models continues
exactly. Each model family's blocks are sharded one by one (its `block_class`): GPT's and Llama's."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.elastic.utils.distributed import get_free_port

import spdf
from spdf.model import FAMILIES, config_by_name, family_of

STEPS, ACCUM, CLIP = 4, 2, 0.05


def _batches():
    """STEPS × ACCUM micro-batches of 4 sequences (the global batch: each of 2 ranks takes 2 rows)."""
    g = torch.Generator().manual_seed(5)
    return [[torch.randint(0, 128, (4, 13), generator=g) for _ in range(ACCUM)] for _ in range(STEPS)]


def _train(model, opt, rows: slice, world: int, steps=slice(None)):
    losses = []
    for micro in _batches()[steps]:
        total = torch.zeros(1, dtype=torch.float64)
        for idx in micro:
            idx = idx[rows]
            _, loss = model(idx[:, :-1], idx[:, 1:])  # a mean over this rank's rows: FSDP2 averages over ranks
            (loss / ACCUM).backward()
            total += loss.detach().double() / ACCUM
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def _model(shape: str):
    torch.manual_seed(0)
    config = config_by_name(shape)
    return family_of(config).build(config)


def _sharded(world: int, shape: str, seed: int = 0):
    """sparsify -> fully_shard (each of the family's blocks, then the root) -> AdamW -> attach."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model(shape)
    sp = spdf.sparsify(model, sparsity=0.75, seed=seed)
    mesh = init_device_mesh("cpu", (world,))
    blocks = [m for m in model.modules() if isinstance(m, family_of(model).block_class)]
    assert len(blocks) == model.config.n_layer
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sp.attach(opt)
    return model, sp, opt


def _resumed_losses(rank: int, world: int, ckpt: str, shape: str) -> list[float]:
    """Train half the steps, save (DCP, sharded), then continue in a new model sparsified with another seed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    rows, half = slice(2 * rank, 2 * rank + 2), slice(0, STEPS // 2)
    model, sp, opt = _sharded(world, shape)
    losses = _train(model, opt, rows, world, half)
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=ckpt)
    saved = sp.state_dict()
    model, sp, opt = _sharded(world, shape, seed=1)  # the masks must come from the checkpoint
    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sp.load_state_dict(saved)
    return losses + _train(model, opt, rows, world, slice(STEPS // 2, None))


def _worker(rank: int, world: int, port: int, out_dir: str, shape: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, sp, opt = _sharded(world, shape)
    losses = _train(model, opt, slice(2 * rank, 2 * rank + 2), world)
    zeros_on_shard, mask_shards = {}, {}
    for name, layer in sp.layers.items():
        # each rank holds only its shard of the mask, placed like the weight's
        mask = layer.weight_mask
        mask_shards[name] = (spdf.sparsity.sharding.is_dtensor(mask) and mask.placements == layer.weight.placements
                             and mask.to_local().numel() * world == mask.numel())
        local_masked = ~mask.to_local()
        state = opt.state[layer.weight]
        zeros_on_shard[name] = all(bool((t.to_local()[local_masked] == 0).all()) and t.to_local().numel() > 0
                                   for t in (layer.weight, state["exp_avg"], state["exp_avg_sq"]))
    result = {"losses": losses, "resumed_losses": _resumed_losses(rank, world, os.path.join(out_dir, "ckpt"), shape),
              "zeros_on_shard": zeros_on_shard, "mask_shards": mask_shards, "stats": sp.stats(), "masks": sp.masks(),
              "weights": {n: layer.dense_weight().clone() for n, layer in sp.layers.items()}}
    other = _model(shape)  # every rank its own seed: attach must stop all of them
    try:
        spdf.sparsify(other, sparsity=0.75, seed=rank).attach(torch.optim.AdamW(other.parameters()))
        result["mismatch_error"] = None
    except ValueError as err:
        result["mismatch_error"] = str(err)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("shape", [f"{family.default_shape}-test" for family in FAMILIES.values()])
def test_fsdp2_on_two_ranks_keeps_every_zero_and_trains_like_one_process(tmp_path, shape):
    mp.spawn(_worker, args=(2, get_free_port(), str(tmp_path), shape), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model = _model(shape)
    sp = spdf.sparsify(model, sparsity=0.75, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sp.attach(opt)
    losses = _train(model, opt, slice(0, 4), 1)
    for r in ranks:
        assert all(r["zeros_on_shard"].values()), r["zeros_on_shard"]
        assert all(r["mask_shards"].values()), r["mask_shards"]
        assert r["losses"] == pytest.approx(losses, abs=1e-5)
        assert r["resumed_losses"] == pytest.approx(r["losses"], abs=1e-6)
        assert {k: torch.equal(v, sp.masks()[k]) for k, v in r["masks"].items()} == {k: True for k in sp.masks()}
        for row in r["stats"]:
            assert row["actual"] == row["mask_sparsity"] == pytest.approx(0.75, abs=1e-3), row
        for name, layer in sp.layers.items():
            torch.testing.assert_close(r["weights"][name], layer.dense_weight(), rtol=1e-4, atol=1e-5)
        assert "masks differ across ranks" in r["mismatch_error"]
