"""FSDP2 in `spdf run`: accelerate's own FSDP2 path, on GPUs and (for the tests, and for users) on CPUs.

Design. `accelerate launch --config_file recipes/accelerate/fsdp-8gpu.yaml` exports the FSDP settings
(ACCELERATE_USE_FSDP, FSDP_VERSION=2, FSDP_TRANSFORMER_CLS_TO_WRAP, FSDP_ACTIVATION_CHECKPOINTING, ...) and on GPUs
accelerate's state turns them into DistributedType.FSDP: `prepare` applies `fully_shard` to every block and the
root (with the mixed-precision policy and activation checkpointing the config asks for), `no_sync`, clipping and
`save_state`/`load_state` (torch.distributed.checkpoint, SHARDED_STATE_DICT) take their FSDP2 branches. On CPU
accelerate reads the same environment but keeps its plain multi-CPU (DDP) mode: the FSDP request is dropped without
a word. `use_fsdp2_on_cpu` puts accelerate's own FSDP plugin, built from that same environment, into the state, so
a CPU run takes exactly the code path a GPU run takes (nothing of accelerate is copied or re-implemented here), and
the two-process gloo tests in tests/train/test_fsdp_run.py exercise it.

Around it, what the loop cannot do on sharded weights is done on gathered ones or refused before any work:
exports are written from a plain model rebuilt on every rank from the full (all-gathered) weights and masks
(`gathered`), and the next phase shards that model again; generation during training (eval.generate), dynamic
sparsity algorithms and the compressed backend are refused with a message that names the alternative.
"""
from __future__ import annotations

import os

import torch

from ..model import family_of
from ..recipe import Recipe, RecipeError
from ..sparsity import Sparsifier, sparsify
from ..sparsity.backends import backend_class
from ..sparsity.bitpack import unpack_bits

DDP_CONFIGS = "recipes/accelerate/ddp-8gpu.yaml, ddp-2node.yaml"


def fsdp_requested() -> bool:
    """True when the launcher asked for FSDP (accelerate launch with an FSDP config writes this variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def use_fsdp2_on_cpu(accelerator) -> None:
    """Under an FSDP2 launch on CPU processes, switch accelerate to its FSDP2 mode (it would silently run DDP)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU or not fsdp_requested():
        return
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise RecipeError(f"the launch asks for FSDP version {version}: spdf trains under FSDP2 only (set "
                          f"fsdp_version: 2 in the accelerate config, as recipes/accelerate/fsdp-8gpu.yaml does)")
    plugin = FullyShardedDataParallelPlugin()  # its settings come from the FSDP_* environment, as on a GPU
    state = accelerator.state
    # what AcceleratorState.__init__ does for an FSDP launch on GPUs
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # or the next AcceleratorState() resets it


def shard_family_blocks(accelerator, model) -> None:
    """Under FSDP2, shard each block of the model's family (its `block_class`), whatever block class the launch's
    accelerate config names (`fsdp_transformer_layer_cls_to_wrap`): the family knows its model, the config cannot.
    accelerate reads the name when it prepares the model."""
    if is_fsdp2(accelerator):
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = [family_of(model).block_class.__name__]


def is_fsdp2(accelerator) -> bool:
    return bool(getattr(accelerator, "is_fsdp2", False))


def check_parallelism(accelerator, recipe: Recipe, phases, sparse: bool) -> None:
    """Refuse, before any work, what this loop cannot keep correct under the launch's parallelism (`phases`: those
    this command runs; `sparse`: whether the model starts sparse).

    FSDP1 and DeepSpeed ZeRO step flat copies of the weights that no mask reaches (Sparsifier.attach refuses them
    too, later and less readably); FSDP1 is refused for dense phases as well (their export would need its gathered
    weights). Under FSDP2 static masks on a backend that declares `supports_fsdp2` (all of the registry's) are
    supported; the rest is refused here."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    device_problem = backend_class(recipe.sparsity.backend).device_problem(accelerator.device.type)
    if sparse and device_problem:
        raise RecipeError(f"sparsity.backend: {device_problem}")
    if kind == DistributedType.FSDP and not is_fsdp2(accelerator):
        # dense phases too: exports are written from FSDP2's gathered weights only
        why = " (it steps flat copies of the weights that no mask reaches)" if sparse else ""
        raise RecipeError(f"spdf run does not run under FSDP1{why}: set fsdp_version: 2 "
                          f"(recipes/accelerate/fsdp-8gpu.yaml) or use a DDP config ({DDP_CONFIGS})")
    if kind == DistributedType.DEEPSPEED and sparse:
        raise RecipeError(f"sparse phases do not run under DeepSpeed: it steps flat copies of the weights that no "
                          f"mask reaches. Launch with recipes/accelerate/fsdp-8gpu.yaml (FSDP2) or a DDP config "
                          f"({DDP_CONFIGS})")
    if not is_fsdp2(accelerator):
        return
    if sparse and recipe.sparsity.dynamic:
        raise RecipeError(f"sparsity.method '{recipe.sparsity.method}' changes masks during training, which spdf "
                          f"does not do on FSDP2-sharded weights; use method 'static' or a DDP config ({DDP_CONFIGS})")
    if sparse and not backend_class(recipe.sparsity.backend).supports_fsdp2:
        raise RecipeError(f"sparsity.backend '{recipe.sparsity.backend}' does not run under FSDP2; use backend "
                          f"'masked' (the same masks, computed densely) or a DDP config ({DDP_CONFIGS})")
    generating = [p.name for p in phases if p.eval.generate is not None]
    if generating:
        raise RecipeError(f"phases.{generating[0]}.eval.generate: generation during training is not supported "
                          f"under FSDP2 (it runs on the main process, the weights are sharded); remove the block and "
                          f"score the export afterwards with `spdf evaluate`, or use a DDP config ({DDP_CONFIGS})")


def gathered(accelerator, model, sparsifier: Sparsifier | None):
    """(plain model, its sparsifier or None) with the full weights and masks of FSDP2-sharded `model`, on every rank.

    A collective. The plain model is what exports are written from and what the next phase shards again; the
    sharded one is left to be freed. It is sparsified with the saved global masks, on the same backend and tile
    layout (a compressed or block layer's state holds its non-zeros in that layout only), and the rebuilt sparsifier
    takes the sparsifier's state: the same layers, targets, settings and step count."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    plain = family_of(model).build(model.config)
    plain_sparsifier = None
    if sparsifier is not None:
        saved = sparsifier.state_dict()
        layers = saved["layers"]
        tile = next(iter(sparsifier.layers.values())).tile or (64, 64)  # one tile for every layer (sparsify's)
        plain_sparsifier = sparsify(plain, init={n: unpack_bits(layers[n]["bits"], tuple(layers[n]["shape"]))
                                                 for n in layers},
                                    param_filter=[f"{n}.weight" for n in layers], backend=saved["config"]["backend"],
                                    tile=tile)
        plain_sparsifier.load_state_dict(saved)
    plain.load_state_dict(weights)
    return plain.to(accelerator.device), plain_sparsifier
