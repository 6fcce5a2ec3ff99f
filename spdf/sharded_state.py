"""The whole model state of an FSDP2 run's sharded checkpoint, read on one CPU process without torch.distributed.

accelerate saves an FSDP2 model with torch.distributed.checkpoint (`pytorch_model_fsdp_0/`: one `.distcp` file per
rank and a `.metadata`); `dcp_to_torch_save`, torch's own offline converter, joins every rank's shards into global
tensors (weights, and the sparse layers' global masks or non-zeros). `spdf inspect`, `flops`, `evaluate`, `export`
and `--from` read a sharded checkpoint through here as they read a one-process one.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .errors import CheckpointError
from .layout import SHARDED_MODEL_DIR


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / SHARDED_MODEL_DIR).is_dir()


def read_sharded_state(directory: Path) -> dict[str, torch.Tensor]:
    """The model state dict (global tensors) saved in `directory`, a checkpoint's SHARDED_MODEL_DIR; CheckpointError
    when it cannot be read. The joined state passes through a temporary file (the converter's only output)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    try:
        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(directory, Path(tmp) / "model.pt")
            return torch.load(Path(tmp) / "model.pt", map_location="cpu", weights_only=True)["model"]
    except Exception as e:  # noqa: BLE001 - a damaged .metadata or shard fails inside torch's reader in many ways
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{directory} could not be read as a sharded (FSDP2) model state: {first}") from None
