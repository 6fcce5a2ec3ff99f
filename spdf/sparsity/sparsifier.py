"""The Sparsifier: keeps masked weights exactly zero while training, runs the sparsity algorithm, reports, saves.

    sp = spdf.sparsify(model, sparsity=0.75, init="random", seed=0)      # or algorithm=RigL(...)
    opt = torch.optim.AdamW(model.parameters(), ...)
    sp.attach(opt)          # after every real opt.step(): masked weights and optimizer state exactly zero, masks updated
    ...
    spdf.densify(model)     # plain modules again, zeros in place, every weight trainable

Everything is driven by the optimizer's own step hooks, so a user's loop needs no extra call, and a step that did not
happen (skipped by an AMP grad scaler, or a micro-batch of gradient accumulation) changes nothing and counts nothing.
"""
from __future__ import annotations

import fnmatch
import warnings

import torch
import torch.nn as nn

from .algorithms import Algorithm, Static
from .bitpack import pack_bits, unpack_bits
from .protocol import SparseLayer, sparse_layers
from .sharding import SUPPORTED, canonical_name, check_masks_agree, optimizer_problem

STATE_VERSION = 2

# Optimizers whose update leaves a state entry and a weight at exactly zero when the gradient there is zero and the
# state entry is zero (moments decay from 0 to 0, so Adam's update m / (sqrt(v) + eps) is 0 / eps; decoupled or L2
# weight decay of a zero weight is zero; SGD's momentum buffer stays 0; state they create starts at zero or as a
# copy of the masked gradient). Under these the Sparsifier zeroes weights and state once (attach, a load, a mask
# change) and does nothing after a step: re-zeroing would be a provable no-op costing passes over every sparse weight
# (benchmarks/step_overhead.py). Exact types only: a subclass may change the update rule. Any other optimizer gets
# weights and state re-zeroed after every step.
ZERO_PRESERVING = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)
TOTAL_ROW = "(all sparse layers)"


def _unwrap(optimizer):
    # accelerate's AcceleratedOptimizer (and similar wrappers) hold the real optimizer in `.optimizer`
    while not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__name__ == "AcceleratedOptimizer":
        optimizer = optimizer.optimizer
    return optimizer


def _slow_cpu_variant(optimizer) -> bool:
    """A CPU Adam/AdamW that is not fused: torch's vectorised sqrt is ~10x slower on exact zeros (AVX-512), and the
    second moment of a sparse weight is exactly zero at every masked position."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    on_cpu = any(p.device.type == "cpu" for g in optimizer.param_groups for p in g["params"])
    return on_cpu and not any(g.get("fused") for g in optimizer.param_groups)


def _use_fused_kernel(optimizer) -> bool:
    """Switch a CPU Adam/AdamW left at torch's defaults (fused and foreach unset, no state yet) to torch's fused
    kernel: the same update rule in one pass per tensor, without the slow sqrt on zeros, so a user's own loop with a
    default AdamW costs what spdf's loop does. An explicit choice is kept. Contiguous floating-point parameters only:
    torch 2.13's CPU fused kernel updates a non-contiguous parameter wrongly (spdf.train.optim says the same)."""
    groups = optimizer.param_groups
    params = [p for g in groups for p in g["params"]]
    if (not _slow_cpu_variant(optimizer) or optimizer.state or not params
            or any(g.get("fused") is not None or g.get("foreach") is not None or g.get("differentiable")
                   for g in groups)
            or not all(p.device.type == "cpu" and p.is_floating_point() and p.is_contiguous() for p in params)):
        return False
    for g in groups:
        g["fused"] = True
    optimizer.defaults["fused"] = True
    return True


class _Attached:
    """One attached optimizer: its hook handles and what the Sparsifier knows is zero in it."""

    def __init__(self, optimizer: torch.optim.Optimizer, zero_preserving: bool):
        self.optimizer = optimizer
        self.handles: list = []
        self.zero_preserving = zero_preserving
        self.versions: tuple = ()  # the layers' zeros_version when weights and state were last zeroed in full


