"""The recipe schema: typed, frozen dataclasses with their validation (see spdf.typed_spec for the base class,
the converter from YAML data and RecipeError).

The data, task and tokenizer settings are spdf.data's own specs (spdf.data.specs), re-exported here: the recipe
describes them once, and spdf.data takes them as they are.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Optional

from .data.specs import DataSpec, SourceSpec, TaskSpec, TokenizerSpec, docstring_task_leak
from .data.task_registry import task_splits
from .eval.generate import DecodingConfig
from .model.config import PARAMETRIZATIONS
from .model.families import DEFAULT_FAMILY, FAMILIES, ModelFamily, family_of_shape
from .typed_spec import RecipeError, Spec, added_later, at_most_one, fail, join_path, num, suggest, to_plain
from .sparsity.algorithms import ALGORITHMS
from .sparsity.backends import BACKEND_NAMES, spec_problem
from .sparsity.methods import MASK_METHODS

__all__ = ["CheckpointSpec", "DataSpec", "EvalSpec", "GenerationEvalSpec", "LoggingSpec", "ModelSpec", "OptimizerSpec",
           "PhaseSpec", "Recipe", "RecipeError", "ScheduleSpec", "SourceSpec", "SparsitySpec", "TaskSpec", "TokenizerSpec",
           "join_path", "suggest", "to_plain"]


# --------------------------------------------------------------------------------------------------- the schema
@dataclass(frozen=True, kw_only=True)
class ModelSpec(Spec):
    # One of the named shapes of the model family (spdf.model.families, `family` below); None: the family's default
    # shape (gpt: tiny, llama: llama-tiny), so `--set model.family=llama` turns a recipe naming no shape into a Llama.
    name: Optional[str] = None
    n_layer: Optional[int] = num(None, ge=1)
    n_head: Optional[int] = num(None, ge=1)
    d_model: Optional[int] = num(None, ge=1)
    d_ff: Optional[int] = num(None, ge=1)
    n_ctx: Optional[int] = num(None, ge=1)
    head_dim: Optional[int] = num(None, ge=1)
    vocab_size: Optional[int] = num(None, ge=1)  # None: take it from the tokenizer
    dropout: float = num(0.0, ge=0.0, lt=1.0)
    # sp (standard), mup (Cerebras-GPT µP) or supar (µP + SµPar's density correction of sparse layers); None: the
    # named model's (sp, or mup for cerebras-gpt-*-mup). µP is relative to base_width (None: 256, Cerebras-GPT's).
    parametrization: Optional[Literal[PARAMETRIZATIONS]] = added_later(None)
    base_width: Optional[int] = num(None, ge=1, added_later=True)
    # µP: logits x output_mult / width_mult (None: 1.0)
    output_mult: Optional[float] = num(None, gt=0.0, added_later=True)
    family: Literal[tuple(FAMILIES)] = added_later(DEFAULT_FAMILY)  # the model family: gpt, ...

    SHAPE_KEYS: ClassVar[tuple[str, ...]] = ("n_layer", "n_head", "d_model", "d_ff", "n_ctx", "head_dim")
    PARAMETRIZATION_KEYS: ClassVar[tuple[str, ...]] = ("parametrization", "base_width", "output_mult")

    def _check(self):
        family = self.model_family
        if self.name is None:  # resolved here, so the recipe (its YAML, its fingerprint) names the shape it trains
            object.__setattr__(self, "name", family.default_shape)
        if self.name not in family.configs:
            other = family_of_shape(self.name)
            if other is not None:
                fail("name", f"{{key}}: '{self.name}' is a shape of model family '{other.name}', and model.family is "
                             f"'{family.name}'; set model.family: {other.name}, or a {family.name} shape: "
                             f"{', '.join(family.configs)}")
            fail("name", f"{{key}}: unknown model '{self.name}'{suggest(self.name, family.configs)}; "
                          f"known {family.name} shapes: {', '.join(family.configs)}")

    @property
    def model_family(self) -> ModelFamily:
        return FAMILIES[self.family]

    @property
    def shape(self):
        """The named shape this spec starts from (before its overrides)."""
        return self.model_family.configs[self.name]


# Both lists come from the sparsity registries: a new mask method or algorithm needs no edit here.
MASK_INITS = tuple(MASK_METHODS)
DYNAMIC_METHODS = tuple(name for name, cls in ALGORITHMS.items() if cls.dynamic)
SPARSITY_METHODS = ("none", *MASK_INITS, *DYNAMIC_METHODS)
_DYNAMIC_DEFAULTS = {"init": "random", "update_every": 100, "update_start": 0, "update_stop": None,
                     "schedule": None, "drop_fraction": 0.3, "initial_level": 0.0}


@dataclass(frozen=True, kw_only=True)
class SparsitySpec(Spec):
    # A mask method (static masks made with it) or a dynamic algorithm (masks made with `init`, then updated).
    method: Literal[SPARSITY_METHODS] = "random"
    level: float = num(0.75, ge=0.0, lt=1.0)  # ignored when method is "none"
    filter: Optional[tuple[str, ...]] = None  # globs on parameter names, "!glob" excludes; None: the paper's default
    overrides: dict[str, float] = field(default_factory=dict)  # glob -> level
    n: int = num(2, ge=1)
    m: int = num(4, ge=2)
    block_size: int = num(16, ge=1)
    seed: Optional[int] = None  # None: the recipe seed
    backend: Literal[BACKEND_NAMES] = "masked"  # the registry's backends (spdf/sparsity/backends.py)
    # Dynamic methods only (gmp, set, rigl); steps are optimizer steps of the pre-training phase.
    # Added with the dynamic methods: the fingerprint leaves them out while they hold their defaults.
    init: Literal[MASK_INITS] = added_later("random")  # the initial mask
    update_every: int = num(100, ge=1, added_later=True)  # masks change after every update_every-th step ...
    update_start: int = num(0, ge=0, added_later=True)  # ... after this step ...
    # ... up to this step (None: 3/4 of the pre-training steps)
    update_stop: Optional[int] = num(None, ge=1, added_later=True)
    # How the drop fraction decays (set, rigl; default cosine) or the sparsity rises (gmp; default cubic), from
    # update_start to update_stop.
    schedule: Optional[Literal["constant", "linear", "cosine", "cubic"]] = added_later(None)
    drop_fraction: float = num(0.3, gt=0.0, le=1.0, added_later=True)  # set, rigl: of the kept weights, at update_start
    initial_level: float = num(0.0, ge=0.0, lt=1.0, added_later=True)  # gmp: the sparsity at update_start

    @property
    def dynamic(self) -> bool:
        return self.method in DYNAMIC_METHODS

    @property
    def mask_level(self) -> float:
        """The sparsity the masks will have: method nm fixes it at 1 - n/m, whatever `level` says."""
        return 1 - self.n / self.m if (self.init if self.dynamic else self.method) == "nm" else self.level

    def _check(self):
        if self.n >= self.m:
            fail("n", f"{{key}} must be < sparsity.m (N:M keeps n of every m weights), got n={self.n}, m={self.m}")
        for pattern, level in self.overrides.items():
            if not 0.0 <= level < 1.0:
                fail(f"overrides['{pattern}']", f"{{key}} must be in [0, 1), got {level!r}")
        for i, pattern in enumerate(self.filter or ()):
            if not pattern.lstrip("!"):
                fail(f"filter[{i}]", "{key} must be a non-empty glob pattern")
        only = {"drop_fraction": ("set", "rigl"), "initial_level": ("gmp",)}
        for key, default in _DYNAMIC_DEFAULTS.items():
            allowed = only.get(key, DYNAMIC_METHODS)
            if getattr(self, key) != default and self.method not in allowed:
                fail(key, f"{{key}} applies to sparsity.method {' or '.join(allowed)} only, not "
                           f"'{self.method}' (remove it, or choose one of those methods)")
        if self.method != "none":  # what the backend declares it can compute (static masks, which patterns)
            problem = spec_problem(self.backend, self.init if self.dynamic else self.method,
                                   {"n": self.n, "m": self.m, "block_size": self.block_size}, self.dynamic)
            if problem:
                fail("backend", f"{{key}}: {problem} (sparsity.method '{self.method}')")
        if self.method == "gmp" and self.initial_level > self.level:
            fail("initial_level", f"{{key}} ({self.initial_level}) must not exceed sparsity.level ({self.level})")
        if self.update_stop is not None and self.update_stop <= self.update_start:
            fail("update_stop", f"{{key}} ({self.update_stop}) must be after sparsity.update_start "
                                 f"({self.update_start})")


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec(Spec):
    lr: float = num(gt=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = num(1e-8, gt=0.0)
    weight_decay: float = num(0.1, ge=0.0)
    grad_clip: Optional[float] = num(1.0, gt=0.0)  # None: no clipping
    # steps with a non-finite loss or gradient norm are skipped; this many in a row stop the run (exit code 3)
    max_nonfinite_steps: int = num(3, ge=1)

    def _check(self):
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                fail(f"betas[{i}]", f"{{key}} must be in [0, 1), got {beta!r}")


@dataclass(frozen=True, kw_only=True)
class ScheduleSpec(Spec):
    warmup_steps: Optional[int] = num(None, ge=0)
    warmup_tokens: Optional[int] = num(None, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = num(0.1, ge=0.0, le=1.0)

    EXCLUSIVE: ClassVar = (("warmup_steps", "warmup_tokens"),)

    def _check(self):
        at_most_one(self, self.EXCLUSIVE[0])


@dataclass(frozen=True, kw_only=True)
class GenerationEvalSpec(Spec):
    """Downstream evaluation of a fine-tuning phase: generate for the task's inputs and score them (spdf.eval)."""
    split: str = "validation"
    decoding: str = "greedy"  # a preset of spdf.eval.generate: paper, greedy, sample
    max_new_tokens: Optional[int] = num(None, ge=1)  # None: the preset's
    num_beams: Optional[int] = num(None, ge=1)  # None: the preset's
    limit: Optional[int] = num(None, ge=1)  # the first N inputs of the split at the end of the phase; None: all
    before: bool = False  # also score the model as the phase starts (e.g. the pre-trained model, before fine-tuning)
    every_steps: Optional[int] = num(None, ge=1)  # also every N steps during the phase, on `sample` inputs
    sample: int = num(16, ge=1)
    batch_size: int = num(16, ge=1)  # prompts decoded together

    def decoding_config(self) -> DecodingConfig:
        overrides = {k: getattr(self, k) for k in ("max_new_tokens", "num_beams") if getattr(self, k) is not None}
        return DecodingConfig.from_name(self.decoding, **overrides)

    def _check(self):
        try:
            self.decoding_config()
        except ValueError as err:
            fail("decoding", f"{{key}}: {err}")


