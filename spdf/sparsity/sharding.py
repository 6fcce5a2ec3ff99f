"""Sparsity under data-parallel wrappers and sharding: canonical names, local mask shards, refusals, rank agreement.

spdf keeps masked weights exactly zero under DDP and FSDP2 (`torch.distributed.fsdp.fully_shard`). Under FSDP2 a
weight is a DTensor sharded over a device mesh. Until `attach` the full bool mask is a plain buffer on every rank;
attach shards it like the weight (a DTensor of the same mesh and placements, each rank holding only its piece), and
each in-place operation acts on the local shard of the weight (`to_local()`) with the matching local shard of the
mask, so no operation ever mixes a DTensor and a plain tensor.

Everything else is refused where it would otherwise train silently dense: FSDP1 (flat parameters, with or without
`use_orig_params`) and DeepSpeed ZeRO (flat fp32 partitions inside its optimizer, parameters emptied at stage 3)
update copies of the weights that no mask reaches.
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

try:  # checked on every step of every layer: imported once, not per call
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support has no sharded tensors
    DTensor = ()

# Module-name segments that wrappers insert: torch.compile (`_orig_mod`), FSDP1, activation checkpointing. DDP,
# DataParallel and DeepSpeed's engine add a leading `module`.
WRAPPER_SEGMENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
SUPPORTED = "spdf keeps masks exact under DDP and FSDP2 (torch.distributed.fsdp.fully_shard; accelerate: fsdp_version: 2)"


def canonical_name(name: str) -> str:
    """The name a parameter or module has in the bare model: wrapper segments anywhere and leading `module.`
    segments removed. Masks are seeded by it, so wrapping before or after sparsify gives the same masks."""
    parts = [p for p in name.split(".") if p not in WRAPPER_SEGMENTS]
    while len(parts) > 1 and parts[0] == "module":
        parts.pop(0)
    return ".".join(parts)


def is_dtensor(tensor) -> bool:
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: the local shard of a DTensor (in-place changes reach the DTensor), else itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full` (a plain tensor of `like`'s global shape) where `like` is a DTensor; else `full`.

    `src_data_rank=None` cuts the local copy without communication: every rank holds the same full mask."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def sharded_like(full_tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A DTensor placed like DTensor `like` whose local part is a copy of this rank's piece of `full_tensor` (the
    same on every rank): the full tensor can then be freed, each rank keeping 1/world of it."""
    from torch.distributed.tensor import DTensor as _DTensor

    # a copy, not a view that would keep the full storage alive; on the device of `like`'s own piece (CPU when FSDP2
    # offloads parameters)
    piece = shard_like(full_tensor, like).to(like.to_local().device, copy=True)
    return _DTensor.from_local(piece, like.device_mesh, like.placements, run_check=False,
                               shape=full_tensor.shape, stride=full_tensor.stride())


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for a DTensor: every rank must call it)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def _is_flat(tensor) -> bool:
    # FSDP1 marks its FlatParameter, and every original parameter it flattened into one (use_orig_params)
    return bool(getattr(tensor, "_is_flat_param", False) or getattr(tensor, "_fsdp_flattened", False))


def tensor_problem(tensor, shape: tuple) -> str | None:
    """Why masks cannot be kept on `tensor` (a weight that should have global shape `shape`), or None."""
    if tensor is None:
        return "its weight is gone (a wrapper took the parameter away: FSDP1 without use_orig_params)"
    if _is_flat(tensor):
        return "its weight is a view of an FSDP1 flat parameter"
    if not tensor.is_leaf:
        return "its weight is a view made by a wrapper, not a parameter (FSDP1)"
    if hasattr(tensor, "ds_id") or hasattr(tensor, "ds_numel"):
        return "its weight is partitioned by DeepSpeed ZeRO-3"
    if tuple(tensor.shape) != tuple(shape):
        return (f"its weight has shape {tuple(tensor.shape)} instead of {tuple(shape)} (a flat shard: FSDP1 with "
                f"use_orig_params or DeepSpeed)")
    if is_dtensor(tensor):
        from torch.distributed.tensor import Replicate, Shard

        odd = [p for p in tensor.placements if not isinstance(p, (Shard, Replicate))]
        if odd:
            return f"its weight is a DTensor with placements {tensor.placements} (only Shard and Replicate are handled)"
    return None


def model_problem(model: torch.nn.Module) -> str | None:
    """Why `model` cannot be sparsified as it is (it was sharded first), or None."""
    for name, module in model.named_modules():
        if "FullyShardedDataParallel" in type(module).__name__:
            return f"{name or 'the model'} is wrapped in FSDP1"
    for name, param in model.named_parameters():
        if is_dtensor(param):
            return f"parameter {name!r} is already sharded (a DTensor: fully_shard came first)"
        if _is_flat(param) or hasattr(param, "ds_id"):
            return f"parameter {name!r} is a flat or partitioned shard (FSDP1 or DeepSpeed)"
    return None


def optimizer_problem(optimizer) -> str | None:
    """Why an optimizer (possibly wrapped, e.g. by accelerate) cannot keep masked entries zero, or None."""
    while True:
        kind = type(optimizer).__name__
        if "DeepSpeed" in kind or "ZeroOptimizer" in kind or "ZeRO" in kind:
            return f"the optimizer is DeepSpeed's {kind}: it steps flat fp32 copies of the weights that no mask reaches"
        if isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "optimizer"):
            break
        optimizer = optimizer.optimizer
    if any(_is_flat(p) for g in optimizer.param_groups for p in g["params"]):
        return "the optimizer steps FSDP1 flat parameters, which no mask reaches"
    return None


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def distributed_world() -> int:
    return dist.get_world_size() if distributed() else 1


def check_masks_agree(masks: dict[str, torch.Tensor]) -> None:
    """Raise on every rank if any rank holds other masks than the others (a checksum per layer, all-reduced)."""
    if distributed_world() < 2:
        return
    names = sorted(masks)
    sums = [int.from_bytes(hashlib.sha256(masks[n].detach().cpu().contiguous().numpy().tobytes()).digest()[:7],
                           "little") for n in names]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def spread(values: list[int]) -> torch.Tensor:
        # one MIN all-reduce of (v, -v) gives the smallest and the largest value of every entry over the ranks
        both = torch.tensor(values + [-v for v in values], dtype=torch.int64, device=device)
        dist.all_reduce(both, op=dist.ReduceOp.MIN)
        return both[: len(values)] != -both[len(values):]

    if spread([len(names)]).any():  # the checksums below must be equally long on every rank
        raise ValueError("the number of sparse layers differs across ranks: sparsify every rank with the same "
                         "settings and model before attaching")
    differ = [names[i] for i in torch.nonzero(spread(sums)).flatten().tolist()]
    if differ:
        raise ValueError(f"the masks differ across ranks for {differ[:3]} ({len(differ)} layers): sparsify every rank "
                         f"with the same seed, settings and model before attaching")
