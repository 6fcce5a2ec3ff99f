"""`spdf run` refuses, before any work, the accelerate parallelisms under which it cannot keep a sparse run correct."""
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from spdf.recipe import RecipeError
from spdf.train.runner import check_sparse_parallelism


@pytest.mark.parametrize("distributed_type, version, named", [
    (DistributedType.FSDP, 1, "FSDP1"), (DistributedType.FSDP, 2, "FSDP2"), (DistributedType.DEEPSPEED, None, "DeepSpeed")])
def test_sharded_parallelisms_are_refused_for_sparse_runs(distributed_type, version, named):
    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version))
    with pytest.raises(RecipeError, match=f"under {named} .*ddp-8gpu.yaml"):
        check_sparse_parallelism(distributed_type, state)


@pytest.mark.parametrize("distributed_type", [DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU])
def test_ddp_and_single_process_runs_pass(distributed_type):
    check_sparse_parallelism(distributed_type, SimpleNamespace())
