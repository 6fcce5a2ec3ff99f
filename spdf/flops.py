"""FLOP accounting: analytic (per config and sparsity, or read from a model's masks) and measured (one real step).

Conventions (the paper's, and Megatron-LM's: Narayanan et al. 2021, "Efficient large-scale language model training
on GPU clusters using Megatron-LM"):
- FLOPs = 2 · multiply-accumulates; only matmuls count (embedding lookups, norms, softmax, GELU, the optimizer: 0).
- Causal attention is counted in full: QKᵀ and AV cost 2·T·d_attn each per token per layer, as if nothing were masked.
  Kaplan et al. (2020, "Scaling laws for neural language models", Table 1) count it at half (2·n_ctx·d_attn per layer
  for both products): `FlopBreakdown.kaplan_reduction` is the reduction under their count, shown beside ours.
- Training = forward + backward-data + backward-weight; each backward product costs what the forward one does.
- A matmul with a sparse weight costs its density times the dense cost, in all three products (the weight gradient
  is only needed at kept positions). Attention scores and logits have no sparse weights: they stay dense.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from .model.families import family_of
from .sparsity import sparse_layers

COMPONENTS = ("qkv", "attn_out", "mlp_in", "mlp_out", "attn_scores", "logits")
WEIGHT_COMPONENTS = COMPONENTS[:4]  # matmuls with a weight that sparsity thins
DENSE_COMPONENTS = COMPONENTS[4:]  # no weight to thin: as dense in a sparse run as in a dense one
COMPONENT_LABELS = {
    "qkv": "attention Q, K, V projections",
    "attn_out": "attention output projection",
    "mlp_in": "MLP up-projection",
    "mlp_out": "MLP down-projection",
    "attn_scores": "attention scores QKᵀ and AV (dense)",
    "logits": "logits / LM head (dense)",
}
CONVENTION = ("FLOPs = 2·MACs; causal attention counted in full (not halved), as Megatron-LM counts it (Narayanan et "
              "al. 2021; Kaplan et al. 2020 count it at half); training = 3 × forward "
              "(backward-data + backward-weight); sparse matmuls scaled by weight density")


@dataclass
class FlopBreakdown:
    """Per-token FLOPs by component, dense and with sparsity, for one sequence length."""

    seq_len: int
    dense_forward: dict[str, float] = field(default_factory=dict)
    sparse_forward: dict[str, float] = field(default_factory=dict)

    @property
    def dense_train(self) -> float:
        return 3 * sum(self.dense_forward.values())

    @property
    def sparse_train(self) -> float:
        return 3 * sum(self.sparse_forward.values())

    @property
    def dense_grad_train(self) -> float:
        """Training FLOPs per token on a step that computes the dense weight gradient of the sparse weights (RigL's
        update steps): forward and backward-data stay sparse, backward-weight is dense."""
        return self.sparse_train + sum(self.dense_forward.values()) - sum(self.sparse_forward.values())

    @property
    def reduction(self) -> float:
        return self.dense_train / self.sparse_train

    @property
    def kaplan_reduction(self) -> float:
        """The reduction with causal attention counted at half, as Kaplan et al. (2020) count it: the attention
        scores have no weight, so the halved term is dense in both runs and the reduction grows."""
        dense_half, sparse_half = self.dense_forward["attn_scores"] / 2, self.sparse_forward["attn_scores"] / 2
        return (sum(self.dense_forward.values()) - dense_half) / (sum(self.sparse_forward.values()) - sparse_half)

    def to_dict(self) -> dict:
        return dict(seq_len=self.seq_len, dense_forward=self.dense_forward, sparse_forward=self.sparse_forward,
                    dense_train_per_token=self.dense_train, sparse_train_per_token=self.sparse_train,
                    reduction=self.reduction, kaplan_reduction=self.kaplan_reduction, convention=CONVENTION)


def analytic_flops(cfg, sparsity: float = 0.0, seq_len: int | None = None,
                   densities: dict[str, float] | None = None) -> FlopBreakdown:
    """Per-token FLOPs of `cfg` (a config of any model family: the family has the formula) with every attention
    projection and MLP weight at `sparsity` (the paper's layout), or with explicit per-component `densities` (as read
    from a model's masks)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    seq_len = seq_len or cfg.n_ctx
    dense = family_of(cfg).forward_flops(cfg, seq_len)
    density = densities or {c: 1.0 - sparsity for c in WEIGHT_COMPONENTS}
    sparse = {c: v * density.get(c, 1.0) for c, v in dense.items()}
    return FlopBreakdown(seq_len, dense, sparse)


def model_flops(model: nn.Module, seq_len: int | None = None) -> FlopBreakdown:
    """Analytic FLOPs of an spdf model whose densities are read from its masks (weighted by layer size); its family
    says which matmul each sparse layer is."""
    cfg, family = model.config, family_of(model)
    kept: dict[str, float] = {}
    total: dict[str, float] = {}
    for name, layer in sparse_layers(model).items():
        component = family.role(name)
        if component is None:
            raise ValueError(f"sparse layer {name!r} is not one of the {family.name} model's attention or MLP "
                             f"projections ({', '.join(family.flop_roles)})")
        mask = layer.mask
        kept[component] = kept.get(component, 0) + float(mask.sum())
        total[component] = total.get(component, 0) + mask.numel()
    # A weight matmul costs 2 FLOPs per weight per token: its component's weights are half its forward FLOPs.
    full = {c: v / 2 for c, v in family.forward_flops(cfg, 1).items() if c in WEIGHT_COMPONENTS}
    # Layers left dense by the filter count at density 1.
    densities = {c: (kept.get(c, 0) + full[c] - total.get(c, 0)) / full[c] for c in full}
    return analytic_flops(cfg, seq_len=seq_len, densities=densities)


class TrainingFlops:
    """Per-token training FLOPs (dense-equivalent, spent) of the next optimizer step of a sparse model: follows the
    masks as a dynamic algorithm changes them (GMP's rising sparsity) and charges RigL's dense-gradient steps."""

    def __init__(self, model: nn.Module, seq_len: int, sparsifier=None):
        self.model, self.seq_len, self.sparsifier = model, seq_len, sparsifier
        self._version, self._fb = None, None

    def per_token(self) -> tuple[float, float]:
        sp = self.sparsifier
        version = sp.mask_version if sp is not None else 0
        if self._fb is None or version != self._version:
            self._fb, self._version = model_flops(self.model, self.seq_len), version
        fb = self._fb
        if sp is not None and sp.algorithm.needs_dense_grad(sp.step + 1):
            return fb.dense_train, fb.dense_grad_train
        return fb.dense_train, fb.sparse_train


def schedule_flops(cfg, sparsity: float, algorithm, steps: int, seq_len: int | None = None) -> dict:
    """Mean per-token training FLOPs over `steps` optimizer steps of `algorithm` (every sparse layer at target
    `sparsity`): GMP's sparsity as its schedule sets it each step, RigL's dense-gradient steps charged."""
    spent = 0.0
    cache: dict[float, FlopBreakdown] = {}
    # Between updates nothing changes: an update step u needs the dense gradient (RigL), and the new sparsity holds
    # from u + 1. So the schedule is stretches [start, end), each costed once (a recipe of 10^15 steps returns at
    # once; one step at a time it would not return).
    starts = sorted({1, *(b for u in algorithm.update_steps(steps) for b in (u, u + 1) if b <= steps)})
    for start, end in zip(starts, [*starts[1:], steps + 1]):
        level = algorithm.sparsity_at(start, sparsity)
        fb = cache.get(level) or cache.setdefault(level, analytic_flops(cfg, level, seq_len))
        spent += (end - start) * (fb.dense_grad_train if algorithm.needs_dense_grad(start) else fb.sparse_train)
    dense = analytic_flops(cfg, 0.0, seq_len).dense_train
    return {"algorithm": algorithm.settings(), "steps": steps, "dense_train_per_token": dense,
            "mean_spent_train_per_token": spent / steps, "reduction": dense * steps / spent}


# ---- measured FLOPs ----------------------------------------------------------------------------------------------
def _attention_forward(query, key, value, *args, out_val=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)


def _attention_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    # Our convention: backward = 2 × forward (dQ, dK, dV, dP). torch's own formulas add the recomputation of QKᵀ
    # that flash kernels do, which the paper's accounting does not count.
    return 2 * flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)


