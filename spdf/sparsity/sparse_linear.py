"""SparseLinear: a linear layer with a fixed boolean mask (the "masked" backend).

The weight is stored dense with exact zeros at masked positions, so the forward pass is the plain dense matmul: no
multiply by the mask on the hot path. The zeros are kept by a post-accumulate-grad hook that zeroes masked gradient
entries as they accumulate (before any all-reduce or clipping); the Sparsifier's optimizer hook zeroes the optimizer
state once and re-zeroes the weight after a step only where the optimizer's update rule could move a zero (see
Sparsifier). A frozen weight (requires_grad=False) gets no hook until it trains; a loaded state dict is masked as it
loads. Parameter names and shapes stay those of the layer it replaced, so
state dicts line up with the dense model's plus one `weight_mask` buffer per layer.
"""
from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from .protocol import SparseLayer
from .sharding import SUPPORTED, distributed, full, is_dtensor, local, shard_like, sharded_like, tensor_problem


class SparseLinear(SparseLayer):
    backend = "masked"
    supports_dynamic = True  # a new mask is a new buffer content; parameters and optimizer state keep their shape
    supports_fsdp2 = True  # the mask is sharded like the weight (shard_mask)
    dense_compute = True  # the forward is a dense matmul over a weight with zeros

    def __init__(self, dense: nn.Module, mask: torch.Tensor, transposed: bool, target_sparsity: float,
                 zero_now: bool = True):
        """zero_now=False leaves the weight's masked entries as they are until apply_mask_(): sparsify() builds every
        layer first and zeroes only once all were built, so a failure leaves the user's weights untouched."""
        super().__init__()
        weight = dense.weight
        if mask.shape != weight.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit weight of shape {tuple(weight.shape)}")
        self.weight = weight
        self.bias = dense.bias
        self.register_buffer("weight_mask", mask.to(weight.device))
        self.transposed = transposed  # Conv1D keeps (in, out) and computes x @ W + b
        self.target_sparsity = float(target_sparsity)
        self.out_features = weight.shape[1] if transposed else weight.shape[0]
        self.in_features = weight.shape[0] if transposed else weight.shape[1]
        # The original module without its parameters: densify() puts them back into it, so users get their own type.
        shell = dense
        shell._parameters = {}
        self.__dict__["_dense_shell"] = shell
        self._hook(self.weight)
        self.optimizer_attached = False  # set by Sparsifier.attach(); an unattached training layer warns once
        self._warned_unattached = False
        # RigL's update steps: the gradient hook leaves the gradient dense until take_dense_grad() (an optimizer
        # pre-step hook, after any all-reduce) keeps a copy and masks it.
        self.keep_dense_grad = False
        self.dense_grad: torch.Tensor | None = None
        if zero_now:
            self.apply_mask_()

    @classmethod
    def build(cls, dense, mask, transposed, target_sparsity, tile=None) -> "SparseLinear":
        return cls(dense, mask, transposed, target_sparsity, zero_now=False)

    def release(self) -> None:
        self.to_dense()  # gives the dense module its parameters back and removes the hook

    # The state-dict form: the dense module's entries plus one `weight_mask` buffer per layer, in the weight's layout.
    @classmethod
    def owns_state(cls, state_dict: dict) -> bool:
        return any(k.endswith("weight_mask") for k in state_dict)

    @classmethod
    def state_masks(cls, state_dict: dict) -> dict[str, torch.Tensor]:
        return {k[: -len(".weight_mask")]: v.bool() for k, v in state_dict.items() if k.endswith(".weight_mask")}

    @classmethod
    def dense_state_dict(cls, state_dict: dict) -> dict:
        return {k: v for k, v in state_dict.items() if not k.endswith("weight_mask")}

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy and pickle bring the weight back without its hook: register it on the new tensor.
        super().__setstate__(state)
        self._hook(self.weight)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        # a weakref and a closure do not pickle; __setstate__ hooks the new weight
        state.pop("_hooked_weight", None)
        state.pop("_grad_hook", None)
        return state

    def _hook(self, weight: torch.Tensor) -> None:
        """Mask `weight`'s gradient as it accumulates. The hook holds this layer weakly: a bound method would make a
        cycle layer -> weight -> (the tensor's C++ hook table) -> layer that Python's gc cannot see, and keep a
        discarded layer, its weight and its mask alive for the life of the process (issue 19: every dense weight
        compressed by the compressed backend leaked that way). The layer holds the weight weakly too: under FSDP2
        the original full weight must be freed once fully_shard replaces it."""
        self.__dict__["_hooked_weight"] = weakref.ref(weight)
        if not weight.requires_grad:  # frozen: nothing to mask; hooked by the first training forward that needs it
            self.__dict__["_grad_hook"] = None
            return
        layer = weakref.ref(self)

        def mask_grad(param: torch.Tensor) -> None:
            alive = layer()
            if alive is not None:
                alive._mask_grad(param)

        self.__dict__["_grad_hook"] = weight.register_post_accumulate_grad_hook(mask_grad)

    def _weight_hooked(self) -> bool:
        return self.__dict__["_grad_hook"] is not None and self.__dict__["_hooked_weight"]() is self.weight

    def _follow_replaced_weight(self) -> None:
        """Called in a training forward whose weight is not hooked: FSDP2 (or FSDP1) swapped in its unsharded
        parameter, or a weight frozen at sparsify() trains now. Hook it, so gradients are masked as they
        accumulate, before any all-reduce or clipping, exactly as for a plain model."""
        if not self.optimizer_attached and distributed():
            raise RuntimeError("a SparseLinear trains under a sharding wrapper (its weight was replaced) but no "
                               "optimizer is attached: call sparsifier.attach(optimizer) after wrapping, or masked "
                               "weights train dense")
        problem = tensor_problem(self.weight, tuple(self.weight_mask.shape))
        if problem:  # attached before the wrapping: attach() could not see it
            raise RuntimeError(f"a SparseLinear cannot keep its zeros: {problem}. {SUPPORTED}")
        self._hook(self.weight)

    @property
    def mask_multiplier(self) -> torch.Tensor:
        """The bool mask viewed as uint8 (no copy): multiplying by it is ~4-10x faster on CPU than by the bool
        tensor, which makes PyTorch promote the mask to the weight's dtype on every call."""
        return self.weight_mask.view(torch.uint8)

    def _warn_unattached(self) -> None:
        warnings.warn(
            "a SparseLinear is training but no optimizer is attached: call sparsifier.attach(optimizer) "
            "so masked weights stay exactly zero",
            stacklevel=3,
        )
        self._warned_unattached = True

    def _mask_grad(self, param: torch.Tensor) -> None:
        # Gradient hooks run in the eager autograd engine, outside any torch.compile trace: a compiled model that
        # trains unattached is warned here (its forward skips the check, see forward). Under FSDP2, once the mask is
        # sharded, the hooked weight is the sharded one and FSDP2 calls this after its reduce-scatter.
        if not (self.optimizer_attached or self._warned_unattached):
            self._warn_unattached()
        if not self.keep_dense_grad:
            local(param.grad).mul_(self._local_mask(param))

    def _local_mask(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """The uint8 mask of the part of the weight (or of `like`, a tensor placed like it) this rank holds."""
        if is_dtensor(self.weight_mask):  # sharded with the weight: this rank holds exactly its part
            return self.weight_mask.to_local().view(torch.uint8)
        return shard_like(self.mask_multiplier, self.weight if like is None else like)

    @torch.no_grad()
    def shard_mask(self) -> None:
        """Under FSDP2 (the weight a DTensor): keep only this rank's shard of the mask, a DTensor placed like the
        weight, and mask the sharded gradient after FSDP2's reduce-scatter (it calls the sharded weight's
        post-accumulate-grad hooks) instead of the whole unsharded gradient before it. Masking commutes with the
        sum, so the result is the same to the bit; the mask is still a pure function of (seed, name, shape), and
        `mask`, stats and state dicts gather the global one. Called by Sparsifier.attach."""
        if not is_dtensor(self.weight) or is_dtensor(self.weight_mask):
            return
        self.weight_mask = sharded_like(self.weight_mask, self.weight)
        self._hook(self.weight)

    @torch.no_grad()
    def mask_grad_(self) -> None:
        # Gradients of a sharded weight (FSDP2 writes them to the DTensor parameter, past any hook) are masked
        # here, before the optimizer steps; a hooked weight's gradient is masked already.
        grad = self.weight.grad
        if grad is not None and not self.keep_dense_grad and not self._weight_hooked():
            local(grad).mul_(self._local_mask(grad))

    def sharding_problem(self, dynamic: bool) -> str | None:
        problem = tensor_problem(self.__dict__.get("_parameters", {}).get("weight"), tuple(self.weight_mask.shape))
        if problem is None and dynamic and is_dtensor(self.weight):
            problem = "dynamic sparsity algorithms are not supported on sharded (FSDP2) weights; use DDP or 'static'"
        return problem

    @torch.no_grad()
    def take_dense_grad(self) -> None:
        """Keep the (dense) gradient in (out, in) orientation as ``dense_grad``, then mask it for the step."""
        grad = self.weight.grad
        self.dense_grad = None if grad is None else (grad.t() if self.transposed else grad).clone()
        if grad is not None:
            grad.mul_(self.mask_multiplier)

    @property
    def mask(self) -> torch.Tensor:
        """The mask in nn.Linear orientation (out, in). A sharded mask is gathered: a collective."""
        mask = full(self.weight_mask)
        return mask.t() if self.transposed else mask

    def apply_mask_(self) -> None:
        with torch.no_grad():
            local(self.weight).mul_(self._local_mask())

    def dense_weight(self) -> torch.Tensor:
        """The weight in (out, in) orientation (a view: do not modify). A sharded weight is gathered: a collective."""
        weight = full(self.weight.detach())
        return weight.t() if self.transposed else weight

    def weight_parameters(self) -> list[nn.Parameter]:
        return [self.weight]

    def _state_tensors(self, optimizer) -> list[torch.Tensor]:
        state = optimizer.state.get(self.weight, {}) if optimizer is not None else {}
        return [v for v in state.values() if torch.is_tensor(v) and v.shape == self.weight.shape]

    @torch.no_grad()
    def enforce(self, optimizer=None) -> None:
        """Zero masked entries of the weight and of `optimizer`'s state tensors of the weight's shape."""
        # One in-place multiply by the uint8 view of the mask: faster on CPU than torch._foreach_mul_, which falls
        # back to a slow per-tensor path for mixed dtypes, and no float copy of the mask (4x its memory).
        keep = self._local_mask()
        local(self.weight).mul_(keep)
        for value in self._state_tensors(optimizer):
            local(value).mul_(keep)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor, optimizers=()) -> torch.Tensor:
        if mask.shape != self.mask.shape:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit a layer of shape "
                             f"{tuple(self.mask.shape)}")
        stored = (mask.t() if self.transposed else mask).to(self.weight_mask.device, torch.bool)
        changed = stored != full(self.weight_mask)
        changed_here = shard_like(changed, self.weight)
        local(self.weight_mask).copy_(shard_like(stored, self.weight_mask))
        self.zeros_version += 1
        # Dropped entries become zero; regrown ones were zero (masked) and start from there.
        local(self.weight).masked_fill_(changed_here, 0.0)
        for optimizer in optimizers:
            for value in self._state_tensors(optimizer):
                local(value).masked_fill_(changed_here, 0)
        return changed.t() if self.transposed else changed

    def _check_training(self) -> None:
        # Under torch.compile both checks are left out of the trace: a warning there is a graph break, and the flags
        # they read are guards that recompile the graph when they flip. The gradient hook warns compiled training.
        if not torch.compiler.is_compiling() and self.training and torch.is_grad_enabled():
            # a replaced weight (FSDP) or a frozen one that trains now; a sharded mask was hooked at attach
            if self.weight.requires_grad and not self._weight_hooked() and not is_dtensor(self.weight_mask):
                self._follow_replaced_weight()
            if self.weight.requires_grad and not (self.optimizer_attached or self._warned_unattached):
                self._warn_unattached()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_training()
        if self.transposed:  # the same arithmetic as Hugging Face's Conv1D, so densify() is bit-exact
            out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight) if self.bias is not None else (
                x.view(-1, x.size(-1)) @ self.weight)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def load_dense_weight(self, weight: torch.Tensor) -> None:
        local(self.weight).copy_(shard_like(weight.to(self.weight.dtype), self.weight))
        self.apply_mask_()
        self.zeros_version += 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # model.load_state_dict: values at masked positions (a dense checkpoint loaded with strict=False, weights
        # saved under another mask) are zeroed as they load, as sparsify() zeroes a model's initial weights, and a
        # loaded mask is the one that counts from here. The version tells the Sparsifier to re-zero the optimizer
        # state and the weights after the next step (the loaded mask may differ from the one the state was zeroed
        # for).
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.weight.is_meta:
            self.apply_mask_()
        self.zeros_version += 1

    def to_dense(self) -> nn.Module:
        """The original module type holding the same parameters (zeros in place); hooks removed."""
        if self._grad_hook is not None:
            self._grad_hook.remove()
        shell = self._dense_shell
        shell._parameters = {"weight": self.weight, "bias": self.bias}
        return shell

    def extra_repr(self) -> str:
        # a sharded mask's density needs every rank (a collective): a repr printed by one rank shows the target
        sparsity = (f"target_sparsity={self.target_sparsity:.4f} (mask sharded)" if is_dtensor(self.weight_mask)
                    else f"sparsity={1 - self.density:.4f}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{sparsity}{', transposed' if self.transposed else ''}")
