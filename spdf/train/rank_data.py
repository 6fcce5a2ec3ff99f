"""Pre-training data under a multi-process launch: every rank tokenizes a share of a missing cache entry.

spdf.data's preparation hands batches between ranks through files in the cache entry, so it needs a cache directory
that every rank sees. That is checked here (the main process writes a probe file, every rank looks for it); where it
does not hold (a node-local cache on several nodes), the main process prepares alone and the others wait, as before.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import torch

from ..data import build_packed_splits


def _cache_shared(accelerator, cache_dir: Path) -> bool:
    """True if every rank sees a file the main process just wrote in `cache_dir` (a collective)."""
    from accelerate.utils import broadcast_object_list

    name = broadcast_object_list([f".ranks-probe-{uuid.uuid4().hex}" if accelerator.is_main_process else None])[0]
    probe = cache_dir / name
    if accelerator.is_main_process:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe.touch()
    accelerator.wait_for_everyone()
    seen = torch.tensor([float(probe.is_file())], device=accelerator.device)
    shared = int(accelerator.reduce(seen, reduction="sum").item()) == accelerator.num_processes
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink()
    return shared


def packed_splits(accelerator, spec, tokenizer, cache_dir: Path, seq_len: int, progress: bool):
    """(train, val, meta) of `spec`, prepared by every rank of the launch where the cache directory allows."""
    if accelerator.num_processes > 1 and _cache_shared(accelerator, Path(cache_dir)):
        return build_packed_splits(spec, tokenizer, cache_dir, seq_len, progress=progress and
                                   accelerator.is_main_process, ranks=(accelerator.process_index,
                                                                       accelerator.num_processes),
                                   verify=accelerator.is_main_process)
    # one rank tokenizes (or verifies the checksums of) the entry, the others read it after
    with accelerator.main_process_first():
        return build_packed_splits(spec, tokenizer, cache_dir, seq_len, progress=progress and
                                   accelerator.is_main_process, verify=accelerator.is_main_process)