class Sparsifier:
    """Owns the masks of a sparsified model: keeps them enforced, updates them, reports on them, saves them."""

    _hinted = False  # the fused-AdamW hint is shown once per process

    def __init__(self, model: nn.Module, config: dict, algorithm: Algorithm | None = None):
        self.model = model
        self.config = config
        self.algorithm = algorithm or Static()
        self.step = 0  # real optimizer steps seen while attached
        self.last_update: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (dropped, grown) masks
        self.mask_version = 0  # bumped whenever a mask changes (FLOP accounting caches on it)
        if self.algorithm.dynamic:
            static = [n for n, layer in self.layers.items() if not layer.supports_dynamic]
            if static:
                raise ValueError(f"sparsity algorithm {self.algorithm.name!r} changes masks during training; backend "
                                 f"'{self.layers[static[0]].backend}' keeps static masks only: use backend 'masked'")
        self._optimizers: list[_Attached] = []

    @property
    def layers(self) -> dict[str, SparseLayer]:
        """Canonical module name (wrapper prefixes stripped: the same wrapped or not) → sparse layer."""
        return {canonical_name(name): layer for name, layer in sparse_layers(self.model).items()}

    # ---- keeping the zeros, updating the masks ---------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> "Sparsifier":
        """Hook `optimizer`: after every real step masked weights and optimizer state are exactly zero (zeroed where
        the update rule could have moved them, see ZERO_PRESERVING), and the algorithm runs.

        A CPU Adam/AdamW left at torch's defaults (fused and foreach unset) is switched to fused=True: the same update
        rule, without a slow path of torch's for-loop/foreach sqrt on the zeros a sparse model's state holds.

        Wrapped optimizers (accelerate's AcceleratedOptimizer, …) are unwrapped through their `.optimizer`.
        Refuses (ValueError) a wrapping or sharding under which masked weights would train dense (FSDP1, DeepSpeed
        ZeRO), and, under torch.distributed, masks that differ across ranks (a collective: call it on every rank)."""
        problems = [f"{name}: {problem}" for name, layer in self.layers.items()
                    if (problem := layer.sharding_problem(self.algorithm.dynamic))]
        devices = [f"{name}: {problem}" for name, layer in self.layers.items()
                   if (problem := layer.device_problem(layer.weight_parameters()[0].device.type))]
        if devices:  # a GPU-only backend (semi_structured) on a CPU: it would fail at the first forward
            raise ValueError(devices[0])
        problem = optimizer_problem(optimizer)
        if problem or problems:
            shown = [problem] if problem else problems[:3] + ([f"... {len(problems) - 3} more"] if len(problems) > 3
                                                              else [])
            raise ValueError(f"masked weights would not stay zero: {'; '.join(shown)}. {SUPPORTED}; sparsify "
                             f"the bare model first, then wrap it")
        check_masks_agree({name: layer.mask for name, layer in self.layers.items()})
        for layer in self.layers.values():
            layer.shard_mask()  # under FSDP2 each rank keeps its shard of the mask from here on
        optimizer = _unwrap(optimizer)
        if self.algorithm.dynamic and self._optimizers:
            raise ValueError(f"sparsity algorithm {self.algorithm.name!r} counts the steps of one optimizer: "
                             f"detach() the attached one first")
        if not _use_fused_kernel(optimizer) and _slow_cpu_variant(optimizer) and not Sparsifier._hinted:
            Sparsifier._hinted = True
            warnings.warn("a CPU Adam/AdamW explicitly set to foreach/for-loop is attached: torch's sqrt is slow on "
                          "the exact zeros of a sparse model's AdamW state, so its steps cost more than dense ones; "
                          "leave fused/foreach unset or pass fused=True (benchmarks/results/step_overhead.md)",
                          stacklevel=2)
        attached = _Attached(optimizer, type(optimizer) in ZERO_PRESERVING)
        attached.handles = [
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_step()),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step(attached)),
            optimizer.register_load_state_dict_post_hook(lambda opt: self._rezero(attached)),
        ]
        self._optimizers.append(attached)
        for layer in self.layers.values():
            layer.optimizer_attached = True
        self._arm()
        self._rezero(attached)
        return self

    def detach(self) -> None:
        for attached in self._optimizers:
            for h in attached.handles:
                h.remove()
        self._optimizers.clear()
        for layer in self.layers.values():
            layer.keep_dense_grad = False

    @torch.no_grad()
    def enforce(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero masked entries of the weights and of `optimizer`'s state."""
        for layer in self.layers.values():
            layer.enforce(optimizer)

    @torch.no_grad()
    def _rezero(self, attached: _Attached, layers: list[SparseLayer] | None = None) -> None:
        """Zero the weights and all of `attached`'s state (attach, a loaded optimizer state, changed masks)."""
        layers = list(self.layers.values()) if layers is None else layers
        for layer in layers:
            layer.enforce(attached.optimizer)
        attached.versions = tuple(layer.zeros_version for layer in layers)

    def _keep_zeros(self, attached: _Attached, layers: list[SparseLayer]) -> None:
        """After a step: nothing to do under a zero-preserving optimizer unless a weight or mask changed outside the
        steps since the last zeroing (a load, a mask update); any other optimizer's weights and state are re-zeroed
        after every step."""
        if not attached.zero_preserving or tuple(layer.zeros_version for layer in layers) != attached.versions:
            self._rezero(attached, layers)

    def _arm(self) -> None:
        """Let the next step's gradients stay dense where the algorithm needs them (RigL's update steps only)."""
        if not self.algorithm.dynamic:  # a static algorithm never does; the flags stay False
            return
        dense = self.algorithm.needs_dense_grad(self.step + 1)
        for layer in self.layers.values():
            if layer.supports_dynamic:
                layer.keep_dense_grad = dense

    def _before_step(self) -> None:
        # Gradients are final here (accumulated, all-reduced, unscaled, clipped): keep the dense copy, then mask.
        # The layers are walked once per step (the walk costs about as much as the rest of the hooks' Python).
        self._step_layers = layers = list(self.layers.values())
        if self.algorithm.needs_dense_grad(self.step + 1):
            for layer in layers:
                layer.take_dense_grad()
        for layer in layers:
            layer.mask_grad_()  # sharded weights' gradients, which no hook reaches

    def _after_step(self, attached: _Attached) -> None:
        layers = self.__dict__.pop("_step_layers", None)
        self._keep_zeros(attached, list(self.layers.values()) if layers is None else layers)
        optimizer = attached.optimizer
        if attached is not self._optimizers[0]:
            return  # only the first attached optimizer counts steps
        # A fused optimizer under an AMP grad scaler is called even for a step the scaler skips (it skips inside,
        # given `found_inf`): that step did not happen.
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and bool(found_inf.item()):
            return
        self.step += 1
        if self.algorithm.is_update_step(self.step):
            self.update_masks()
        self._arm()

    @torch.no_grad()
    def update_masks(self) -> None:
        """One update of the algorithm after optimizer step `self.step`; optimizer state of changed entries reset."""
        seed = self.config.get("seed", 0)
        optimizers = [attached.optimizer for attached in self._optimizers]
        self.last_update = {}
        for name, layer in self.layers.items():
            mask, dropped, grown = self.algorithm.new_mask(name, layer, self.step, seed)
            layer.set_mask(mask, optimizers)  # bumps its zeros_version: everything is zeroed afresh next step
            layer.dense_grad = None  # kept for this update only
            self.last_update[name] = (dropped, grown)
        self.mask_version += 1

    # ---- reporting ---------------------------------------------------------------------------------------------
    def stats(self) -> list[dict]:
        """Per-layer sparsity (see layer_stats). Sharded (FSDP2) weights are gathered: call it on every rank."""
        return layer_stats(self.model)

    # ---- masks as plain tensors ----------------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        """{parameter name: bool mask shaped like that parameter of the dense model} (e.g. `weight * mask`)."""
        return {f"{name}.weight": (layer.mask.t() if layer.transposed else layer.mask).clone()
                for name, layer in self.layers.items()}

    def load_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Install masks given as masks() gives them, or by module name in (out, in) orientation (see set_masks).

        Under a static algorithm each mask must keep as many entries as the layer's mask does now (its target
        sparsity): other masks would silently train at another sparsity than the one recorded and reported."""
        self._install_masks(masks, same_sparsity=not self.algorithm.dynamic)

    def _install_masks(self, masks: dict[str, torch.Tensor], same_sparsity: bool) -> None:
        set_masks(self.model, masks, [attached.optimizer for attached in self._optimizers], same_sparsity)
        self.mask_version += 1  # the layers' zeros_version moved too: state and weights are zeroed afresh

    # ---- saving and restoring ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        layers = {}
        for name, layer in self.layers.items():
            mask = layer.mask
            layers[name] = {"shape": list(mask.shape), "bits": pack_bits(mask), "target": layer.target_sparsity}
        return {"version": STATE_VERSION, "config": dict(self.config), "layers": layers, "step": self.step,
                "algorithm": self.algorithm.settings()}

    def load_state_dict(self, state: dict) -> None:
        """Restore masks and the step count saved by state_dict() into this (already sparsified) model."""
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"sparsifier state has version {state.get('version')!r}, expected {STATE_VERSION}")
        if state.get("algorithm", {"algorithm": "static"})["algorithm"] != self.algorithm.name:
            raise ValueError(f"sparsifier state is of algorithm {state['algorithm']['algorithm']!r}, this sparsifier "
                             f"runs {self.algorithm.name!r}")
        ours, theirs = self.layers, state["layers"]
        if set(ours) != set(theirs):
            missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
            raise ValueError(f"sparsifier state does not match the model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        for name, layer in ours.items():
            shape = tuple(theirs[name]["shape"])
            if tuple(layer.mask.shape) != shape:
                raise ValueError(f"mask of {name!r} has shape {shape}, the model's layer has {tuple(layer.mask.shape)}")
        # the saved state brings its own targets: installed as saved
        self._install_masks({name: unpack_bits(theirs[name]["bits"], tuple(theirs[name]["shape"])) for name in ours},
                            same_sparsity=False)
        for name, layer in ours.items():
            layer.target_sparsity = float(theirs[name]["target"])
        self.config = dict(state["config"])
        self.step = int(state.get("step", 0))
        self.enforce()
        for attached in self._optimizers:
            self._rezero(attached)
        self._arm()


def layer_stats(model: nn.Module) -> list[dict]:
    """Per sparse layer, then one total row (name TOTAL_ROW): shape, target and actual sparsity, non-zeros.

    `mask_sparsity` is the mask's, `actual` counts the weight's own zeros too."""
    rows = []
    for name, layer in sparse_layers(model).items():
        name = canonical_name(name)
        mask = layer.mask
        numel = mask.numel()
        nonzero = int(torch.count_nonzero(layer.dense_weight()))
        rows.append(dict(name=name, shape=tuple(mask.shape), target=layer.target_sparsity,
                         mask_sparsity=1 - int(mask.sum()) / numel, actual=1 - nonzero / numel, nnz=nonzero,
                         numel=numel))
    if rows:
        numel = sum(r["numel"] for r in rows)
        rows.append(dict(name=TOTAL_ROW, shape=None, numel=numel, nnz=sum(r["nnz"] for r in rows),
                         target=sum(r["target"] * r["numel"] for r in rows) / numel,
                         mask_sparsity=sum(r["mask_sparsity"] * r["numel"] for r in rows) / numel,
                         actual=1 - sum(r["nnz"] for r in rows) / numel))
    return rows


def set_masks(model: nn.Module, masks: dict[str, torch.Tensor], optimizers=(), same_sparsity: bool = False) -> None:
    """Install masks on every sparse layer of `model`: keyed by parameter name ("x.weight", mask shaped like that
    parameter, as Sparsifier.masks() gives them) or by module name ("x", (out, in) orientation, as exports store
    them). Entries that change start at zero, with their optimizer state reset. With same_sparsity, a mask that
    keeps another number of entries than the layer's current one is refused before any mask is installed."""
    layers, new = {canonical_name(n): layer for n, layer in sparse_layers(model).items()}, {}
    for key, mask in masks.items():
        key = canonical_name(key)
        name = key[: -len(".weight")] if key.endswith(".weight") and key not in layers else key
        if name not in layers:
            raise ValueError(f"mask for {key!r}, which is not a sparse layer of the model")
        new[name] = mask.t() if (key != name and layers[name].transposed) else mask
    missing = sorted(set(layers) - set(new))
    if missing:
        raise ValueError(f"no mask given for sparse layers {missing[:3]}")
    for name, mask in new.items() if same_sparsity else ():
        layer, kept = layers[name], int(mask.bool().sum())
        current = int(layer.mask.sum())
        if kept != current:
            raise ValueError(f"the mask for {name!r} keeps {kept} of {mask.numel()} entries (sparsity "
                             f"{1 - kept / mask.numel():.4f}), the layer keeps {current} (target sparsity "
                             f"{layer.target_sparsity:.4f}): load_masks keeps each layer's sparsity; to start from "
                             f"masks of another sparsity, sparsify the dense model with init=masks")
    for name, mask in new.items():
        layers[name].set_mask(mask.bool(), optimizers)


def matching_layers(model: nn.Module, names: str | list[str] | None) -> dict[str, SparseLayer]:
    """Sparse layers whose module or parameter name matches one of the globs (all of them for None)."""
    layers = sparse_layers(model)
    if names is None:
        return layers
    patterns = [names] if isinstance(names, str) else list(names)
    chosen = {n: layer for n, layer in layers.items()
              if any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(f"{n}.weight", p) for p in patterns)}
    if not chosen:
        raise ValueError(f"{patterns!r} matched no sparse layer; sparse layers look like {next(iter(layers), '')!r}")
    return chosen
