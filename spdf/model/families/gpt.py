"""The `gpt` family: spdf.model.gpt.GPT (GPT-2/GPT-3 shapes, Cerebras-GPT, µP variants) and Hugging Face GPT-2.

The module names are GPT-2's (`transformer.h.N.attn.c_attn`, `mlp.c_fc`, ...), so a GPT-2 state dict maps onto
spdf's by name; only GPT-2's Conv1D weights are stored transposed.
"""
from __future__ import annotations

import torch

from ..config import CONFIGS, GPTConfig
from ..gpt import GPT, HF_CONV1D_WEIGHTS, Block
from . import HFAdapter, ModelFamily

# Every weight matmul of a block and what it is for FLOP accounting; the paper sparsifies all four, and they are
# µP's hidden weights (the tied head trains as the embedding it is).
ROLES = {"attn.c_attn": "qkv", "attn.c_proj": "attn_out", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_out"}


def forward_flops(cfg: GPTConfig, seq_len: int) -> dict[str, float]:
    """Per-token forward FLOPs (2·MACs) by component; causal attention in full (spdf.flops states the convention)."""
    L, d, da, dff = cfg.n_layer, cfg.d_model, cfg.d_attn, cfg.d_ff
    return {
        "qkv": L * 2 * d * 3 * da,
        "attn_out": L * 2 * da * d,
        "mlp_in": L * 2 * d * dff,
        "mlp_out": L * 2 * dff * d,
        "attn_scores": L * 4 * seq_len * da,
        "logits": 2 * d * cfg.vocab_size,
    }


# ---- Hugging Face GPT-2 -------------------------------------------------------------------------------------------
_UNMAPPED = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
             "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
             "reorder_and_upcast_attn": (False,), "tie_word_embeddings": (True,)}
_HF_DEFAULTS = {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                "tie_word_embeddings": True}


def config_from_hf(hf: dict) -> GPTConfig:
    """The GPTConfig of a transformers GPT2Config (as a dict); what spdf's GPT cannot compute the same way is refused
    (ValueError)."""
    for key, allowed in _UNMAPPED.items():
        if hf.get(key, _HF_DEFAULTS[key]) not in allowed:
            raise ValueError(f"GPT-2 {key}={hf[key]!r} has no equivalent in spdf.GPT (allowed: {allowed})")
    dropouts = {hf.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(dropouts) != 1:
        raise ValueError(f"spdf.GPT has one dropout rate, this GPT-2 has {sorted(dropouts)}")
    try:
        return GPTConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=hf["n_embd"],
                         d_ff=hf.get("n_inner") or 4 * hf["n_embd"], n_ctx=hf["n_positions"],
                         vocab_size=hf["vocab_size"], dropout=dropouts.pop(), name="hf-gpt2")
    except KeyError as e:
        raise ValueError(f"config.json does not describe a GPT-2 model (no {e})") from None
    except ValueError as e:
        raise ValueError(f"config.json does not describe a GPT-2 model ({e})") from None


def state_from_hf(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel's (or GPT2Model's: no head, no prefix) state dict under spdf.GPT's names and layout."""
    if not any(k.startswith("transformer.") for k in state):
        state = {f"transformer.{k}": v for k, v in state.items()}
    head = state.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, state.get("transformer.wte.weight", head)):
        raise ValueError("lm_head.weight differs from the token embedding; spdf.GPT ties them")
    return {k: (v.t() if k.endswith(HF_CONV1D_WEIGHTS) else v) for k, v in state.items()
            if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers of older GPT-2 code


def _module_from_hf(name: str) -> str:
    return name if name.startswith("transformer.") else f"transformer.{name}"


HF = HFAdapter(model_type="gpt2", label="GPT-2", config_to_hf=GPT.hf_gpt2_config, state_to_hf=GPT.hf_gpt2_state_dict,
               config_from_hf=config_from_hf, state_from_hf=state_from_hf, module_to_hf=lambda name: name,
               module_from_hf=_module_from_hf)

FAMILY = ModelFamily(
    name="gpt", config_class=GPTConfig, model_class=GPT, configs=CONFIGS, default_shape="tiny", block_class=Block,
    flop_roles=ROLES, forward_flops=forward_flops, default_filter=tuple(f"*.{m}.weight" for m in ROLES),
    hidden_weights=tuple(ROLES), hf=HF)
