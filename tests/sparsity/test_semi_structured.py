"""The backend registry, and the `semi_structured` (2:4) backend: refused on CPU with a message naming `masked`, its
masks checked, its state dict the masked backend's; on CUDA (skipped here) exact against the same weights densely."""
from __future__ import annotations

import types

import pytest
import torch
from tiny_training import autocast_steps

import spdf
from spdf.sparsity import NM
from spdf.sparsity.backends import BACKENDS, backend_class
from spdf.sparsity.semi_structured import SemiStructuredLinear, nm_problem

SHAPE = dict(n_layer=2, n_head=2, d_model=64, d_ff=256, n_ctx=16, vocab_size=64)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (2:4 sparse tensor cores)")


def gpt(seed=0, device=None):
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        return spdf.GPT(spdf.GPTConfig(name="semi-test", **SHAPE))


def test_every_registered_backend_names_itself_and_declares_what_it_supports():
    for name in BACKENDS:
        cls = backend_class(name)
        assert cls.backend == name
        assert isinstance(cls.supports_dynamic, bool) and isinstance(cls.supports_fsdp2, bool)
        assert set(cls.devices) <= {"cpu", "cuda"}
    with pytest.raises(ValueError, match="unknown sparse backend 'dense'; allowed: masked, compressed, block"):
        backend_class("dense")
    assert all(backend_class(name).supports_fsdp2 for name in BACKENDS)  # tests/sparsity/test_fsdp2.py


def test_on_cpu_it_is_refused_with_one_line_naming_the_masked_backend():
    model = gpt()
    sp = spdf.sparsify(model, 0.5, init=NM(2, 4), backend="semi_structured")
    with pytest.raises(ValueError) as info:
        sp.attach(torch.optim.AdamW(model.parameters()))
    message = str(info.value)
    assert "semi_structured' computes on cuda only, not cpu: use backend 'masked'" in message
    assert "\n" not in message
    with pytest.raises(RuntimeError, match="use backend 'masked'"):  # a forward without attach: refused too
        model(torch.zeros(1, 4, dtype=torch.long))


def test_spdf_run_refuses_it_at_start_up_on_cpu():
    from accelerate.utils import DistributedType

    from spdf.recipe import RecipeError, apply_overrides, recipe_from_dict
    from spdf.train.fsdp import check_parallelism

    recipe = recipe_from_dict(apply_overrides(
        {"version": 1, "name": "t", "model": {"name": "tiny-test"},
         "phases": [{"name": "p", "kind": "pretrain", "steps": 1, "seq_len": 8, "batch_size": 1,
                     "optimizer": {"lr": 1e-3}, "data": {"source": "stdlib"}}]},
        ["sparsity.method=nm", "sparsity.level=0.5", "sparsity.backend=semi_structured"]))
    cpu = types.SimpleNamespace(distributed_type=DistributedType.NO, device=torch.device("cpu"))
    with pytest.raises(RecipeError, match="sparsity.backend: backend 'semi_structured' computes on cuda only"):
        check_parallelism(cpu, recipe, recipe.phases, sparse=True)
    check_parallelism(cpu, recipe, recipe.phases, sparse=False)  # a dense phase does not use the backend


def test_only_2_of_4_masks_are_taken():
    with pytest.raises(ValueError, match="'nm' with n 2, m 4 only, not 'nm' with n 1, m 4"):
        spdf.sparsify(gpt(), 0.5, init=NM(1, 4), backend="semi_structured")
    with pytest.raises(ValueError, match="not 'random'"):
        spdf.sparsify(gpt(), 0.5, init="random", backend="semi_structured")
    model = gpt()
    name = "transformer.h.0.mlp.c_fc"
    shape = tuple(model.get_submodule(name).weight.shape)
    with pytest.raises(ValueError, match="does not keep exactly 2 of every 4"):
        spdf.sparsify(model, 0.5, init={name: torch.ones(shape, dtype=torch.bool)}, param_filter=[f"{name}.weight"],
                      backend="semi_structured")
    assert nm_problem(torch.tensor([[True, False, True, False]])) is None
    assert "does not divide" in nm_problem(torch.ones(2, 6, dtype=torch.bool))


