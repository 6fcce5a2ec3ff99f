"""spdf.Llama <-> Hugging Face `LlamaForCausalLM`: configs and state dicts, both ways.

spdf's Llama uses LlamaForCausalLM's module names, weight layouts and RoPE convention (rotate_half over the two
halves of each head, applied to q/k as Hugging Face checkpoints store them), so a state dict crosses unchanged: no
permutation, no transpose. What one side cannot express is refused with the reason, never approximated: µP
multipliers, biases, other activations, RoPE scaling (Llama 3.1+'s "llama3", YaRN, ...), a head that is not the
embedding when the config ties them.

These functions work on dense models; an export with masks is written by sparsifying the transformers model on the
same layers (as spdf.integrations.hf_gpt2 does for GPT-2).
"""
from __future__ import annotations

import torch

from ..model.llama import Llama
from ..model.llama_config import LlamaConfig

# Hugging Face LlamaConfig defaults, for keys a config.json may leave out
_HF_DEFAULTS = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-6,
                "tie_word_embeddings": False, "max_position_embeddings": 2048, "attention_dropout": 0.0}
# rotary-embedding buffers some older checkpoints saved; recomputed from the config, never read
_ROTARY_BUFFER = "rotary_emb.inv_freq"


def hf_llama_config(cfg: LlamaConfig) -> dict:
    """Keyword arguments of `transformers.LlamaConfig` for this shape (no biases, SiLU, plain RoPE)."""
    if cfg.mup:
        raise ValueError(f"Hugging Face Llama has no µP multipliers (parametrization {cfg.parametrization!r}: "
                         f"embedding x{cfg.embedding_mult:g}, logits x{cfg.logits_mult:g}, attention 1/d_head); only "
                         f"parametrization 'sp' exports to Llama")
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
                head_dim=cfg.d_head, max_position_embeddings=cfg.n_ctx, rms_norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_base, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
                attention_bias=False, mlp_bias=False, attention_dropout=cfg.dropout, initializer_range=cfg.init_std)


def _rope_theta(hf: dict) -> float:
    """RoPE's base from either config.json layout (transformers 4: rope_theta + rope_scaling; 5: rope_parameters);
    any scaling of the frequencies is refused: spdf computes plain RoPE."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"RoPE scaling {kind!r} (rope_scaling/rope_parameters) has no equivalent in spdf.Llama, which "
                         f"computes plain RoPE")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _head_dim(hf: dict) -> int | None:
    """None where the head width is hidden_size / heads (transformers writes it either way), so that a config read
    back equals the one written and compares equal to a recipe's."""
    head_dim, hidden, heads = hf.get("head_dim"), hf.get("hidden_size"), hf.get("num_attention_heads")
    return None if head_dim is None or (heads and head_dim * heads == hidden) else head_dim


def llama_config_from_hf(hf: dict, name: str = "hf-llama") -> LlamaConfig:
    """The LlamaConfig of a transformers LlamaConfig (as config.json's dict); what spdf's Llama cannot compute the same
    way is refused with a ValueError naming the key."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"a Hugging Face {hf.get('model_type')!r} model; spdf.Llama maps onto model_type 'llama' only")
    for key, allowed in (("hidden_act", ("silu",)), ("attention_bias", (False,)), ("mlp_bias", (False,))):
        value = hf.get(key, _HF_DEFAULTS[key])
        if value not in allowed:
            raise ValueError(f"Llama {key}={value!r} has no equivalent in spdf.Llama (allowed: {allowed})")
    try:
        return LlamaConfig(n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                           d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
                           n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                           n_ctx=hf.get("max_position_embeddings", _HF_DEFAULTS["max_position_embeddings"]),
                           vocab_size=hf["vocab_size"], rope_base=_rope_theta(hf),
                           norm_eps=float(hf.get("rms_norm_eps", _HF_DEFAULTS["rms_norm_eps"])),
                           tie_embeddings=bool(hf.get("tie_word_embeddings", _HF_DEFAULTS["tie_word_embeddings"])),
                           dropout=float(hf.get("attention_dropout", _HF_DEFAULTS["attention_dropout"])),
                           head_dim=_head_dim(hf), name=name)
    except KeyError as e:
        raise ValueError(f"config.json does not describe a Llama model (no {e.args[0]!r})") from None


def hf_llama_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """This model's weights under LlamaForCausalLM's names (the same names; `lm_head.weight` always present, the
    embedding itself when tied). Needs a dense model (densify a sparse one first)."""
    return dict(model.state_dict())


def llama_state_dict_from_hf(state: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM (or LlamaModel) state dict as spdf.Llama's: the same names, `model.` added to a bare
    LlamaModel's keys, rotary buffers dropped. A tied config needs a head equal to the embedding (or none)."""
    state = {k: v for k, v in state.items() if not k.endswith(_ROTARY_BUFFER)}
    if not any(k.startswith("model.") for k in state):  # saved from LlamaModel: no head, no prefix
        state = {(k if k == "lm_head.weight" else f"model.{k}"): v for k, v in state.items()}
    embedding = state.get("model.embed_tokens.weight")
    head = state.get("lm_head.weight")
    if cfg.tie_embeddings:
        if head is not None and embedding is not None and not torch.equal(head, embedding):
            raise ValueError("lm_head.weight differs from model.embed_tokens.weight but the config ties them "
                             "(tie_word_embeddings)")
        if embedding is not None:
            state["lm_head.weight"] = embedding
    return state


def llama_from_hf(hf_config: dict, state: dict[str, torch.Tensor], name: str = "hf-llama") -> Llama:
    """An spdf.Llama holding the weights of a Hugging Face Llama (config.json's dict and its state dict); a missing
    or unexpected tensor, or one of another shape, is a ValueError naming it."""
    cfg = llama_config_from_hf(hf_config, name)
    with torch.device("meta"):  # no random init of weights about to be overwritten
        model = Llama(cfg)
    model.to_empty(device="cpu")
    if cfg.tie_embeddings:  # to_empty made a new parameter of each: one again
        model.lm_head.weight = model.model.embed_tokens.weight
    state = llama_state_dict_from_hf(state, cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{key} has shape {tuple(state[key].shape)}, the config needs {tuple(tensor.shape)}")
    model.load_state_dict(state)  # copies (into float32 parameters): nothing shared with the caller's tensors
    return model


def to_hf_llama(model: Llama):
    """A transformers LlamaForCausalLM with this (dense) model's weights."""
    import transformers

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama_config(model.config)))
    hf.load_state_dict(hf_llama_state_dict(model))
    return hf


def from_hf_llama(hf_model) -> Llama:
    """An spdf.Llama with the weights of a transformers LlamaForCausalLM (or LlamaModel)."""
    return llama_from_hf(hf_model.config.to_dict(), hf_model.state_dict())
