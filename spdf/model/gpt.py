"""A GPT in the GPT-2/GPT-3 mould: pre-LN blocks, learned positions, GELU MLP, tied embeddings, causal SDPA.

The model knows nothing of sparsity: `spdf.sparsify` finds its linear layers by name. Module names follow
GPT-2's (`transformer.h.N.attn.c_attn`, `mlp.c_fc`, ...) so the same parameter filters serve Hugging Face GPT-2.

For decoding, `forward` also takes a `KVCache` (an argument, never module state), an attention mask over the cached
and new positions (left-padded batches) and per-row position ids; training calls `model(idx, targets)` and runs
exactly the plain causal path.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .decoding import decoding_inputs, lm_result


# GPT-2's Conv1D layers store these weights (in, out); everything else has the same name and layout as here.
HF_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class KVCache:
    """Keys and values of the positions already seen, for every layer, preallocated for `max_len` positions.

    Buffers are allocated on the first write of each layer, in the dtype the keys arrive in (bf16 under autocast).
    Rows are batch rows; `select` keeps, repeats or reorders them (beam search follows parent beams, finished rows
    are dropped) with one index_select per buffer.
    """

    def __init__(self, n_layer: int, max_len: int):
        self.max_len = max_len
        self.length = 0  # positions filled, the same for every row (left padding keeps rows aligned)
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self._spare_keys: list[torch.Tensor | None] = [None] * n_layer
        self._spare_values: list[torch.Tensor | None] = [None] * n_layer

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (B, H, T, D) keys/values after `length` and return views of all positions so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        if self.keys[layer] is None:
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (an index tensor; repeats and reordering allowed).

        Beam search calls this every step. The rows are gathered into a spare buffer kept from the previous call,
        and only the filled positions are copied: a fresh allocation of this size costs more than the copy itself
        on CPU (new pages), and peak memory is the same as allocating (old and new buffer coexist either way)."""
        n = self.length
        for store, spares in ((self.keys, self._spare_keys), (self.values, self._spare_values)):
            for i, buf in enumerate(store):
                if buf is None:
                    continue
                spare = spares[i]
                if spare is None or spare.size(0) != rows.numel():
                    spare = buf.new_empty((rows.numel(),) + buf.shape[1:])
                torch.index_select(buf[:, :, :n], 0, rows, out=spare[:, :, :n])
                store[i], spares[i] = spare, buf


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        self.scale = cfg.attn_scale  # None: SDPA's 1/sqrt(d_head)
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_attn, bias=cfg.bias)  # Q, K and V projections, fused
        self.c_proj = nn.Linear(cfg.d_attn, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)
        if kv_cache is not None:
            k, v = kv_cache.write(layer, k, v)
        if mask is None:  # training (and any call without padding or past positions): plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.d_head))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), mask, kv_cache, layer))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
                wpe=nn.Embedding(cfg.n_ctx, cfg.d_model),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.d_model, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings
        self.reset_parameters()

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPT":
        return cls(GPTConfig.from_name(name, **overrides))

    def reset_parameters(self) -> None:
        """GPT-3 initialisation: N(0, 0.02) truncated at 2 std; residual output projections 0.02/sqrt(2·n_layer).

        Under µP (Cerebras-GPT): embeddings N(0, 0.08), hidden weights 0.08/sqrt(width_mult), residual output
        projections 0.08/sqrt(2·n_layer·width_mult): a hidden weight's std follows 1/sqrt(fan_in), an embedding's
        does not depend on width. The tied head is the token embedding (its 1/width readout scale is the logits
        multiplier). Under supar the trainer then rescales each sparse layer's kept weights by 1/sqrt(density)."""
        c = self.config
        hidden_std = c.init_std / math.sqrt(c.width_mult)
        residual_std = hidden_std / math.sqrt(2 * c.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and module is not self.lm_head:
                std = c.init_std if isinstance(module, nn.Embedding) else (
                    residual_std if name.endswith("c_proj") else hidden_std)
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied weight once
        return n - self.transformer.wpe.weight.numel() - self.transformer.wte.weight.numel() if non_embedding else n

    def new_kv_cache(self, max_len: int | None = None) -> KVCache:
        """An empty cache for up to `max_len` positions (default: the context)."""
        return KVCache(self.config.n_layer, max_len or self.config.n_ctx)

    def hf_gpt2_config(self) -> dict:
        """Keyword arguments of Hugging Face `transformers.GPT2Config` for this shape (tanh GELU, LayerNorm eps 1e-5,
        this model's dropout). GPT-2 has no bias-free layers and no head width other than d_model / n_head."""
        c = self.config
        if not c.bias or c.d_attn != c.d_model:
            raise ValueError("GPT-2 needs biases and d_model == n_head * head width")
        if c.mup:
            raise ValueError(f"GPT-2 has no µP multipliers (parametrization {c.parametrization!r}: embedding x"
                             f"{c.embedding_mult:g}, logits x{c.logits_mult:g}, attention 1/d_head); only "
                             f"parametrization 'sp' exports to GPT-2")
        return dict(vocab_size=c.vocab_size, n_positions=c.n_ctx, n_embd=c.d_model, n_layer=c.n_layer,
                    n_head=c.n_head, n_inner=c.d_ff, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                    resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout)

    def hf_gpt2_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under Hugging Face `GPT2LMHeadModel` names and layout (same names; its Conv1D layers
        store (in, out), so those weights are transposed). Needs a dense model (densify a sparse one first)."""
        out = {k: (v.t() if k.endswith(HF_CONV1D_WEIGHTS) else v) for k, v in self.state_dict().items()}
        out["lm_head.weight"] = out["transformer.wte.weight"]
        return out

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
        """Return (logits, loss), or (logits, kv_cache) when a cache is given.

        `targets` entries equal to -100 are ignored (prompt tokens when fine-tuning). For decoding: `kv_cache` holds
        the past positions and receives the new ones; `attention_mask` (B, past + T; 1 = token, 0 = padding) covers
        past and new positions; `positions` (B, T) are the position ids of the new tokens (default: counted from the
        mask, or from the cache length); `last_logits_only` skips the vocabulary projection of all but the last
        position.
        """
        T = idx.size(1)
        past, positions, mask = decoding_inputs(idx, targets, kv_cache, attention_mask, positions, self.config.n_ctx)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)
        if self.config.mup:
            x = x * self.config.embedding_mult
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length = past + T
        if last_logits_only:
            x = x[:, -1:]
        logits = self.lm_head(self.transformer.ln_f(x))
        if self.config.mup:
            logits = logits * self.config.logits_mult
        return lm_result(logits, targets, kv_cache)