def test_its_state_dict_is_the_masked_backends_so_densify_and_loading_need_nothing_new():
    semi, masked = gpt(), gpt()
    sp_semi = spdf.sparsify(semi, 0.5, init=NM(2, 4), backend="semi_structured", seed=3)
    spdf.sparsify(masked, 0.5, init=NM(2, 4), backend="masked", seed=3)
    a, b = semi.state_dict(), masked.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    weights = {n: layer.dense_weight().clone() for n, layer in sp_semi.layers.items()}
    spdf.densify(semi)
    for name, weight in weights.items():
        assert type(semi.get_submodule(name)) is torch.nn.Linear
        assert torch.equal(semi.get_submodule(name).weight, weight)


# ---- on a GPU -------------------------------------------------------------------------------------------------
@CUDA
def test_cuda_forward_and_backward_equal_the_same_weights_computed_densely():
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(256, 128)).cuda()
    mask = spdf.sparsity.nm_mask((128, 256), 2, 4, 0, "w")
    layer = SemiStructuredLinear.build(dense[0], mask.cuda(), False, 0.5)
    layer.apply_mask_()
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
        ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    assert torch.count_nonzero(layer.weight.grad[~layer.weight_mask]) == 0  # masked by the hook


@CUDA
def test_cuda_training_keeps_the_zeros_and_densifies_to_the_same_values():
    model = gpt(device="cuda")
    sp = spdf.sparsify(model, 0.5, init=NM(2, 4), backend="semi_structured")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp.attach(opt)
    idx = torch.randint(0, SHAPE["vocab_size"], (2, SHAPE["n_ctx"] + 1), device="cuda")
    autocast_steps(model, opt, idx)
    for name, layer in sp.layers.items():
        assert nm_problem(layer.mask) is None and torch.count_nonzero(layer.weight[~layer.weight_mask]) == 0, name
    weights = {n: layer.dense_weight().clone() for n, layer in sp.layers.items()}
    spdf.densify(model)
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in weights.items())


def _fsdp2_worker(rank: int, port: int, out: str) -> None:
    """One GPU, FSDP2 (a world of 1: every block and the root fully_shard-ed, weights as DTensors)."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from spdf.model import family_of

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=1)
    torch.cuda.set_device(0)
    model = gpt(device="cuda")
    sp = spdf.sparsify(model, 0.5, init=NM(2, 4), backend="semi_structured")
    mesh = init_device_mesh("cuda", (1,))
    for block in [m for m in model.modules() if isinstance(m, family_of(model).block_class)]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp.attach(opt)
    losses = autocast_steps(model, opt, _batch())
    zeros = {n: int(torch.count_nonzero(layer.weight.to_local()[~layer.weight_mask.to_local()]))
             for n, layer in sp.layers.items()}
    torch.save({"losses": losses, "zeros": zeros}, out)
    dist.destroy_process_group()


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, SHAPE["vocab_size"], (2, SHAPE["n_ctx"] + 1), generator=g).cuda()


@CUDA
def test_cuda_fsdp2_trains_like_the_unsharded_model(tmp_path):
    import torch.multiprocessing as mp
    from torch.distributed.elastic.utils.distributed import get_free_port

    mp.spawn(_fsdp2_worker, args=(get_free_port(), str(tmp_path / "fsdp2.pt")), nprocs=1, join=True)
    sharded = torch.load(tmp_path / "fsdp2.pt")
    model = gpt(device="cuda")
    sp = spdf.sparsify(model, 0.5, init=NM(2, 4), backend="semi_structured")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp.attach(opt)
    assert sharded["losses"] == pytest.approx(autocast_steps(model, opt, _batch()), abs=1e-3)
    assert sharded["zeros"] and not any(sharded["zeros"].values()), sharded["zeros"]
