"""SparseLinear: a linear layer with a fixed boolean mask (the "masked" backend).

The weight is stored dense with exact zeros at masked positions, so the forward pass is the plain dense matmul: no
multiply by the mask on the hot path. The zeros are kept by two cheap in-place operations, both driven from outside:
a post-accumulate-grad hook zeroes masked gradient entries, and the Sparsifier's optimizer hook re-zeroes the weight
(and the optimizer state) after each step. Parameter names and shapes stay those of the layer it replaced, so
state dicts line up with the dense model's plus one `weight_mask` buffer per layer.
"""
from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from .protocol import SparseLayer


class SparseLinear(SparseLayer):
    supports_dynamic = True
    dense_compute = True  # the forward is a dense matmul over a weight with zeros
  # a new mask is a new buffer content; parameters and optimizer state keep their shape

    def __init__(self, dense: nn.Module, mask: torch.Tensor, transposed: bool, target_sparsity: float):
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
        self.__dict__["_grad_hook"] = self.weight.register_post_accumulate_grad_hook(self._mask_grad)
        self.optimizer_attached = False  # set by Sparsifier.attach(); an unattached training layer warns once
        self._warned_unattached = False
        # RigL's update steps: the gradient hook leaves the gradient dense until take_dense_grad() (an optimizer
        # pre-step hook, after any all-reduce) keeps a copy and masks it.
        self.keep_dense_grad = False
        self.dense_grad: torch.Tensor | None = None
        self.apply_mask_()

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy and pickle bring the weight back without its hook: register it on the new tensor.
        super().__setstate__(state)
        self.__dict__["_grad_hook"] = self.weight.register_post_accumulate_grad_hook(self._mask_grad)

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
        # trains unattached is warned here (its forward skips the check, see forward).
        if not (self.optimizer_attached or self._warned_unattached):
            self._warn_unattached()
        if not self.keep_dense_grad:
            param.grad.mul_(self.mask_multiplier)

    @torch.no_grad()
    def take_dense_grad(self) -> None:
        """Keep the (dense) gradient in (out, in) orientation as ``dense_grad``, then mask it for the step."""
        grad = self.weight.grad
        self.dense_grad = None if grad is None else (grad.t() if self.transposed else grad).clone()
        if grad is not None:
            grad.mul_(self.mask_multiplier)

    @property
    def mask(self) -> torch.Tensor:
        """The mask in nn.Linear orientation (out, in)."""
        return self.weight_mask.t() if self.transposed else self.weight_mask

    @property
    def density(self) -> float:
        return self.weight_mask.sum().item() / self.weight_mask.numel()

    def apply_mask_(self) -> None:
        with torch.no_grad():
            self.weight.mul_(self.mask_multiplier)

    def dense_weight(self) -> torch.Tensor:
        """The weight in (out, in) orientation (a view: do not modify)."""
        weight = self.weight.detach()
        return weight.t() if self.transposed else weight

    def weight_parameters(self) -> list[nn.Parameter]:
        return [self.weight]

    def _state_tensors(self, optimizer) -> list[torch.Tensor]:
        state = optimizer.state.get(self.weight, {}) if optimizer is not None else {}
        return [v for v in state.values() if torch.is_tensor(v) and v.shape == self.weight.shape]

    @torch.no_grad()
    def enforce(self, optimizer=None, zeroed_state: dict | None = None) -> None:
        """Zero masked entries of the weight and of `optimizer`'s state tensors of the weight's shape.

        With `zeroed_state` (a dict the Sparsifier keeps per optimizer of a zero-preserving type) a state tensor is
        zeroed once, when it first appears: masked gradients keep a zero state entry zero under those optimizers,
        so zeroing it every step would only cost two passes over memory (benchmarks/step_overhead.py). Weights are
        re-zeroed every step whatever the optimizer."""
        # One in-place multiply by the uint8 view of the mask: faster on CPU than torch._foreach_mul_, which falls
        # back to a slow per-tensor path for mixed dtypes.
        self.apply_mask_()
        keep = self.mask_multiplier
        for value in self._state_tensors(optimizer):
            if zeroed_state is not None:
                seen = zeroed_state.get(id(value))
                if seen is not None and seen() is value:
                    continue
                zeroed_state[id(value)] = weakref.ref(value)
            value.mul_(keep)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor, optimizers=()) -> torch.Tensor:
        if mask.shape != self.mask.shape:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit a layer of shape "
                             f"{tuple(self.mask.shape)}")
        stored = (mask.t() if self.transposed else mask).to(self.weight_mask.device, torch.bool)
        changed = stored != self.weight_mask
        self.weight_mask.copy_(stored)
        # Dropped entries become zero; regrown ones were zero (masked) and start from there.
        self.weight.masked_fill_(changed, 0.0)
        for optimizer in optimizers:
            for value in self._state_tensors(optimizer):
                value.masked_fill_(changed, 0)
        return changed.t() if self.transposed else changed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under torch.compile the check is left out of the trace: a warning there is a graph break, and the flags it
        # reads are guards that recompile the graph when they flip. The gradient hook warns compiled training instead.
        if (not torch.compiler.is_compiling() and self.training and torch.is_grad_enabled()
                and not (self.optimizer_attached or self._warned_unattached)):
            self._warn_unattached()
        if self.transposed:  # the same arithmetic as Hugging Face's Conv1D, so densify() is bit-exact
            out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight) if self.bias is not None else (
                x.view(-1, x.size(-1)) @ self.weight)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def load_dense_weight(self, weight: torch.Tensor) -> None:
        self.weight.copy_(weight)
        self.apply_mask_()

    def to_dense(self) -> nn.Module:
        """The original module type holding the same parameters (zeros in place); hooks removed."""
        self._grad_hook.remove()
        shell = self._dense_shell
        shell._parameters = {"weight": self.weight, "bias": self.bias}
        return shell

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"sparsity={1 - self.density:.4f}{', transposed' if self.transposed else ''}"
        )
