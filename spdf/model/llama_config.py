"""Named Llama-style shapes: public models (shapes only, no weights) and tiny configs for tests and the demo.

`LlamaConfig.from_name("llama-3.2-1b")` returns the shape; every field can be overridden
(`LlamaConfig.from_name("llama-tiny", n_ctx=256)`). The parametrization fields (sp | mup | supar, base_width,
output_mult) mean what they mean for GPTConfig (spdf.model.shape).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import SpdfUserError
from .shape import MUP_BASE_WIDTH, ParametrizedShape, named_shape

LLAMA2_VOCAB = 32000


@dataclass(frozen=True)
class LlamaConfig(ParametrizedShape):
    n_layer: int
    n_head: int
    d_model: int
    d_ff: int  # SwiGLU width: gate_proj and up_proj are d_model -> d_ff, down_proj d_ff -> d_model
    n_kv_head: int | None = None  # grouped-query attention: key/value heads, each shared by n_head / n_kv_head queries
    n_ctx: int = 2048
    vocab_size: int = LLAMA2_VOCAB
    rope_base: float = 10000.0  # RoPE's theta (Hugging Face `rope_theta`)
    norm_eps: float = 1e-5  # RMSNorm epsilon (`rms_norm_eps`)
    tie_embeddings: bool = False  # lm_head shares the token embedding (`tie_word_embeddings`)
    dropout: float = 0.0  # on the attention probabilities only, as Hugging Face Llama's attention_dropout
    name: str = "custom"
    head_dim: int | None = None  # None: d_model // n_head
    parametrization: str = "sp"
    base_width: int = MUP_BASE_WIDTH
    output_mult: float = 1.0

    def __post_init__(self):
        for key in ("n_layer", "n_head", "d_model", "d_ff", "n_ctx", "vocab_size") + (
                ("n_kv_head",) if self.n_kv_head is not None else ()) + (
                ("head_dim",) if self.head_dim is not None else ()):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpdfUserError(f"model.{key} must be a positive integer, got {value!r}")
        if self.n_head % self.kv_heads:
            raise SpdfUserError(f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.kv_heads})")
        if self.head_dim is None and self.d_model % self.n_head:
            raise SpdfUserError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head}), "
                             f"or set model.head_dim")
        if self.d_head % 2:
            raise SpdfUserError(f"the head width ({self.d_head}) must be even: RoPE rotates pairs of channels")
        if not self.rope_base > 1:
            raise SpdfUserError(f"model.rope_base must be > 1, got {self.rope_base!r}")
        if not self.norm_eps > 0:
            raise SpdfUserError(f"model.norm_eps must be > 0, got {self.norm_eps!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise SpdfUserError(f"model.tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpdfUserError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        self.check_parametrization()

    @property
    def kv_heads(self) -> int:
        """Key/value heads (n_kv_head, or n_head when unset: plain multi-head attention)."""
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def d_kv(self) -> int:
        """Output width of k_proj and of v_proj."""
        return self.kv_heads * self.d_head

    @classmethod
    def from_name(cls, name: str, **overrides) -> "LlamaConfig":
        return named_shape(LLAMA_CONFIGS, name, overrides, "Llama model name")

    def replace(self, **overrides) -> "LlamaConfig":
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _llama(name: str, n_layer: int, d_model: int, n_head: int, n_kv_head: int, d_ff: int, **kw) -> LlamaConfig:
    return LlamaConfig(n_layer=n_layer, n_head=n_head, d_model=d_model, d_ff=d_ff, n_kv_head=n_kv_head, name=name,
                       **kw)


LLAMA_CONFIGS: dict[str, LlamaConfig] = {
    c.name: c
    for c in (
        # Each from the model's config.json on the Hugging Face Hub (all head width 64, RMSNorm eps 1e-5).
        # HuggingFaceTB/SmolLM2-135M: 134,515,008 parameters.
        _llama("smollm2-135m", 30, 576, 9, 3, 1536, n_ctx=8192, vocab_size=49152, rope_base=100000.0,
               tie_embeddings=True),
        # HuggingFaceTB/SmolLM2-360M: 361,821,120 parameters.
        _llama("smollm2-360m", 32, 960, 15, 5, 2560, n_ctx=8192, vocab_size=49152, rope_base=100000.0,
               tie_embeddings=True),
        # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T: 1,100,048,384 parameters, untied head.
        _llama("tinyllama-1.1b", 22, 2048, 32, 4, 5632, n_ctx=2048, vocab_size=LLAMA2_VOCAB, rope_base=10000.0),
        # meta-llama/Llama-3.2-1B: 1,235,814,400 parameters. Its config says max_position_embeddings 131072, reached
        # by "llama3" RoPE scaling (factor 32 over original_max_position_embeddings 8192), which spdf does not
        # model: the context here is the 8192 positions plain RoPE at theta 500000 covers.
        _llama("llama-3.2-1b", 16, 2048, 32, 8, 8192, n_ctx=8192, vocab_size=128256, rope_base=500000.0,
               tie_embeddings=True),
        # Tiny shapes: `llama-tiny` for the offline demo, `llama-tiny-test` (grouped-query) for unit tests.
        _llama("llama-tiny", 4, 128, 4, 2, 352, n_ctx=128, vocab_size=4096, tie_embeddings=True),
        _llama("llama-tiny-test", 2, 32, 4, 2, 96, n_ctx=64, vocab_size=128, tie_embeddings=True),
    )
}
