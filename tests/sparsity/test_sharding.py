"""Masks under wrappers and sharding, in one process (a gloo group of one): the same masks whatever wraps the model,
and every wrapping or sharding that would train masked weights dense refused with a message naming FSDP2 and DDP."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
from torch.distributed.fsdp import fully_shard

import spdf
from spdf.sparsity import RigL
from spdf.sparsity.sharding import canonical_name


@pytest.fixture
def group_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model():
    torch.manual_seed(0)
    return spdf.GPT.from_name("tiny-test")


def _batch():
    idx = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    return idx[:, :-1], idx[:, 1:]


def test_canonical_names_drop_wrapper_segments():
    assert canonical_name("_orig_mod.transformer.h.0.mlp.c_fc.weight") == "transformer.h.0.mlp.c_fc.weight"
    assert canonical_name("module.transformer.h._fsdp_wrapped_module.0.attn.weight") == "transformer.h.0.attn.weight"
    assert canonical_name("module._orig_mod.h.0._checkpoint_wrapped_module.fc") == "h.0.fc"
    assert canonical_name("h.module.fc") == "h.module.fc"  # only a leading `module` is a wrapper's


def test_compiled_ddp_and_checkpoint_wrapped_models_get_the_bare_models_masks(group_of_one):
    bare = spdf.sparsify(_model(), sparsity=0.75, seed=3)
    compiled = spdf.sparsify(torch.compile(_model()), sparsity=0.75, seed=3)
    ddp = spdf.sparsify(torch.nn.parallel.DistributedDataParallel(_model()), sparsity=0.75, seed=3)
    other_seed = spdf.sparsify(_model(), sparsity=0.75, seed=4)
    checkpointed = _model()  # activation checkpointing wraps each Block: `_checkpoint_wrapped_module` in the names
    for i, block in enumerate(checkpointed.transformer.h):
        checkpointed.transformer.h[i] = checkpoint_wrapper(block)
    checkpointed = spdf.sparsify(checkpointed, sparsity=0.75, seed=3)
    reference = bare.masks()
    for sp in (compiled, ddp, checkpointed):
        masks = sp.masks()
        assert masks.keys() == reference.keys()
        assert all(torch.equal(masks[k], reference[k]) for k in reference)
        saved, expected = sp.state_dict()["layers"], bare.state_dict()["layers"]
        assert saved.keys() == expected.keys()
        assert all(torch.equal(saved[k]["bits"], expected[k]["bits"]) for k in expected)
    assert not all(torch.equal(other_seed.masks()[k], reference[k]) for k in reference)


def test_fsdp1_is_refused_in_every_order(group_of_one):
    for orig_params in (True, False):
        model = _model()
        sp = spdf.sparsify(model, sparsity=0.75, seed=0)
        wrapped = FSDP1(model, use_orig_params=orig_params, device_id=torch.device("cpu"))
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
        with pytest.raises(ValueError, match="FSDP2") as err:
            sp.attach(opt)
        assert "FSDP1" in str(err.value)
        with pytest.raises(RuntimeError, match="no optimizer is attached"):  # training unattached: an error
            wrapped(*_batch())[1].backward()
    with pytest.raises(ValueError, match="sparsify the bare model|Sparsify the bare model"):
        spdf.sparsify(FSDP1(_model(), use_orig_params=True, device_id=torch.device("cpu")), sparsity=0.75)


def test_fsdp2_refusals(group_of_one):
    mesh = init_device_mesh("cpu", (1,))
    with pytest.raises(ValueError, match="fully_shard came first"):  # shard -> sparsify
        spdf.sparsify(fully_shard(_model(), mesh=mesh), sparsity=0.75)
    compressed = _model()
    sp = spdf.sparsify(compressed, sparsity=0.75, backend="compressed", tile=(16, 16))
    fully_shard(compressed, mesh=mesh)
    sp.attach(torch.optim.AdamW(compressed.parameters()))  # its non-zeros shard like any parameter (test_fsdp2.py)
    flipped = {name: mask.flip(0) for name, mask in sp.masks().items()}  # as many kept entries, other places
    with pytest.raises(ValueError, match="cannot change the mask of a layer sharded by FSDP2.*backend 'masked'"):
        sp.load_masks(flipped)
    dynamic = _model()
    sp = spdf.sparsify(dynamic, sparsity=0.75, algorithm=RigL(0.3, every=2))
    fully_shard(dynamic, mesh=mesh)
    with pytest.raises(ValueError, match="dynamic sparsity algorithms"):
        sp.attach(torch.optim.AdamW(dynamic.parameters()))
    unattached = _model()
    spdf.sparsify(unattached, sparsity=0.75)
    fully_shard(unattached, mesh=mesh)
    with pytest.raises(RuntimeError, match="no optimizer is attached"):
        unattached(*_batch())[1].backward()


def test_deepspeed_style_shards_and_optimizers_are_refused():
    class DeepSpeedZeroOptimizer:  # stands in for DeepSpeed's wrapper around a torch optimizer of flat partitions
        def __init__(self, optimizer):
            self.optimizer = optimizer

    model = _model()
    sp = spdf.sparsify(model, sparsity=0.75)
    with pytest.raises(ValueError, match="DeepSpeed"):
        sp.attach(DeepSpeedZeroOptimizer(torch.optim.AdamW(model.parameters())))
    layer = next(iter(sp.layers.values()))
    layer.weight.ds_id = 7  # what ZeRO-3 sets on a parameter it partitions
    with pytest.raises(ValueError, match="ZeRO-3"):
        sp.attach(torch.optim.AdamW(model.parameters()))


def test_fsdp2_in_one_process_keeps_the_zeros_like_the_bare_model(group_of_one):
    """The same steps (clipping active) on a bare and a fully_shard-ed sparse model give the same weights."""
    results = []
    for shard in (False, True):
        model = _model()
        sp = spdf.sparsify(model, sparsity=0.75, seed=0)
        if shard:
            mesh = init_device_mesh("cpu", (1,))
            for block in model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        sp.attach(opt)
        for _ in range(3):
            model(*_batch())[1].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
            opt.zero_grad()
        rows = {r["name"]: r for r in sp.stats()}
        assert all(r["actual"] == pytest.approx(r["mask_sparsity"]) for r in rows.values())
        for name, layer in sp.layers.items():
            state = opt.state[layer.weight]
            for value in (state["exp_avg"], state["exp_avg_sq"]):
                full = value.full_tensor() if shard else value
                assert (full[~layer.mask] == 0).all(), name
        results.append({n: l.dense_weight().clone() for n, l in sp.layers.items()})
        # a resumed state with other masks (set_mask on the local shards): the new masked entries are zero too
        sp.load_state_dict(spdf.sparsify(_model(), sparsity=0.5, seed=9).state_dict())
        for name, layer in sp.layers.items():
            assert layer.density == pytest.approx(0.5, abs=1e-3)
            for value in (layer.weight, opt.state[layer.weight]["exp_avg"]):
                full = value.full_tensor() if shard else value
                assert (full.detach()[~layer.mask] == 0).all(), name
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-6)
