"""Two CPU processes (gloo) under FSDP2: weights, gradients and AdamW state sharded across ranks keep every masked
entry exactly zero, and the run matches one process training on the whole batch. Ranks that made other masks are
stopped at attach. A run saved with torch.distributed.checkpoint and resumed in fresh processes' models continues
exactly. Each model family's blocks are sharded one by one (its `block_class`): GPT's and Llama's. The compressed
and block backends shard their 1-D vector of non-zeros like any parameter (nothing is masked, so no mask is
sharded) and train like one process too. The semi_structured (2:4) backend's FSDP2 plumbing is checked here with its
sparse tensor-core product replaced by the dense product of the same exact zeros (there is none on a CPU); its real
kernel under FSDP2 is a CUDA test (tests/sparsity/test_semi_structured.py)."""
import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


# (model shape, backend): both families on the masked backend; the compressed backend; the block backend on a model
# 128 wide, so each matrix has at least 2 blocks of 64 per side
CASES = [*[(f"{family.default_shape}-test", "masked") for family in FAMILIES.values()],
         ("tiny-test", "compressed"), ("tiny-test@128", "block"), ("tiny-test", "semi_structured")]
SPARSIFY = {"masked": {}, "compressed": {"backend": "compressed", "tile": (16, 16)},
            "block": {"backend": "block", "init": spdf.sparsity.Block(64)},
            "semi_structured": {"backend": "semi_structured", "init": spdf.sparsity.NM(2, 4), "sparsity": 0.5}}
DENSE_STORAGE = ("masked", "semi_structured")  # a dense weight with exact zeros and a mask sharded like it


def level(backend: str) -> float:
    return SPARSIFY[backend].get("sparsity", 0.75)


def semi_structured_on_cpu(patch) -> None:
    """Let the 2:4 layer run on a CPU in fp32, its compression an identity: the same product of the same exact
    zeros, densely (`patch(obj, name, value)`: pytest's monkeypatch.setattr, or setattr in a spawned worker)."""
    from spdf.sparsity import semi_structured

    patch(semi_structured.SemiStructuredLinear, "devices", ("cpu", "cuda"))
    patch(semi_structured, "HALF", (torch.float32, torch.float16, torch.bfloat16))
    patch(semi_structured, "compress", lambda weight: weight)


def _model(shape: str):
    torch.manual_seed(0)
    name, _, width = shape.partition("@")
    config = config_by_name(name)
    if width:
        config = dataclasses.replace(config, d_model=int(width), d_ff=4 * int(width))
    return family_of(config).build(config)


def _sparsify(model, backend: str, seed: int = 0):
    return spdf.sparsify(model, seed=seed, **{"sparsity": 0.75, **SPARSIFY[backend]})


