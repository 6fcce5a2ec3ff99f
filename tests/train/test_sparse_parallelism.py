"""`spdf run` refuses, before any work, the accelerate parallelisms (and, under FSDP2, the recipe settings) under which
it cannot keep a run correct; an FSDP1 launch on CPU processes, which accelerate would run as DDP, is refused too."""
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from spdf.recipe import RecipeError, apply_overrides, load_recipe
from spdf.train.fsdp import check_parallelism, use_fsdp2_on_cpu
from tiny_runs import DEMO, TINY_SETS


def _accelerator(distributed_type, fsdp2=False):
    return SimpleNamespace(distributed_type=distributed_type, is_fsdp2=fsdp2, device=torch.device("cpu"))


def _recipe(tmp_path, *sets):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(apply_overrides(yaml.safe_load(DEMO.read_text()), [*TINY_SETS, *sets])))
    return load_recipe(path)


@pytest.mark.parametrize("accelerator, named", [
    (_accelerator(DistributedType.FSDP), "FSDP1 .*"), (_accelerator(DistributedType.DEEPSPEED), "DeepSpeed")])
def test_flat_shardings_are_refused_for_sparse_runs(tmp_path, accelerator, named):
    with pytest.raises(RecipeError, match=f"under {named}: .*fsdp-8gpu.yaml.*ddp-8gpu.yaml"):
        recipe = _recipe(tmp_path, "phases.finetune.eval.generate=null")
        check_parallelism(accelerator, recipe, recipe.phases, sparse=True)


def test_fsdp1_is_refused_for_dense_runs_too_deepspeed_is_not(tmp_path):
    recipe = _recipe(tmp_path, "phases.finetune.eval.generate=null")
    with pytest.raises(RecipeError, match="under FSDP1: set fsdp_version: 2"):
        check_parallelism(_accelerator(DistributedType.FSDP), recipe, recipe.phases, sparse=False)
    check_parallelism(_accelerator(DistributedType.DEEPSPEED), recipe, recipe.phases, sparse=False)


@pytest.mark.parametrize("sets, message", [
    (["sparsity.method=rigl"], "sparsity.method 'rigl' changes masks"),
    ([], "phases.finetune.eval.generate: generation during training is not supported under FSDP2"),
])
def test_what_fsdp2_cannot_do_is_refused_by_name(tmp_path, sets, message):
    with pytest.raises(RecipeError, match=message):
        recipe = _recipe(tmp_path, *sets)
        check_parallelism(_accelerator(DistributedType.FSDP, fsdp2=True), recipe, recipe.phases, sparse=True)


def test_a_backend_that_does_not_declare_fsdp2_is_refused_under_it(tmp_path, monkeypatch):
    from spdf.sparsity.backends import backend_class

    monkeypatch.setattr(backend_class("block"), "supports_fsdp2", False)  # every registered backend declares it now
    recipe = _recipe(tmp_path, "phases.finetune.eval.generate=null", "model.d_model=128", "sparsity.method=block",
                     "sparsity.block_size=64", "sparsity.backend=block")
    with pytest.raises(RecipeError, match="sparsity.backend 'block' does not run under FSDP2; use backend 'masked'"):
        check_parallelism(_accelerator(DistributedType.FSDP, fsdp2=True), recipe, recipe.phases, sparse=True)
    check_parallelism(_accelerator(DistributedType.MULTI_CPU), recipe, recipe.phases, sparse=True)


def test_static_masked_fsdp2_and_ddp_runs_pass(tmp_path):
    recipe = _recipe(tmp_path, "phases.finetune.eval.generate=null")
    check_parallelism(_accelerator(DistributedType.FSDP, fsdp2=True), recipe, recipe.phases, sparse=True)
    generating = _recipe(tmp_path)  # its fine-tuning phase generates: fine when only pre-training runs
    pretrain = [p for p in generating.phases if p.kind == "pretrain"]
    check_parallelism(_accelerator(DistributedType.FSDP, fsdp2=True), generating, pretrain, sparse=True)
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_parallelism(_accelerator(kind), generating, generating.phases, sparse=True)


def test_an_fsdp1_launch_on_cpu_processes_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(RecipeError, match="FSDP version 1: spdf trains under FSDP2 only"):
        use_fsdp2_on_cpu(_accelerator(DistributedType.MULTI_CPU))
