"""A Llama-style decoder: pre-norm RMSNorm blocks, rotary positions, SwiGLU MLP, grouped-query causal SDPA, no biases.

Like spdf.GPT it knows nothing of sparsity (`spdf.sparsify` finds its linear layers by name) and takes the same
decoding arguments (a KVCache, never module state; an attention mask for left-padded batches; per-row positions).
Module names and weight layouts are Hugging Face `LlamaForCausalLM`'s (`model.layers.N.self_attn.q_proj`,
`mlp.gate_proj`, `lm_head`, ...), and RoPE follows its convention (rotate_half over the two halves of each head, on
q/k as stored in Hugging Face checkpoints), so conversion either way copies tensors under the same names
(spdf.integrations.hf_llama).

The cache holds n_kv_head heads per layer; the grouped heads are shared inside scaled_dot_product_attention
(`enable_gqa`), never copied into the cache.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decoding import decoding_inputs, lm_result
from .gpt import KVCache
from .llama_config import LlamaConfig

# Every block's linear layers: the paper's sparse layers for this family (embeddings, norms and the head stay dense)
# and µP's hidden weights (an untied lm_head is not one: it is initialised and trained as the embedding).
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
SPARSE_FILTER = [f"model.layers.*.{p}.weight" for p in PROJECTIONS]  # spdf.sparsify's param_filter


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in float32 as Hugging Face's LlamaRMSNorm does (bf16 squares lose the small
    channels), then cast back before the weight multiplies."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, d_head: int, base: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's angles for (B, T) or (T,) position ids, shaped to broadcast over (B, H, T, d_head).

    Computed from the positions each call (a few thousand multiplies), in float32: no buffer that a meta-device
    build, `.to(bf16)` or `to_empty` could leave wrong. Frequency i of a head's first half pairs channel i with
    channel i + d_head/2 (Hugging Face's layout, `rotate_half`)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, d_head, 2, device=positions.device, dtype=torch.int64).float() / d_head))
    angles = positions.float()[..., None] * inv_freq  # (..., T, d_head/2)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    if positions.dim() == 2:  # per-row positions: (B, T, D) -> (B, 1, T, D)
        return cos[:, None], sin[:, None]
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).type_as(x)  # the projection's dtype (bf16 under autocast) for the cache


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.d_head = cfg.n_head, cfg.kv_heads, cfg.d_head
        self.scale = cfg.attn_scale  # None: SDPA's 1/sqrt(d_head)
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_attn, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_kv, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_kv, bias=False)
        self.o_proj = nn.Linear(cfg.d_attn, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.d_head).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.d_head).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.d_head).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.write(layer, k, v)
        gqa = self.n_kv_head != self.n_head
        if mask is None:  # training (and any call without padding or past positions): plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.d_head))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, kv_cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    # residual-stream output projections: initialised smaller by 1/sqrt(2·n_layer), as GPT-3's c_proj
    RESIDUAL_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(cfg.vocab_size, cfg.d_model),
                layers=nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layer)),
                norm=RMSNorm(cfg.d_model, cfg.norm_eps),
            )
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Llama":
        return cls(LlamaConfig.from_name(name, **overrides))

    def reset_parameters(self) -> None:
        """GPT-3's initialisation carried over (spdf.GPT.reset_parameters): N(0, 0.02) truncated at 2 std, the
        residual output projections (o_proj, down_proj) 0.02/sqrt(2·n_layer), RMSNorm weights 1.

        Under µP: embeddings N(0, 0.08), hidden weights 0.08/sqrt(width_mult), residual output projections
        0.08/sqrt(2·n_layer·width_mult). An untied lm_head is initialised as the embedding is (its 1/width readout
        scale is the logits multiplier), so tied and untied heads start alike."""
        c = self.config
        hidden_std = c.init_std / math.sqrt(c.width_mult)
        residual_std = hidden_std / math.sqrt(2 * c.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                if module is self.lm_head and c.tie_embeddings:
                    continue  # the embedding, initialised as such
                if isinstance(module, nn.Embedding) or module is self.lm_head:
                    std = c.init_std
                else:
                    std = residual_std if name.endswith(self.RESIDUAL_PROJECTIONS) else hidden_std
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """All parameters (a tied head counted once); non_embedding leaves out the token embedding and an untied
        head, as GPT's count leaves out its (tied) embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def new_kv_cache(self, max_len: int | None = None) -> KVCache:
        """An empty cache for up to `max_len` positions (default: the context); it stores n_kv_head heads."""
        return KVCache(self.config.n_layer, max_len or self.config.n_ctx)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        last_logits_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | KVCache | None]:
        """Return (logits, loss), or (logits, kv_cache) when a cache is given; the arguments are spdf.GPT.forward's.

        `targets` entries equal to -100 are ignored. `attention_mask` (B, past + T; 1 = token, 0 = padding) covers
        past and new positions; `positions` (B, T) default to counting from each row's first real token (left
        padding) or from the cache length."""
        T = idx.size(1)
        past, positions, mask = decoding_inputs(idx, targets, kv_cache, attention_mask, positions, self.config.n_ctx)
        x = self.model.embed_tokens(idx)
        if self.config.mup:
            x = x * self.config.embedding_mult
        rope = rotary_cos_sin(positions, self.config.d_head, self.config.rope_base, x.dtype)
        for i, block in enumerate(self.model.layers):
            x = block(x, rope, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length = past + T
        if last_logits_only:
            x = x[:, -1:]
        logits = self.lm_head(self.model.norm(x))
        if self.config.mup:
            logits = logits * self.config.logits_mult
        return lm_result(logits, targets, kv_cache)
