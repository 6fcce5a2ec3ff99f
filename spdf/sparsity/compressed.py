"""CompressedSparseLinear: the "compressed" backend -- only the non-zeros are stored and trained.

Where SparseLinear keeps a dense weight with exact zeros (dense matmul, dense grads, dense AdamW state), this layer
keeps the non-zeros as one trainable vector ``values`` in the tiled format of ``spdf.kernels`` (index tensors are
buffers) and computes with ``spdf.kernels.tiled_linear``: Triton kernels on CUDA, the pure-PyTorch reference on CPU.
Weights, grads and optimizer state are all nnz-sized; masked entries cannot become non-zero because they do not
exist, so no gradient hook or optimizer hook is needed.

The state dict holds ``values``, ``bias`` (if any), the layout buffers and an extra state with shape, tile and
orientation; loading one made from a different mask resizes the buffers and ``values`` (rebuild the optimizer then).

Under FSDP2 ``values`` is sharded like any 1-D parameter (each rank holds a contiguous piece of the non-zeros) and the
layout buffers are replicated: FSDP2 all-gathers the whole vector before each forward and backward, so the kernels
always see every non-zero, and reduce-scatters its gradient after. The optimizer steps each rank's piece; there are no
masked entries to keep at zero, hence no mask to shard. What needs the whole vector outside a forward (dense_weight,
the statistics) gathers it, a collective every rank calls, as for the masked backend.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from spdf.kernels import TiledLayout, pack, tiled_linear, unpack
from spdf.kernels.layout import FIELDS

from .protocol import SparseLayer
from .sharding import full, is_dtensor, local, shard_like, tensor_problem
from .sparse_linear import SparseLinear

PREFIX = "tile_"  # layout buffers are tile_bitmap, tile_word_offsets, ...


class CompressedSparseLinear(SparseLayer):
    # A new mask means a new `values` parameter of another size: an optimizer holding the old one cannot follow.
    # Dynamic algorithms are refused for this backend (Sparsifier), and set_mask refuses under an optimizer.
    backend = "compressed"
    supports_dynamic = False
    supports_fsdp2 = True  # `values` shards like any 1-D parameter; the layout buffers are replicated
    dense_compute = False  # only kept products are computed
    stores_dense_weight = False  # `values` and tile buffers: a dense loader would not know them

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, bias: nn.Parameter | None = None,
                 tile=(64, 64), transposed: bool = False, dense_shell: nn.Module | None = None,
                 target_sparsity: float | None = None):
        """``weight``/``mask`` in nn.Linear orientation (out, in). ``transposed`` records that the dense module
        stores (in, out) (Hugging Face Conv1D): it only matters for ``to_dense``."""
        super().__init__()
        layout, values = pack(weight.detach(), mask, tile)
        self.values = nn.Parameter(values, requires_grad=weight.requires_grad)
        self.bias = bias
        for name, tensor in layout.tensors().items():
            self.register_buffer(PREFIX + name, tensor)
        self.out_features, self.in_features = layout.shape
        self.tile = layout.tile
        self.transposed = transposed
        self.target_sparsity = 1 - self.density if target_sparsity is None else float(target_sparsity)
        self.__dict__["_dense_shell"] = dense_shell  # not a submodule: holds no parameters of its own

    @classmethod
    def from_masked(cls, layer: SparseLinear, tile=(64, 64)) -> "CompressedSparseLinear":
        """Compress a SparseLinear (shares its ``bias`` parameter; ``values`` are copied from its weight)."""
        weight = layer.weight.t() if layer.transposed else layer.weight
        # the module type that SparseLinear.to_dense() returns, emptied of parameters
        shell = copy.deepcopy(layer.__dict__.get("_dense_shell"))
        return cls(weight, layer.mask, layer.bias, tile=tile, transposed=layer.transposed, dense_shell=shell,
                   target_sparsity=layer.target_sparsity)

    @classmethod
    def from_dense(cls, dense: nn.Module, mask: torch.Tensor, transposed: bool, target_sparsity: float,
                   tile=(64, 64)) -> "CompressedSparseLinear":
        """Compress a dense module (nn.Linear, Conv1D; `mask` in its weight's layout) without changing it: it keeps
        its parameters, and nothing but the bias is shared, so once the model lets go of it the dense weight is
        freed (sparsify() swaps only after every layer was built)."""
        weight = dense.weight.t() if transposed else dense.weight
        shell = copy.copy(dense)
        shell.__dict__["_parameters"] = {}  # a copy emptied of parameters; the user's module keeps its own
        return cls(weight, mask.t() if transposed else mask, dense.bias, tile=tile, transposed=transposed,
                   dense_shell=copy.deepcopy(shell), target_sparsity=target_sparsity)

    @classmethod
    def build(cls, dense, mask, transposed, target_sparsity, tile=(64, 64)) -> "CompressedSparseLinear":
        problem = cls.build_problem(mask.t() if transposed else mask, tuple(tile))
        if problem:
            raise ValueError(problem)
        return cls.from_dense(dense, mask, transposed, target_sparsity, tile=tile)

    @classmethod
    def build_problem(cls, mask: torch.Tensor, tile: tuple[int, int]) -> str | None:
        """Why sparsify() does not build a layer of this backend for `mask` ((out, in) bool), or None."""
        if not bool(mask.any()):  # nothing to train, and a run's checkpoint would drop its empty tensors
            return (f"the mask keeps none of the weight's {mask.numel()} entries, so it has nothing to train: "
                    f"lower the sparsity, or leave this layer dense with the filter")
        return None

    @classmethod
    def owns_state(cls, state_dict: dict) -> bool:
        return is_compressed_state(state_dict)

    @classmethod
    def state_masks(cls, state_dict: dict) -> dict[str, torch.Tensor]:
        return state_masks(state_dict)

    @classmethod
    def dense_state_dict(cls, state_dict: dict) -> dict:
        return dense_state_dict(state_dict)

    @property
    def layout(self) -> TiledLayout:
        return TiledLayout.from_tensors({n: getattr(self, PREFIX + n) for n in FIELDS},
                                        (self.out_features, self.in_features), self.tile, nnz=self.values.numel())

    @property
    def mask(self) -> torch.Tensor:
        """Dense bool mask in nn.Linear orientation (out, in), like ``SparseLinear.mask``."""
        return self.layout.mask()

    @property
    def density(self) -> float:
        return self.values.numel() / (self.out_features * self.in_features)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def dense_weight(self) -> torch.Tensor:
        """The dense weight in nn.Linear orientation (a new tensor, zeros at masked positions). Sharded (FSDP2)
        values are gathered: a collective."""
        return unpack(self.layout, full(self.values.detach()))

    def weight_parameters(self) -> list[nn.Parameter]:
        return [self.values]

    def enforce(self, optimizer=None) -> None:
        pass  # masked entries are not stored, so there is nothing to zero

    def sharding_problem(self, dynamic: bool) -> str | None:
        values = self.__dict__.get("_parameters", {}).get("values")
        # the layout's own count: a flat shard of `values` (FSDP1, DeepSpeed) is shorter than that; an FSDP2 DTensor
        # has the global shape (its forward sees the all-gathered whole)
        return tensor_problem(values, (int(getattr(self, PREFIX + "offsets")[-1]),))

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor, optimizers=()) -> torch.Tensor:
        """Rebuild the layout for `mask` (kept entries keep their values, new ones start at zero). Refused while an
        optimizer holds ``values``: its state would belong to the old layout."""
        current = self.mask
        if mask.shape != current.shape:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit a layer of shape {tuple(current.shape)}")
        mask = mask.to(current.device, torch.bool)
        changed = mask != current
        if not changed.any():
            return changed
        if is_dtensor(self.values):  # a new `values` of another length cannot replace a sharded parameter
            raise ValueError("the compressed backend cannot change the mask of a layer sharded by FSDP2: load masks "
                             "before fully_shard, or use backend 'masked'")
        if any(self.values in opt.state or any(self.values is p for g in opt.param_groups for p in g["params"])
               for opt in optimizers):
            raise ValueError("the compressed backend keeps its masks static while an optimizer holds its values: "
                             "load masks before building the optimizer, or use backend 'masked'")
        layout, values = pack(self.dense_weight() * mask, mask, self.tile)
        for name, tensor in layout.tensors().items():
            self._buffers[PREFIX + name] = tensor.to(current.device)
        self.values = nn.Parameter(values.to(self.values.device), requires_grad=self.values.requires_grad)
        return changed

    @torch.no_grad()
    def load_dense_weight(self, weight: torch.Tensor) -> None:
        weight = weight.t() if self.transposed else weight
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"a weight of shape {tuple(weight.shape)} does not fit a "
                             f"{(self.out_features, self.in_features)} layer")
        _, values = pack(weight.to(local(self.values).device, self.values.dtype), self.mask, self.tile)
        local(self.values).copy_(shard_like(values, self.values))  # a sharded layer: this rank's piece

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tiled_linear(x, self.values, self.layout, self.bias)

    def to_dense(self) -> nn.Module:
        """Same contract as ``SparseLinear.to_dense``: the original module type (nn.Linear, Conv1D, ...) with a
        dense weight (zeros in place, in that module's orientation; trainable unless this layer was frozen) and this
        layer's bias."""
        weight = self.dense_weight()
        if self.transposed:
            weight = weight.t().contiguous()
        shell = self._dense_shell
        if shell is None:
            shell = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              device=weight.device, dtype=weight.dtype)
        # a frozen layer stays frozen (the masked backend hands back its own parameter, frozen or not)
        shell._parameters = {"weight": nn.Parameter(weight, requires_grad=self.values.requires_grad), "bias": self.bias}
        return shell

    # ---- state dict ------------------------------------------------------------------------------------------
    # The extra state is a tensor, not a dict, so state dicts save as safetensors (accelerate checkpoints do).
    def get_extra_state(self) -> torch.Tensor:
        return _encode_extra(self.out_features, self.in_features, self.tile, self.transposed, self.target_sparsity)

    def set_extra_state(self, state) -> None:
        state = _decode_extra(state)
        if tuple(state["shape"]) != (self.out_features, self.in_features):
            raise ValueError(f"state dict is for a {tuple(state['shape'])} weight, this layer is "
                             f"{(self.out_features, self.in_features)}")
        self.tile = tuple(state["tile"])
        self.transposed = bool(state["transposed"])
        self.target_sparsity = float(state["target_sparsity"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A different mask means different index/values sizes: resize before the copy so loading just works.
        for name in (PREFIX + f for f in FIELDS):
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.shape != self._buffers[name].shape:
                self._buffers[name] = torch.empty_like(incoming, device=self._buffers[name].device)
        incoming = state_dict.get(prefix + "values")
        if incoming is not None and incoming.shape != self.values.shape:
            self.values = nn.Parameter(self.values.new_empty(incoming.shape),
                                       requires_grad=self.values.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"sparsity={1 - self.density:.4f}, tile={self.tile}, nnz={self.nnz}"
                f"{', transposed' if self.transposed else ''}")


def _encode_extra(out_features: int, in_features: int, tile, transposed: bool, target_sparsity: float) -> torch.Tensor:
    # float64 holds these integers exactly
    return torch.tensor([out_features, in_features, tile[0], tile[1], float(transposed), target_sparsity],
                        dtype=torch.float64)


def _decode_extra(state) -> dict:
    if isinstance(state, dict):  # written by an earlier version
        return {"target_sparsity": float("nan"), **state}
    out_features, in_features, tile_r, tile_c, transposed, target = state.tolist()
    return {"shape": (int(out_features), int(in_features)), "tile": (int(tile_r), int(tile_c)),
            "transposed": bool(transposed), "target_sparsity": target}


def is_compressed_state(state_dict: dict) -> bool:
    return any(k.endswith(PREFIX + "bitmap") for k in state_dict)


def stored_layout(state_dict: dict, prefix: str) -> TiledLayout | None:
    """The layout of the compressed layer saved under `prefix` (ending in "."), or None where its entries are not
    all in `state_dict`."""
    keys = [prefix + PREFIX + f for f in FIELDS] + [prefix + "_extra_state", prefix + "values"]
    if any(key not in state_dict for key in keys):
        return None
    extra = _decode_extra(state_dict[prefix + "_extra_state"])
    return TiledLayout.from_tensors({f: state_dict[prefix + PREFIX + f] for f in FIELDS}, extra["shape"],
                                    extra["tile"], nnz=state_dict[prefix + "values"].numel())


def state_masks(state_dict: dict) -> dict[str, torch.Tensor]:
    """Module name -> bool mask (out, in) of every compressed layer in a state dict."""
    masks = {}
    for key in [k for k in state_dict if k.endswith(PREFIX + "bitmap")]:
        prefix = key[: -len(PREFIX + "bitmap")]
        masks[prefix.rstrip(".")] = stored_layout(state_dict, prefix).mask()
    return masks


def dense_state_dict(state_dict: dict) -> dict:
    """A state dict with every compressed layer's entries replaced by a dense ``weight`` (in its module's
    orientation, zeros in place); the other entries (bias, ...) pass through."""
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(PREFIX + "bitmap")]:
        prefix = key[: -len(PREFIX + "bitmap")]
        extra = _decode_extra(out.pop(prefix + "_extra_state"))
        values = out.pop(prefix + "values")
        layout = TiledLayout.from_tensors({f: out.pop(prefix + PREFIX + f) for f in FIELDS}, extra["shape"],
                                          extra["tile"], nnz=values.numel())
        weight = unpack(layout.to(values.device), values)
        out[prefix + "weight"] = weight.t().contiguous() if extra["transposed"] else weight
    return out
