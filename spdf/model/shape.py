"""What every model family's config shares: the parametrization (standard or µP) and the named-shape lookup.

A family's frozen config dataclass mixes in `ParametrizedShape` and declares the fields it reads: `parametrization`
(sp | mup | supar), `base_width`, `output_mult`, `d_model`, `n_head` and `head_dim`. The multipliers are derived
from `width_mult = d_model / base_width`, so µP behaves identically in every family (Cerebras-GPT's µP: embeddings
x10, logits x output_mult / width_mult, attention scores / d_head; see spdf.model.config).
"""
from __future__ import annotations

import dataclasses
import difflib

from ..errors import SpdfUserError

PARAMETRIZATIONS = ("sp", "mup", "supar")

# Cerebras-GPT µP (Dey et al. 2023, the µP variants of 111M-2.7B): base width 256 (d_ff 1024), init std 0.08,
# embedding output x10, logits x output_mult / width_mult, attention scores / d_head.
MUP_BASE_WIDTH = 256
MUP_INIT_STD = 0.08
MUP_EMBEDDING_MULT = 10.0
SP_INIT_STD = 0.02  # GPT-3


class ParametrizedShape:
    """µP-derived properties of a config; `check_parametrization` validates the fields they read."""

    def check_parametrization(self) -> None:
        if self.parametrization not in PARAMETRIZATIONS:
            raise SpdfUserError(f"model.parametrization must be one of {', '.join(PARAMETRIZATIONS)}, "
                             f"got {self.parametrization!r}")
        if not isinstance(self.base_width, int) or isinstance(self.base_width, bool) or self.base_width < 1:
            raise SpdfUserError(f"model.base_width must be a positive integer, got {self.base_width!r}")
        if not self.output_mult > 0:
            raise SpdfUserError(f"model.output_mult must be > 0, got {self.output_mult!r}")

    @property
    def mup(self) -> bool:
        """µP multipliers and init (mup, and supar, whose density corrections are the trainer's)."""
        return self.parametrization != "sp"

    @property
    def width_mult(self) -> float:
        return self.d_model / self.base_width if self.mup else 1.0

    @property
    def init_std(self) -> float:
        """Std of the embeddings; hidden weights get init_std / sqrt(width_mult) (the models' reset_parameters)."""
        return MUP_INIT_STD if self.mup else SP_INIT_STD

    @property
    def embedding_mult(self) -> float:
        return MUP_EMBEDDING_MULT if self.mup else 1.0

    @property
    def logits_mult(self) -> float:
        return self.output_mult / self.width_mult if self.mup else 1.0

    @property
    def attn_scale(self) -> float | None:
        """Attention-score scale: 1/d_head under µP (keys and queries become correlated as they learn); None is
        SDPA's default 1/sqrt(d_head)."""
        return 1.0 / self.d_head if self.mup else None

    @property
    def d_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_head

    @property
    def d_attn(self) -> int:
        """Width of the concatenated query heads (d_model unless head_dim says otherwise)."""
        return self.n_head * self.d_head


def named_shape(configs: dict, name: str, overrides: dict, what: str = "model name"):
    """`configs[name]` with `overrides` applied; an unknown name is a ValueError suggesting the closest. A narrower or
    wider named model (d_model overridden, d_ff not) keeps its MLP ratio."""
    if name not in configs:
        close = difflib.get_close_matches(name, configs, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpdfUserError(f"unknown {what} {name!r}{hint}; known: {', '.join(configs)}")
    base = configs[name]
    if "d_model" in overrides and overrides.get("d_ff") is None:
        overrides = {**overrides, "d_ff": base.d_ff * overrides["d_model"] // base.d_model}
    return dataclasses.replace(base, **overrides)
