"""The whole model state of an FSDP2 run's sharded checkpoint, read on one CPU process without torch.distributed.

accelerate saves an FSDP2 model with torch.distributed.checkpoint (`pytorch_model_fsdp_0/`: one `.distcp` file per
rank and a `.metadata`); torch.distributed.checkpoint's own reader, without a process group and with the planner
its offline converter `dcp_to_torch_save` uses, joins every rank's shards into global tensors (weights, and the
sparse layers' global masks or non-zeros) in memory. The converter itself writes them to a file, which would then
be read back: a model-sized temporary file (~5 GB at GPT-3 XL) and the time to write and read it. `spdf inspect`, `flops`, `evaluate`, `export`
and `--from` read a sharded checkpoint through here as they read a one-process one.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import CheckpointError
from .layout import SHARDED_MODEL_DIR


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / SHARDED_MODEL_DIR).is_dir()


def read_sharded_state(directory: Path) -> dict[str, torch.Tensor]:
    """The model state dict (global tensors) saved in `directory`, a checkpoint's SHARDED_MODEL_DIR; CheckpointError
    when it cannot be read."""
    # what torch's own converter (`dcp_to_torch_save`) calls, short of its torch.save: private in name, so a torch
    # that renames them fails here loudly (ImportError), in the tests too
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}  # the planner fills it with whatever the checkpoint's metadata lists
    try:
        _load_state_dict(state, storage_reader=FileSystemReader(directory), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
        return state["model"]
    except Exception as e:  # noqa: BLE001 - a damaged .metadata or shard fails inside torch's reader in many ways
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{directory} could not be read as a sharded (FSDP2) model state: {first}") from None
