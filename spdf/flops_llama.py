"""Analytic FLOPs of the Llama shape, under spdf.flops' conventions (Megatron-style; see that module's docstring).

The components are flops.COMPONENTS, so a Llama's breakdown prints in the same table as a GPT's:
- qkv: Q is d_model -> n_head·d_head, but K and V are only d_model -> n_kv_head·d_head each (grouped-query attention);
- mlp_in: SwiGLU's two input matrices, gate_proj and up_proj (d_model -> d_ff each); mlp_out: down_proj;
- attn_scores: QKᵀ and AV for every *query* head (a shared K/V head still scores against each of its queries), causal
  attention counted in full, dense in a sparse run; logits: the LM head, dense.
FLOPs = 2·MACs, training = 3 × forward, a sparse weight's products scaled by its density.
"""
from __future__ import annotations

from .flops import WEIGHT_COMPONENTS, FlopBreakdown
from .model.llama import PROJECTIONS
from .model.llama_config import LlamaConfig

# module-name suffix -> FLOP component, for reading densities from a sparse Llama's masks
LLAMA_FLOP_ROLES = dict(zip(PROJECTIONS, ("qkv", "qkv", "qkv", "attn_out", "mlp_in", "mlp_in", "mlp_out")))


def llama_component_weights(cfg: LlamaConfig) -> dict[str, int]:
    """Weights per component summed over layers (what a density is a fraction of)."""
    L, d = cfg.n_layer, cfg.d_model
    return {"qkv": L * d * (cfg.d_attn + 2 * cfg.d_kv), "attn_out": L * cfg.d_attn * d,
            "mlp_in": L * 2 * d * cfg.d_ff, "mlp_out": L * cfg.d_ff * d}


def llama_dense_components(cfg: LlamaConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by component, dense."""
    weight_flops = {c: 2 * n for c, n in llama_component_weights(cfg).items()}  # one MAC per weight per token
    return {**weight_flops, "attn_scores": cfg.n_layer * 4 * seq_len * cfg.d_attn,
            "logits": 2 * cfg.d_model * cfg.vocab_size}


def analytic_llama_flops(cfg: LlamaConfig, sparsity: float = 0.0, seq_len: int | None = None,
                         densities: dict[str, float] | None = None) -> FlopBreakdown:
    """Per-token FLOPs of `cfg` with every attention projection and SwiGLU weight at `sparsity` (the paper's layout),
    or with explicit per-component `densities` (as read from a model's masks); spdf.flops.analytic_flops' contract."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    seq_len = seq_len or cfg.n_ctx
    dense = llama_dense_components(cfg, seq_len)
    density = densities or {c: 1.0 - sparsity for c in WEIGHT_COMPONENTS}
    return FlopBreakdown(seq_len, dense, {c: v * density.get(c, 1.0) for c, v in dense.items()})