def _formulas() -> dict:
    aten = torch.ops.aten
    formulas = dict(flop_counter.flop_registry)
    formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _attention_forward  # torch counts CUDA kernels only
    for op in ("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward",
               "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_cudnn_attention_backward"):
        if hasattr(aten, op):
            formulas[getattr(aten, op)] = _attention_backward
    return formulas


_DENSITY = contextvars.ContextVar("spdf_flop_density", default=1.0)


@contextlib.contextmanager
def _density(value: float):
    token = _DENSITY.set(value)
    try:
        yield
    finally:
        _DENSITY.reset(token)


class _ScopedLinear(torch.autograd.Function):
    """y = x·Wᵀ + b whose forward and both backward matmuls run inside the layer's density scope."""

    @staticmethod
    def forward(ctx, x, weight, bias, density):
        ctx.save_for_backward(x, weight)
        ctx.density, ctx.has_bias = density, bias is not None
        with _density(density):
            return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        g2, x2 = grad_out.reshape(-1, grad_out.size(-1)), x.reshape(-1, x.size(-1))
        with _density(ctx.density):
            grad_x = (g2 @ weight).view_as(x)
            grad_w = g2.t() @ x2
        return grad_x, grad_w, (g2.sum(0) if ctx.has_bias else None), None


class FlopCount(TorchDispatchMode):
    """Counts matmul FLOPs with torch's formulas; `spent` scales each by the density of the sparse weight involved."""

    def __init__(self):
        super().__init__()
        self.formulas = _formulas()
        self.dense = 0.0
        self.spent = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            flops = formula(*args, **(kwargs or {}), out_val=out)
            self.dense += flops
            self.spent += flops * _DENSITY.get()
        return out