def _sharded(world: int, shape: str, backend: str, seed: int = 0):
    """sparsify -> fully_shard (each of the family's blocks, then the root) -> AdamW -> attach."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model(shape)
    sp = _sparsify(model, backend, seed)
    mesh = init_device_mesh("cpu", (world,))
    blocks = [m for m in model.modules() if isinstance(m, family_of(model).block_class)]
    assert len(blocks) == model.config.n_layer
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sp.attach(opt)
    return model, sp, opt


def _resumed_losses(rank: int, world: int, ckpt: str, shape: str, backend: str) -> list[float]:
    """Train half the steps, save (DCP, sharded), then continue in a new model sparsified with another seed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    rows, half = slice(2 * rank, 2 * rank + 2), slice(0, STEPS // 2)
    model, sp, opt = _sharded(world, shape, backend)
    losses = _train(model, opt, rows, world, half)
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=ckpt)
    saved = sp.state_dict()
    # the masks must come from the checkpoint (a layer that stores only its non-zeros cannot change its mask once
    # sharded: it is made with the same seed, and a different mask would be refused)
    model, sp, opt = _sharded(world, shape, backend, seed=1 if backend in DENSE_STORAGE else 0)
    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sp.load_state_dict(saved)
    return losses + _train(model, opt, rows, world, slice(STEPS // 2, None))


def _shards_of_nonzeros(sp, opt, world: int) -> dict[str, bool]:
    """Per layer: its non-zeros and their AdamW moments are sharded (each rank holds a piece, together all of them),
    and nothing dense exists."""
    out = {}
    for name, layer in sp.layers.items():
        values, state = layer.values, opt.state[layer.values]
        pieces = [values, state["exp_avg"], state["exp_avg_sq"]]
        out[name] = (all(spdf.sparsity.sharding.is_dtensor(t) and t.shape == (layer.nnz,)
                         and 0 < t.to_local().numel() <= -(-layer.nnz // world) for t in pieces)
                     and layer.nnz == round(0.25 * layer.mask.numel()))
    return out


def _worker(rank: int, world: int, out_dir: str, shape: str, backend: str):
    # a rendezvous file in the test's own directory, not a port: a free port found before the spawn can be taken by
    # another test's processes in between
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    if backend == "semi_structured":
        semi_structured_on_cpu(setattr)
    model, sp, opt = _sharded(world, shape, backend)
    losses = _train(model, opt, slice(2 * rank, 2 * rank + 2), world)
    zeros_on_shard, mask_shards = {}, {}
    for name, layer in sp.layers.items() if backend in DENSE_STORAGE else ():
        # each rank holds only its shard of the mask, placed like the weight's
        mask = layer.weight_mask
        mask_shards[name] = (spdf.sparsity.sharding.is_dtensor(mask) and mask.placements == layer.weight.placements
                             and mask.to_local().numel() * world == mask.numel())
        local_masked = ~mask.to_local()
        state = opt.state[layer.weight]
        zeros_on_shard[name] = all(bool((t.to_local()[local_masked] == 0).all()) and t.to_local().numel() > 0
                                   for t in (layer.weight, state["exp_avg"], state["exp_avg_sq"]))
    if backend not in DENSE_STORAGE:
        zeros_on_shard = _shards_of_nonzeros(sp, opt, world)
    result = {"losses": losses,
              "resumed_losses": _resumed_losses(rank, world, os.path.join(out_dir, "ckpt"), shape, backend),
              "zeros_on_shard": zeros_on_shard, "mask_shards": mask_shards, "stats": sp.stats(), "masks": sp.masks(),
              "weights": {n: layer.dense_weight().clone() for n, layer in sp.layers.items()}}
    other = _model(shape)  # every rank its own seed: attach must stop all of them
    try:
        _sparsify(other, backend, seed=rank).attach(torch.optim.AdamW(other.parameters()))
        result["mismatch_error"] = None
    except ValueError as err:
        result["mismatch_error"] = str(err)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("shape, backend", CASES)
def test_fsdp2_on_two_ranks_keeps_every_zero_and_trains_like_one_process(tmp_path, shape, backend, monkeypatch):
    if backend == "semi_structured":
        semi_structured_on_cpu(monkeypatch.setattr)
    mp.spawn(_worker, args=(2, str(tmp_path), shape, backend), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model = _model(shape)
    sp = _sparsify(model, backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sp.attach(opt)
    losses = _train(model, opt, slice(0, 4), 1)
    for r in ranks:
        assert r["zeros_on_shard"] and all(r["zeros_on_shard"].values()), r["zeros_on_shard"]
        assert all(r["mask_shards"].values()) and bool(r["mask_shards"]) == (backend in DENSE_STORAGE), r["mask_shards"]
        assert r["losses"] == pytest.approx(losses, abs=1e-5)
        assert r["resumed_losses"] == pytest.approx(r["losses"], abs=1e-6)
        assert {k: torch.equal(v, sp.masks()[k]) for k, v in r["masks"].items()} == {k: True for k in sp.masks()}
        for row in r["stats"]:
            assert row["actual"] == row["mask_sparsity"] == pytest.approx(level(backend), abs=1e-3), row
        for name, layer in sp.layers.items():
            torch.testing.assert_close(r["weights"][name], layer.dense_weight(), rtol=1e-4, atol=1e-5)
        assert "masks differ across ranks" in r["mismatch_error"]
