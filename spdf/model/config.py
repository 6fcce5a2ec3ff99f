"""Named GPT shapes: GPT-3 (Brown et al. 2020), Cerebras-GPT (also in µP), and tiny configs for tests and the demo.

`GPTConfig.from_name("gpt3-xl")` returns the shape; every field can be overridden
(`GPTConfig.from_name("tiny", n_ctx=256)`).

A config also says how the model is parametrised: `sp` (standard: GPT-3 init, 1/sqrt(d_head) attention, no
multipliers) or µP as Cerebras-GPT trained it (`mup`, and `supar`, which is µP to the model: the trainer corrects its
sparse layers by their density, see spdf.train.parametrization). µP is a function of `width_mult = d_model /
base_width`; the multipliers below are derived from it, so a narrower or wider copy of a named config stays µP.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..typed_spec import added_later, compatible_dict
from ..errors import SpdfUserError
# the parametrization's constants are every family's (spdf.model.shape); imported here by older code
from .shape import MUP_BASE_WIDTH, MUP_EMBEDDING_MULT, MUP_INIT_STD, PARAMETRIZATIONS, SP_INIT_STD  # noqa: F401
from .shape import ParametrizedShape, named_shape

GPT2_VOCAB = 50257


@dataclass(frozen=True)
class GPTConfig(ParametrizedShape):
    n_layer: int
    n_head: int
    d_model: int
    d_ff: int
    n_ctx: int = 2048
    vocab_size: int = GPT2_VOCAB
    dropout: float = 0.0
    bias: bool = True
    name: str = "custom"
    # Width of one attention head. None means d_model // n_head; GPT-3 13B (d_model 5140, 40 heads of 128) needs it.
    head_dim: int | None = None
    # Added after exports and checkpoints existed: a dict leaves them out at their defaults (to_dict).
    parametrization: str = added_later("sp")  # sp | mup | supar (module docstring)
    base_width: int = added_later(MUP_BASE_WIDTH)  # µP: the width whose hyper-parameters transfer (unused under sp)
    output_mult: float = added_later(1.0)  # µP: logits are multiplied by output_mult / width_mult

    def __post_init__(self):
        for key in ("n_layer", "n_head", "d_model", "d_ff", "n_ctx", "vocab_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpdfUserError(f"model.{key} must be a positive integer, got {value!r}")
        if self.head_dim is None and self.d_model % self.n_head:
            raise SpdfUserError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head}), or set model.head_dim"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise SpdfUserError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        self.check_parametrization()

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
        return named_shape(CONFIGS, name, overrides)  # a resized model keeps its MLP ratio (4 for every shipped one)

    def replace(self, **overrides) -> "GPTConfig":
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        """The fields as a dict. The parametrization fields, added after exports and checkpoints existed, appear only
        when they differ from their defaults: a standard model's dict is what it always was, so older checkpoints
        still resume (their layout is compared with this dict) and older readers still load newer exports."""
        return compatible_dict(self)


def _gpt(name: str, n_layer: int, d_model: int, n_head: int, **kw) -> GPTConfig:
    return GPTConfig(n_layer=n_layer, n_head=n_head, d_model=d_model, d_ff=4 * d_model, name=name, **kw)


CONFIGS: dict[str, GPTConfig] = {
    c.name: c
    for c in (
        # GPT-3 (Brown et al. 2020). XL has 16 heads: the paper's table says 24, 16 is what was trained.
        _gpt("gpt3-small", 12, 768, 12),
        _gpt("gpt3-medium", 24, 1024, 16),
        _gpt("gpt3-large", 24, 1536, 16),
        _gpt("gpt3-xl", 24, 2048, 16),
        _gpt("gpt3-2.7b", 32, 2560, 32),
        _gpt("gpt3-6.7b", 32, 4096, 32),
        _gpt("gpt3-13b", 40, 5140, 40, head_dim=128),
        # Cerebras-GPT (compute-optimal family trained on the Pile).
        _gpt("cerebras-gpt-111m", 10, 768, 12),
        _gpt("cerebras-gpt-256m", 14, 1088, 17),
        _gpt("cerebras-gpt-590m", 18, 1536, 12),
        _gpt("cerebras-gpt-1.3b", 24, 2048, 16),
        _gpt("cerebras-gpt-2.7b", 32, 2560, 32),
        _gpt("cerebras-gpt-6.7b", 32, 4096, 32),
        _gpt("cerebras-gpt-13b", 40, 5120, 40),
        # Tiny shapes: `tiny` for the offline demo, `tiny-test` for unit tests.
        _gpt("tiny", 4, 128, 4, n_ctx=128, vocab_size=4096),
        _gpt("tiny-test", 2, 32, 2, n_ctx=64, vocab_size=128),
    )
}
# Cerebras-GPT's µP variants (111M-2.7B were trained both ways): the same shapes, µP from base width 256.
CONFIGS.update({f"{name}-mup": dataclasses.replace(CONFIGS[name], name=f"{name}-mup", parametrization="mup")
                for name in ("cerebras-gpt-111m", "cerebras-gpt-256m", "cerebras-gpt-590m", "cerebras-gpt-1.3b",
                             "cerebras-gpt-2.7b")})
