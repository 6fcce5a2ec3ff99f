"""The `llama` family: spdf.model.llama.Llama (RMSNorm, RoPE, SwiGLU, grouped-query attention; SmolLM2, TinyLlama,
Llama-3.2 shapes) and Hugging Face LlamaForCausalLM, whose module names and layouts it shares.

FLOPs under spdf.flops' conventions: qkv counts Q (d_model -> n_head·d_head) and the narrower K and V (d_model ->
n_kv_head·d_head each, grouped-query attention); mlp_in is SwiGLU's two input matrices (gate_proj, up_proj), mlp_out
down_proj; attention scores are counted per query head (a shared K/V head still scores against each of its queries).
"""
from __future__ import annotations

from ..llama import PROJECTIONS, SPARSE_FILTER, Llama, LlamaBlock
from ..llama_config import LLAMA_CONFIGS, LlamaConfig
from . import HFAdapter, ModelFamily

# Every weight matmul of a block (the paper's sparse layers and µP's hidden weights) and its FLOP component.
ROLES = dict(zip(PROJECTIONS, ("qkv", "qkv", "qkv", "attn_out", "mlp_in", "mlp_in", "mlp_out")))


def component_weights(cfg: LlamaConfig) -> dict[str, int]:
    """Weights per weight component, summed over layers (what a density is a fraction of)."""
    L, d = cfg.n_layer, cfg.d_model
    return {"qkv": L * d * (cfg.d_attn + 2 * cfg.d_kv), "attn_out": L * cfg.d_attn * d,
            "mlp_in": L * 2 * d * cfg.d_ff, "mlp_out": L * cfg.d_ff * d}


def forward_flops(cfg: LlamaConfig, seq_len: int) -> dict[str, float]:
    """Per-token forward FLOPs (2·MACs) by component, dense; causal attention counted in full."""
    weight_flops = {c: 2 * n for c, n in component_weights(cfg).items()}  # one MAC per weight per token
    return {**weight_flops, "attn_scores": cfg.n_layer * 4 * seq_len * cfg.d_attn,
            "logits": 2 * cfg.d_model * cfg.vocab_size}


# ---- Hugging Face LlamaForCausalLM --------------------------------------------------------------------------------
# The mapping is spdf.integrations.hf_llama's (the library's own Llama <-> transformers functions); imported when
# used, so that spdf.model does not import the integrations package at start-up.
def _hf():
    from ...integrations import hf_llama

    return hf_llama


HF = HFAdapter(
    model_type="llama", label="Llama",
    config_to_hf=lambda model: _hf().hf_llama_config(model.config),
    state_to_hf=lambda model: _hf().hf_llama_state_dict(model),
    config_from_hf=lambda hf: _hf().llama_config_from_hf(hf),
    state_from_hf=lambda state, config: _hf().llama_state_dict_from_hf(state, config),
    module_to_hf=lambda name: name,  # the same module names
    module_from_hf=lambda name: name if name.startswith(("model.", "lm_head")) else f"model.{name}")

FAMILY = ModelFamily(
    name="llama", config_class=LlamaConfig, model_class=Llama, configs=LLAMA_CONFIGS, default_shape="llama-tiny",
    block_class=LlamaBlock, flop_roles=ROLES, forward_flops=forward_flops, default_filter=tuple(SPARSE_FILTER),
    hidden_weights=PROJECTIONS, hf=HF)
