"""Batched decoding for spdf's models (of any model family: the model makes its own KV cache, `new_kv_cache`):
greedy, sampling and beam search over a KV cache.

    from spdf.eval.generate import DecodingConfig, generate
    new_tokens = generate(model, prompts, DecodingConfig.from_name("paper"), eos_id=tokenizer.eos_id)

`generate` returns, for each prompt and in prompt order, only the tokens it generated, without the EOS token or the
stop sequence that ended it. Prompts are sorted by length and decoded `batch_size` at a time, left-padded; rows that
finish leave the batch (their KV-cache rows with them), so a batch costs what its longest generation costs only for
the rows still running. Beam search follows Hugging Face transformers' (see beam_search.py).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import SpdfUserError
from .beam_search import beam_search
from .decoding import Rows, Runner, ban_repeated_ngrams, stop_hits


@dataclass(frozen=True)
class DecodingConfig:
    """How to decode. num_beams > 1 is beam search; do_sample=True is sampling; otherwise greedy.

    no_repeat_ngram_size (any mode) forbids a token that would repeat an n-gram of the prompt or the generation so
    far, as transformers does for decoder-only models. early_stopping (beam search): False stops a row when no
    running beam can beat its finished ones at the current length (transformers' default heuristic), True as soon
    as num_beams hypotheses are finished, "never" only when no beam can beat them at any length.
    Sampling draws from a torch.Generator seeded with `seed`: the same prompts, batch size and device give the same
    tokens.
    """

    max_new_tokens: int = 64
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    early_stopping: bool | str = False
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        def positive_int(key: str, minimum: int) -> None:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise SpdfUserError(f"decoding.{key} must be an integer >= {minimum}, got {value!r}")

        positive_int("max_new_tokens", 1)
        positive_int("num_beams", 1)
        positive_int("no_repeat_ngram_size", 0)
        positive_int("top_k", 0)
        positive_int("seed", 0)
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise SpdfUserError(f"decoding.temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise SpdfUserError(f"decoding.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.length_penalty, (int, float)) or not math.isfinite(self.length_penalty):
            raise SpdfUserError(f"decoding.length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never"):
            raise SpdfUserError(f"decoding.early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if self.do_sample and self.num_beams > 1:
            raise SpdfUserError("decoding: sampling (do_sample) with num_beams > 1 is not supported; choose one")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "DecodingConfig":
        if name not in DECODING_PRESETS:
            raise SpdfUserError(f"unknown decoding {name!r}; known: {', '.join(DECODING_PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise SpdfUserError(f"unknown decoding setting {unknown[0]!r}; allowed: {', '.join(sorted(fields))}")
        return dataclasses.replace(DECODING_PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DECODING_PRESETS: dict[str, DecodingConfig] = {
    # The E2E / WebNLG / DART protocol with GPT-2 (as in LoRA's and prefix-tuning's evaluations).
    "paper": DecodingConfig(num_beams=10, length_penalty=0.8, no_repeat_ngram_size=4, max_new_tokens=64),
    "greedy": DecodingConfig(max_new_tokens=64),
    "sample": DecodingConfig(do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=64),
}


def generate(
    model: nn.Module,
    prompts: list[list[int]],
    config: DecodingConfig,
    *,
    eos_id: int | None,
    batch_size: int = 16,
    stop_sequences: list[list[int]] | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Decode every prompt; return each prompt's new tokens (without EOS / stop sequence) in prompt order.

    A row stops at `eos_id`, at the end of any of `stop_sequences` (matched within the generated tokens), after
    `config.max_new_tokens`, or when its sequence fills the model's context. `device`: where the tokens go (default:
    the model's). `use_cache=False` re-reads the whole sequence every step (for tests and benchmarks). Runs under
    torch.inference_mode() inside whatever autocast the caller has entered; the model is put in eval mode meanwhile.
    """
    n_ctx, vocab = model.config.n_ctx, model.config.vocab_size
    _check_inputs(prompts, n_ctx, vocab, batch_size, stop_sequences, eos_id)
    stops = [torch.tensor(s) for s in stop_sequences or []]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stops = [s.to(device) for s in stops]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: memory peaks at once
    results: list[list[int] | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(prompts), unit="prompt", desc="generate",
                                          disable=not progress) as bar:
            generator = torch.Generator(device=device).manual_seed(config.seed) if config.do_sample else None
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                rows = Rows.left_padded([prompts[i] for i in chunk], config.max_new_tokens, n_ctx, device)
                runner = Runner(model, rows, use_cache)
                if config.num_beams > 1:
                    outputs = beam_search(runner, rows, config, eos_id, stops)
                else:
                    outputs = _decode_one_beam(runner, rows, config, eos_id, stops, generator)
                for i, out in zip(chunk, outputs):
                    results[i] = out
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return results


def _check_inputs(prompts, n_ctx: int, vocab: int, batch_size: int, stop_sequences, eos_id) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SpdfUserError(f"batch_size must be a positive integer, got {batch_size!r}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise SpdfUserError(f"prompt {i} is empty: generation needs at least one token to start from")
        if len(prompt) > n_ctx:
            raise SpdfUserError(f"prompt {i} has {len(prompt)} tokens, longer than the model's context of {n_ctx} "
                                f"tokens: truncate it")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise SpdfUserError(f"prompt {i} has a token id outside the vocabulary [0, {vocab})")
    for s in stop_sequences or []:
        if len(s) == 0 or min(s) < 0 or max(s) >= vocab:
            raise SpdfUserError(f"stop sequence {s!r} must be a non-empty list of token ids in [0, {vocab})")
    if eos_id is not None and not 0 <= eos_id < vocab:
        raise SpdfUserError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab})")


def _decode_one_beam(runner: Runner, rows: Rows, config: DecodingConfig, eos_id, stops, generator) -> list:
    """Greedy or sampled decoding; a finished row leaves the batch at once."""
    P, results = rows.prompt_width, [None] * rows.tokens.size(0)
    logits = runner.next_logits(rows, P)
    for t in range(config.max_new_tokens):
        if config.no_repeat_ngram_size:
            ban_repeated_ngrams(logits, rows.tokens[:, :P + t], rows.pad, config.no_repeat_ngram_size)
        token = _sample(logits, config, generator) if config.do_sample else logits.argmax(-1)
        rows.tokens[:, P + t] = token
        keep_len = torch.full_like(token, t + 1)  # tokens of the row to return if it stops here
        for stop in reversed(stops):  # the first listed stop sequence wins a tie
            keep_len = torch.where(stop_hits(rows.tokens[:, P:P + t], token, stop), t + 1 - len(stop), keep_len)
        if eos_id is not None:
            keep_len = torch.where(token == eos_id, t, keep_len)
        finished = (keep_len <= t) | (t + 1 >= rows.limit)
        if bool(finished.any()):
            done = finished.nonzero().flatten()
            for r, i, n in zip(done.tolist(), rows.ids[done].tolist(), keep_len[done].tolist()):
                results[i] = rows.tokens[r, P:P + n].tolist()
            alive = (~finished).nonzero().flatten()
            if alive.numel() == 0:
                break
            rows.select(alive)
            runner.select(alive)
        logits = runner.next_logits(rows, P + t + 1)
    return results


def _sample(logits: torch.Tensor, config: DecodingConfig, generator: torch.Generator) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), then a draw: transformers' order of logits warpers."""
    scores = logits / config.temperature
    if config.top_k:
        kth = scores.topk(min(config.top_k, scores.size(-1)), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # the most likely token has 0 before it and is always kept
        drop = torch.zeros_like(order, dtype=torch.bool).scatter(-1, order, mass_before >= config.top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).flatten()
