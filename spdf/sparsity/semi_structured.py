"""SemiStructuredLinear: the "semi_structured" backend -- NVIDIA's 2:4 sparsity on the tensor cores (CUDA only).

Storage is the masked backend's (a dense weight with exact zeros, a `weight_mask`, the same state dict, gradients
masked by the same hook), with a fixed 2:4 mask along the input features (`sparsity.method: nm`, n=2, m=4, made at
initialisation like the paper's masks). The forward compresses the weight with torch's
`to_sparse_semi_structured` and multiplies on the sparse tensor cores; the weight's exact zeros make that compression
lossless, so the layer computes exactly what its dense weight says and densify() gives the same values.

Why not torchao's SemiSparseLinear (runtime pruning): it re-prunes the weight at every step to a pattern that is 2:4
both row- and column-wise (so dX can use the sparse kernel too) and keeps whichever entries are largest then, which
is dynamic sparsity with its own mask -- not SPDF's fixed mask, and not what densify() would then hand over. With a
row-wise 2:4 mask only the forward (x W^T) has a sparse kernel; dX = dY W and dW = dY^T X stay dense GEMMs (dW is
masked by the gradient hook). benchmarks/kernel_speed.py measures both, side by side, on a GPU.

On CPU there is no 2:4 kernel: the backend is refused with a message naming the `masked` backend, which trains the
same 2:4 masks exactly (densely).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .sharding import full
from .sparse_linear import SparseLinear

HALF = (torch.float16, torch.bfloat16)


def nm_problem(mask: torch.Tensor, n: int = 2, m: int = 4) -> str | None:
    """Why `mask` ((out, in) bool) does not keep exactly n of every m consecutive inputs, or None."""
    out_f, in_f = mask.shape
    if in_f % m:
        return f"{m} does not divide the {in_f} input features"
    if not bool((mask.reshape(out_f, in_f // m, m).sum(-1) == n).all()):
        return f"the mask does not keep exactly {n} of every {m} consecutive inputs"
    return None


def compress(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out, in), exact zeros outside its 2:4 mask, as torch's semi-structured sparse tensor (lossless)."""
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(weight)


class _SemiSparseMatmul(torch.autograd.Function):
    """y = x W^T + b with W compressed to 2:4 for the forward; dX and dW dense (W's transpose is not 2:4)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, compress(weight), bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dy @ weight if ctx.needs_input_grad[0] else None
        dw = dy.t() @ x if ctx.needs_input_grad[1] else None
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


class SemiStructuredLinear(SparseLinear):
    backend = "semi_structured"
    supports_dynamic = False  # a new mask must stay 2:4; dynamic algorithms move single weights
    # FSDP2 all-gathers the whole weight before each forward (which compresses it) and backward; the mask and the
    # gradient masking are the masked backend's, sharded like the weight
    supports_fsdp2 = True
    mask_patterns = {"nm": {"n": (2,), "m": (4,)}}
    devices = ("cuda",)
    dense_compute = True  # dX and dW are dense GEMMs (FLOP accounting charges the mask's density, as for masked)

    @classmethod
    def build(cls, dense, mask, transposed, target_sparsity, tile=None) -> "SemiStructuredLinear":
        problem = nm_problem(mask.t() if transposed else mask)
        if problem:
            raise ValueError(f"backend 'semi_structured' computes 2:4 masks only: {problem} (use sparsity.method "
                             f"'nm' with n 2, m 4, or backend 'masked')")
        return super().build(dense, mask, transposed, target_sparsity, tile)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor, optimizers=()) -> torch.Tensor:
        problem = nm_problem(mask)
        if problem:
            raise ValueError(f"backend 'semi_structured' computes 2:4 masks only: {problem}")
        return super().set_mask(mask, optimizers)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # The masked backend's state dict loads here, masks included: one that is not 2:4 is refused before anything of
        # this layer changes, as build() and set_mask() refuse it (compressing such a weight to 2:4 would silently
        # drop kept weights). Like a size mismatch it goes to error_msgs, which load_state_dict raises, strict or not.
        incoming = state_dict.get(prefix + "weight_mask")
        if incoming is not None and incoming.dim() == 2:
            mask = full(incoming).bool()  # a sharded mask (FSDP2) is gathered: every rank loads, so every rank calls
            problem = nm_problem(mask.t() if self.transposed else mask)
            if problem:
                error_msgs.append(f"{prefix}weight_mask: backend 'semi_structured' computes 2:4 masks only: {problem}; "
                                  f"this state dict holds another pattern: load it into a model sparsified with "
                                  f"backend 'masked'")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        problem = self.device_problem(x.device.type)
        if problem:
            raise RuntimeError(problem)
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        if dtype not in HALF:
            raise RuntimeError(f"backend 'semi_structured' computes in fp16 or bf16 (the 2:4 tensor cores), got "
                               f"{dtype}: train with precision bf16, or use backend 'masked'")
        self._check_training()  # as the masked layer: gradient hook on a replaced weight, attach warning
        weight = self.weight.t() if self.transposed else self.weight
        lead = x.shape[:-1]
        with torch.autocast("cuda", enabled=False):
            y = _SemiSparseMatmul.apply(x.reshape(-1, x.shape[-1]).to(dtype), weight.to(dtype).contiguous(),
                                        None if self.bias is None else self.bias.to(dtype))
        return y.reshape(*lead, self.out_features)