@dataclass(frozen=True, kw_only=True)
class EvalSpec(Spec):
    every_steps: int = num(100, ge=1)  # validation loss every N steps
    batches: int = num(20, ge=1)  # ... on this many validation batches
    generate: Optional[GenerationEvalSpec] = None  # finetune phases: downstream metrics (see GenerationEvalSpec)


@dataclass(frozen=True, kw_only=True)
class CheckpointSpec(Spec):
    every_steps: int = num(200, ge=1)
    keep: int = num(2, ge=1)


@dataclass(frozen=True, kw_only=True)
class LoggingSpec(Spec):
    every_steps: int = num(10, ge=1)
    tensorboard: bool = False
    progress: bool = True


@dataclass(frozen=True, kw_only=True)
class PhaseSpec(Spec):
    name: str
    kind: Literal["pretrain", "finetune"]
    data: Optional[DataSpec] = None  # pretrain: one corpus ...
    mixture: Optional[dict[str, float]] = None  # ... or the recipe's sources by name: weight (shares of tokens)
    task: Optional[TaskSpec] = None  # finetune
    init: Literal["densify", "keep_masks"] = "densify"  # finetune: dense (SPDF) or sparse fine-tuning
    seq_len: int = num(ge=1)  # <= the model's n_ctx (checked by Recipe)
    batch_size: int = num(ge=1)  # global sequences per optimizer step
    micro_batch_size: Optional[int] = num(None, ge=1)  # per device; None: batch_size
    steps: Optional[int] = num(None, ge=1)
    tokens: Optional[int] = num(None, ge=1)
    epochs: Optional[float] = num(None, gt=0.0)  # finetune only
    optimizer: OptimizerSpec
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)

    EXCLUSIVE: ClassVar = (("steps", "tokens", "epochs"),)

    def accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each of `world_size` processes."""
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % (micro * world_size):
            raise RecipeError(f"{{key}} ({self.batch_size}) must be divisible by micro_batch_size ({micro}) x the "
                              f"number of processes ({world_size})", f"phases.{self.name}.batch_size")
        return self.batch_size // (micro * world_size)

    def _check(self):
        budgets = self.EXCLUSIVE[0]
        at_most_one(self, budgets)
        if all(getattr(self, k) is None for k in budgets):
            fail("", "{key}: set exactly one budget: steps, tokens or epochs")
        own, other = ("data", "task") if self.kind == "pretrain" else ("task", "data")
        if self.mixture is not None:
            self._check_mixture()
        elif getattr(self, own) is None:
            fail(own, f"{{key}} is required for a {self.kind} phase" +
                 (" (or 'mixture': weights of the recipe's sources)" if self.kind == "pretrain" else ""))
        if getattr(self, other) is not None:
            fail(other, f"{{key}} is not allowed in a {self.kind} phase (use '{own}')")
        if self.kind == "pretrain" and self.epochs is not None:
            fail("epochs", "{key} is only for finetune phases; use steps or tokens")
        if self.kind == "pretrain" and self.init != "densify":
            fail("init", "{key} is only for finetune phases")
        generation = self.eval.generate
        if generation is not None and self.kind == "pretrain":
            fail("eval.generate", "{key} is only for finetune phases (it scores generations on the phase's task)")
        if generation is not None and generation.split not in task_splits(self.task.task):
            fail("eval.generate.split", f"{{key}}: task '{self.task.task}' has no split '{generation.split}'; "
                                        f"splits: {', '.join(task_splits(self.task.task))}")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            fail("batch_size", f"{{key}} ({self.batch_size}) must be divisible by micro_batch_size "
                                f"({self.micro_batch_size})")

    def _check_mixture(self):
        if self.kind != "pretrain":
            fail("mixture", "{key} is only for pretrain phases")
        if self.data is not None:
            fail("mixture", "{key}: set either data (one corpus) or mixture (the recipe's sources), not both")
        if not self.mixture:
            fail("mixture", "{key} must give at least one source and its weight")
        for name, weight in self.mixture.items():
            if not weight > 0:
                fail(f"mixture['{name}']", f"{{key}} must be > 0 (a share of the phase's tokens; leave a source "
                                           f"out instead), got {weight!r}")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True, kw_only=True)
class Recipe(Spec):
    version: int
    name: str
    run_dir: Optional[str] = None  # None: runs/<name>
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA when supported, else fp32
    model: ModelSpec = field(default_factory=ModelSpec)
    sparsity: SparsitySpec = field(default_factory=SparsitySpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    logging: LoggingSpec = field(default_factory=LoggingSpec)
    sources: tuple[SourceSpec, ...] = ()  # named corpora that pre-training phases mix (PhaseSpec.mixture)
    phases: tuple[PhaseSpec, ...]

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir if self.run_dir is not None else Path("runs") / self.name)

    @property
    def sparsity_seed(self) -> int:
        return self.sparsity.seed if self.sparsity.seed is not None else self.seed

    def corpora(self, phase: PhaseSpec) -> dict[str, DataSpec]:
        """A pre-training phase's corpora by name: its mixture's sources, or {phase name: its data}."""
        if phase.mixture is None:
            return {phase.name: phase.data} if phase.data is not None else {}
        by_name = {s.name: s.data for s in self.sources}
        return {name: by_name[name] for name in phase.mixture}

    def phase(self, name: str) -> PhaseSpec:
        for phase in self.phases:
            if phase.name == name:
                return phase
        names = [p.name for p in self.phases]
        raise RecipeError(f"no phase named '{name}'{suggest(name, names)}; phases: {', '.join(names)}")

    def _check(self):
        if self.version != 1:
            fail("version", f"{{key}} must be 1 (this spdf reads recipe version 1), got {self.version!r}")
        if not _NAME.match(self.name):
            fail("name", f"{{key}} must be letters, digits, '.', '_' or '-' (it names the run directory), "
                          f"got {self.name!r}")
        if not self.phases:
            fail("phases", "{key} must list at least one phase")
        seen = set()
        for i, phase in enumerate(self.phases):
            if phase.name in seen:
                fail(f"phases[{i}].name", f"{{key}}: phase name '{phase.name}' is used twice; names must be unique")
            seen.add(phase.name)
        n_ctx = self.model.n_ctx or self.model.shape.n_ctx
        for i, phase in enumerate(self.phases):
            if phase.seq_len > n_ctx:
                fail(f"phases[{i}].seq_len", f"{{key}} ({phase.seq_len}) must be <= the model's context "
                                              f"n_ctx ({n_ctx}, model '{self.model.name}')")
        self._check_sources()

    def _check_sources(self):
        """Mixture names resolve; no pre-training corpus holds the docstring task's functions; one pre-training phase
        for a dynamic sparsity method (its step count lives in one phase's checkpoints)."""
        names = [s.name for s in self.sources]
        for i, name in enumerate(names):
            if name in names[:i]:
                fail(f"sources[{i}].name", f"{{key}}: source name '{name}' is used twice; names must be unique")
        for i, phase in enumerate(self.phases):
            for name in phase.mixture or ():
                if name not in names:
                    fail(f"phases[{i}].mixture['{name}']",
                         f"{{key}}: unknown source '{name}'{suggest(name, names)}; the recipe's sources: "
                         f"{', '.join(names) if names else 'none (define them in the top-level sources list)'}")
        pretrain = [p for p in self.phases if p.kind == "pretrain"]
        tasks = [p.task for p in self.phases if p.task is not None]
        for phase in pretrain:
            for name, data in self.corpora(phase).items():
                for task in tasks:
                    leak = docstring_task_leak(data, task)
                    if leak:
                        where = f"phases.{phase.name}.data" if phase.mixture is None else f"sources.{name}.data"
                        fail(where, f"{{key}} {leak}; pre-train on part: pretrain with heldout_fraction >= the "
                                    f"task's")
        if self.sparsity.dynamic and len(pretrain) > 1:
            fail("sparsity.method", f"{{key}} '{self.sparsity.method}' changes masks on a schedule counted within "
                                    f"one pre-training phase; this recipe has {len(pretrain)}: use one pre-training "
                                    f"phase or a static method")


