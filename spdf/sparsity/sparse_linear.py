"""SparseLinear: a linear layer with a fixed boolean mask (the "masked" backend).

The weight is stored dense with exact zeros at masked positions, so the forward pass is the plain dense matmul: no
multiply by the mask on the hot path. The zeros are kept by two cheap in-place operations, both driven from outside:
a post-accumulate-grad hook zeroes masked gradient entries, and the Sparsifier's optimizer hook re-zeroes the weight
(and the optimizer state) after each step. Parameter names and shapes stay those of the layer it replaced, so
state dicts line up with the dense model's plus one `weight_mask` buffer per layer.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


class SparseLinear(nn.Module):
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

    def _mask_grad(self, param: torch.Tensor) -> None:
        param.grad.mul_(self.mask_multiplier)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and not (self.optimizer_attached or self._warned_unattached):
            warnings.warn(
                "a SparseLinear is training but no optimizer is attached: call sparsifier.attach(optimizer) "
                "so masked weights stay exactly zero",
                stacklevel=2,
            )
            self._warned_unattached = True
        if self.transposed:  # the same arithmetic as Hugging Face's Conv1D, so densify() is bit-exact
            out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight) if self.bias is not None else (
                x.view(-1, x.size(-1)) @ self.weight)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

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