def measure_training_flops(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> dict:
    """Count one forward + backward of `model` on (idx, targets): dense-equivalent and actually-needed FLOPs.

    Masked layers run through a scoped matmul during the count, so every product that touches a sparse weight is
    charged at that weight's density, exactly as a sparse kernel would spend it."""
    patched = []
    for layer in sparse_layers(model).values():
        if layer.dense_compute:  # a dense matmul over a weight with zeros: charge it at the mask's density
            density = layer.density

            def forward(x, layer=layer, density=density):
                weight = layer.weight_parameters()[0]
                return _ScopedLinear.apply(x, weight.t() if layer.transposed else weight, layer.bias, density)

            layer.forward = forward
            patched.append(layer)
    try:
        with FlopCount() as counter:
            _, loss = model(idx, targets)
            loss.backward()
    finally:
        for layer in patched:
            del layer.forward
    tokens = idx.numel()
    return dict(tokens=tokens, dense=counter.dense, spent=counter.spent,
                dense_per_token=counter.dense / tokens, spent_per_token=counter.spent / tokens)


def format_table(name: str, fb: FlopBreakdown, sparsity_label: str, tokens: float | None = None) -> str:
    """The paper-style table: per component, training FLOPs per token dense vs sparse, and the reduction."""
    lines = [f"{name}: training FLOPs per token at sequence length {fb.seq_len} ({sparsity_label})",
             f"{'component':40s} {'dense':>12s} {'sparse':>12s} {'ratio':>7s}"]
    for c in COMPONENTS:
        d, s = 3 * fb.dense_forward[c], 3 * fb.sparse_forward[c]
        lines.append(f"{COMPONENT_LABELS[c]:40s} {d:12.4e} {s:12.4e} {d / s:6.2f}x")
    lines.append(f"{'total (forward + backward)':40s} {fb.dense_train:12.4e} {fb.sparse_train:12.4e} "
                 f"{fb.reduction:6.2f}x")
    if tokens:
        lines.append(f"{f'total for {tokens:.3g} tokens':40s} {fb.dense_train * tokens:12.4e} "
                     f"{fb.sparse_train * tokens:12.4e} {fb.reduction:6.2f}x")
    lines.append(f"{'with causal attention at half (Kaplan)':40s} {'':12s} {'':12s} {fb.kaplan_reduction:6.2f}x")
    lines.append(f"convention: {CONVENTION}")
    return "\n".join(lines)
