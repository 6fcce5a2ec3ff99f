"""The recipe schema: typed, frozen dataclasses with their validation, and the RecipeError they raise.

Every constraint lives next to its field: bounds in the field's metadata (`_num(default, gt=0)`), relations between
fields in a `_check()` method, both run at construction. The type-driven converter that builds these classes from
YAML data lives in `spdf.recipe` (the public entry point), so a new field needs no parsing code.
Errors are `RecipeError`s whose message names the full key path (`phases[0].optimizer.lr`) and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from .model.config import CONFIGS
from .sparsity.algorithms import ALGORITHMS
from .sparsity.methods import MASK_METHODS


class RecipeError(ValueError):
    """A user-fixable problem in a recipe: one line naming the key path and what is allowed.

    `key` is the path of the offending key relative to where the error was raised; `problem` is a template in which
    `{key}` stands for that path, so an enclosing scope can prefix the path (`at`) without re-wording the message.
    """

    def __init__(self, problem: str, key: str = ""):
        self.key, self.problem = key, problem
        if "{key}" in problem:
            message = problem.replace("{key}", key or "(top level)")
        else:
            message = f"{key}: {problem}" if key else problem
        super().__init__(message)

    def at(self, prefix: str) -> "RecipeError":
        return RecipeError(self.problem, join_path(prefix, self.key))


def join_path(prefix: str, key: str) -> str:
    if not prefix:
        return key
    if not key:
        return prefix
    return prefix + key if key.startswith("[") else f"{prefix}.{key}"


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _num(default: Any = dataclasses.MISSING, **bounds) -> Any:
    """A numeric field with bounds: ge, gt, le, lt (checked whenever the value is not None)."""
    return field(default=default, metadata={"bounds": bounds})


_OPS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
        "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _describe_bounds(bounds: dict) -> str:
    if set(bounds) in ({"ge", "lt"}, {"ge", "le"}, {"gt", "lt"}, {"gt", "le"}):
        lo = "[" if "ge" in bounds else "("
        hi = "]" if "le" in bounds else ")"
        return f"in {lo}{bounds.get('ge', bounds.get('gt'))}, {bounds.get('le', bounds.get('lt'))}{hi}"
    return " and ".join(f"{_OPS[op][0]} {b}" for op, b in bounds.items())


class _Spec:
    """Base of every schema class: checks bounds and `_check()` at construction."""

    # Groups of keys of which at most one may be set; `--set` of one clears the others (see apply_overrides).
    EXCLUSIVE: ClassVar[tuple[tuple[str, ...], ...]] = ()

    def __post_init__(self):
        for f in dataclasses.fields(self):
            bounds = f.metadata.get("bounds")
            value = getattr(self, f.name)
            if bounds and value is not None and not all(_OPS[op][1](value, b) for op, b in bounds.items()):
                raise RecipeError(f"{{key}} must be {_describe_bounds(bounds)}, got {value!r}", f.name)
        self._check()

    def _check(self) -> None:
        pass

    def to_dict(self) -> dict:
        return to_plain(self)


def _fail(key: str, problem: str):
    raise RecipeError(problem, key)


# --------------------------------------------------------------------------------------------------- the schema
@dataclass(frozen=True, kw_only=True)
class ModelSpec(_Spec):
    name: str = "tiny"
    n_layer: Optional[int] = _num(None, ge=1)
    n_head: Optional[int] = _num(None, ge=1)
    d_model: Optional[int] = _num(None, ge=1)
    d_ff: Optional[int] = _num(None, ge=1)
    n_ctx: Optional[int] = _num(None, ge=1)
    head_dim: Optional[int] = _num(None, ge=1)
    vocab_size: Optional[int] = _num(None, ge=1)  # None: take it from the tokenizer
    dropout: float = _num(0.0, ge=0.0, lt=1.0)

    SHAPE_KEYS: ClassVar[tuple[str, ...]] = ("n_layer", "n_head", "d_model", "d_ff", "n_ctx", "head_dim")

    def _check(self):
        if self.name not in CONFIGS:
            _fail("name", f"{{key}}: unknown model '{self.name}'{suggest(self.name, CONFIGS)}; "
                          f"known: {', '.join(CONFIGS)}")


# Both lists come from the sparsity registries: a new mask method or algorithm needs no edit here.
MASK_INITS = tuple(MASK_METHODS)
DYNAMIC_METHODS = tuple(name for name, cls in ALGORITHMS.items() if cls.dynamic)
SPARSITY_METHODS = ("none", *MASK_INITS, *DYNAMIC_METHODS)
_DYNAMIC_DEFAULTS = {"init": "random", "update_every": 100, "update_start": 0, "update_stop": None,
                     "schedule": None, "drop_fraction": 0.3, "initial_level": 0.0}


@dataclass(frozen=True, kw_only=True)
class SparsitySpec(_Spec):
    # A mask method (static masks made with it) or a dynamic algorithm (masks made with `init`, then updated).
    method: Literal[SPARSITY_METHODS] = "random"
    level: float = _num(0.75, ge=0.0, lt=1.0)  # ignored when method is "none"
    filter: Optional[tuple[str, ...]] = None  # globs on parameter names, "!glob" excludes; None: the paper's default
    overrides: dict[str, float] = field(default_factory=dict)  # glob -> level
    n: int = _num(2, ge=1)
    m: int = _num(4, ge=2)
    block_size: int = _num(16, ge=1)
    seed: Optional[int] = None  # None: the recipe seed
    backend: Literal["masked", "compressed"] = "masked"
    # Dynamic methods only (gmp, set, rigl); steps are optimizer steps of the pre-training phase.
    init: Literal[MASK_INITS] = "random"  # the initial mask
    update_every: int = _num(100, ge=1)  # masks change after every update_every-th step ...
    update_start: int = _num(0, ge=0)  # ... after this step ...
    update_stop: Optional[int] = _num(None, ge=1)  # ... up to this step (None: 3/4 of the pre-training steps)
    # How the drop fraction decays (set, rigl; default cosine) or the sparsity rises (gmp; default cubic), from
    # update_start to update_stop.
    schedule: Optional[Literal["constant", "linear", "cosine", "cubic"]] = None
    drop_fraction: float = _num(0.3, gt=0.0, le=1.0)  # set, rigl: of the kept weights, at update_start
    initial_level: float = _num(0.0, ge=0.0, lt=1.0)  # gmp: the sparsity at update_start

    @property
    def dynamic(self) -> bool:
        return self.method in DYNAMIC_METHODS

    def _check(self):
        if self.n >= self.m:
            _fail("n", f"{{key}} must be < sparsity.m (N:M keeps n of every m weights), got n={self.n}, m={self.m}")
        for pattern, level in self.overrides.items():
            if not 0.0 <= level < 1.0:
                _fail(f"overrides['{pattern}']", f"{{key}} must be in [0, 1), got {level!r}")
        for i, pattern in enumerate(self.filter or ()):
            if not pattern.lstrip("!"):
                _fail(f"filter[{i}]", "{key} must be a non-empty glob pattern")
        only = {"drop_fraction": ("set", "rigl"), "initial_level": ("gmp",)}
        for key, default in _DYNAMIC_DEFAULTS.items():
            allowed = only.get(key, DYNAMIC_METHODS)
            if getattr(self, key) != default and self.method not in allowed:
                _fail(key, f"{{key}} applies to sparsity.method {' or '.join(allowed)} only, not "
                           f"'{self.method}' (remove it, or choose one of those methods)")
        if self.dynamic and self.backend == "compressed":
            _fail("backend", f"{{key}} 'compressed' keeps static masks only; sparsity.method '{self.method}' "
                             f"changes them during training: use backend 'masked'")
        if self.method == "gmp" and self.initial_level > self.level:
            _fail("initial_level", f"{{key}} ({self.initial_level}) must not exceed sparsity.level ({self.level})")
        if self.update_stop is not None and self.update_stop <= self.update_start:
            _fail("update_stop", f"{{key}} ({self.update_stop}) must be after sparsity.update_start "
                                 f"({self.update_start})")


@dataclass(frozen=True, kw_only=True)
class TokenizerSpec(_Spec):
    kind: Literal["train", "file", "hub"] = "train"
    vocab_size: int = _num(4096, ge=257)  # kind=train: 256 byte tokens + at least one merge
    path: Optional[str] = None  # kind=file
    name: Optional[str] = None  # kind=hub, e.g. "gpt2"

    def _check(self):
        _require_for(self, "kind", {"file": "path", "hub": "name"})


@dataclass(frozen=True, kw_only=True)
class DataSpec(_Spec):
    source: Literal["stdlib", "files", "hf"] = "stdlib"
    part: Literal["pretrain", "heldout"] = "pretrain"  # stdlib only
    max_bytes: Optional[int] = _num(None, ge=1)
    paths: tuple[str, ...] = ()  # source=files
    text_field: str = "text"
    name: Optional[str] = None  # source=hf
    config: Optional[str] = None
    split: str = "train"
    streaming: bool = False
    max_tokens: Optional[int] = _num(None, ge=1)  # cap on tokens packed (streaming corpora)
    val_fraction: float = _num(0.02, gt=0.0, lt=0.5)

    def _check(self):
        _require_for(self, "source", {"files": "paths", "hf": "name"})


@dataclass(frozen=True, kw_only=True)
class TaskSpec(_Spec):
    task: Literal["docstring", "e2e", "webnlg", "dart", "curation", "jsonl"] = "docstring"
    path: Optional[str] = None  # jsonl (required) / curation local file
    name: Optional[str] = None  # override the Hugging Face dataset id
    config: Optional[str] = None
    max_examples: Optional[int] = _num(None, ge=1)

    def _check(self):
        if self.task == "jsonl" and not self.path:
            _fail("path", "{key} is required when task is 'jsonl' (a file of {\"prompt\", \"completion\"} lines)")


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec(_Spec):
    lr: float = _num(gt=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = _num(1e-8, gt=0.0)
    weight_decay: float = _num(0.1, ge=0.0)
    grad_clip: Optional[float] = _num(1.0, gt=0.0)  # None: no clipping

    def _check(self):
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                _fail(f"betas[{i}]", f"{{key}} must be in [0, 1), got {beta!r}")


@dataclass(frozen=True, kw_only=True)
class ScheduleSpec(_Spec):
    warmup_steps: Optional[int] = _num(None, ge=0)
    warmup_tokens: Optional[int] = _num(None, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = _num(0.1, ge=0.0, le=1.0)

    EXCLUSIVE: ClassVar = (("warmup_steps", "warmup_tokens"),)

    def _check(self):
        _at_most_one(self, self.EXCLUSIVE[0])


@dataclass(frozen=True, kw_only=True)
class EvalSpec(_Spec):
    every_steps: int = _num(100, ge=1)
    batches: int = _num(20, ge=1)


@dataclass(frozen=True, kw_only=True)
class CheckpointSpec(_Spec):
    every_steps: int = _num(200, ge=1)
    keep: int = _num(2, ge=1)


@dataclass(frozen=True, kw_only=True)
class LoggingSpec(_Spec):
    every_steps: int = _num(10, ge=1)
    tensorboard: bool = False
    progress: bool = True


@dataclass(frozen=True, kw_only=True)
class PhaseSpec(_Spec):
    name: str
    kind: Literal["pretrain", "finetune"]
    data: Optional[DataSpec] = None  # pretrain
    task: Optional[TaskSpec] = None  # finetune
    init: Literal["densify", "keep_masks"] = "densify"  # finetune: dense (SPDF) or sparse fine-tuning
    seq_len: int = _num(ge=1)  # <= the model's n_ctx (checked by Recipe)
    batch_size: int = _num(ge=1)  # global sequences per optimizer step
    micro_batch_size: Optional[int] = _num(None, ge=1)  # per device; None: batch_size
    steps: Optional[int] = _num(None, ge=1)
    tokens: Optional[int] = _num(None, ge=1)
    epochs: Optional[float] = _num(None, gt=0.0)  # finetune only
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
        _at_most_one(self, budgets)
        if all(getattr(self, k) is None for k in budgets):
            _fail("", "{key}: set exactly one budget: steps, tokens or epochs")
        own, other = ("data", "task") if self.kind == "pretrain" else ("task", "data")
        if getattr(self, own) is None:
            _fail(own, f"{{key}} is required for a {self.kind} phase")
        if getattr(self, other) is not None:
            _fail(other, f"{{key}} is not allowed in a {self.kind} phase (use '{own}')")
        if self.kind == "pretrain" and self.epochs is not None:
            _fail("epochs", "{key} is only for finetune phases; use steps or tokens")
        if self.kind == "pretrain" and self.init != "densify":
            _fail("init", "{key} is only for finetune phases")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            _fail("batch_size", f"{{key}} ({self.batch_size}) must be divisible by micro_batch_size "
                                f"({self.micro_batch_size})")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True, kw_only=True)
class Recipe(_Spec):
    version: int
    name: str
    run_dir: Optional[str] = None  # None: runs/<name>
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA when supported, else fp32
    model: ModelSpec = field(default_factory=ModelSpec)
    sparsity: SparsitySpec = field(default_factory=SparsitySpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    logging: LoggingSpec = field(default_factory=LoggingSpec)
    phases: tuple[PhaseSpec, ...]

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir if self.run_dir is not None else Path("runs") / self.name)

    @property
    def sparsity_seed(self) -> int:
        return self.sparsity.seed if self.sparsity.seed is not None else self.seed

    def phase(self, name: str) -> PhaseSpec:
        for phase in self.phases:
            if phase.name == name:
                return phase
        names = [p.name for p in self.phases]
        raise RecipeError(f"no phase named '{name}'{suggest(name, names)}; phases: {', '.join(names)}")

    def _check(self):
        if self.version != 1:
            _fail("version", f"{{key}} must be 1 (this spdf reads recipe version 1), got {self.version!r}")
        if not _NAME.match(self.name):
            _fail("name", f"{{key}} must be letters, digits, '.', '_' or '-' (it names the run directory), "
                          f"got {self.name!r}")
        if not self.phases:
            _fail("phases", "{key} must list at least one phase")
        seen = set()
        for i, phase in enumerate(self.phases):
            if phase.name in seen:
                _fail(f"phases[{i}].name", f"{{key}}: phase name '{phase.name}' is used twice; names must be unique")
            seen.add(phase.name)
        n_ctx = self.model.n_ctx or CONFIGS[self.model.name].n_ctx
        for i, phase in enumerate(self.phases):
            if phase.seq_len > n_ctx:
                _fail(f"phases[{i}].seq_len", f"{{key}} ({phase.seq_len}) must be <= the model's context "
                                              f"n_ctx ({n_ctx}, model '{self.model.name}')")


def _at_most_one(spec, keys):
    chosen = [k for k in keys if getattr(spec, k) is not None]
    if len(chosen) > 1:
        _fail(chosen[1], f"{{key}}: set only one of {', '.join(keys)} (got {' and '.join(chosen)})")


def _require_for(spec, selector: str, required: dict[str, str]):
    """For each choice of `selector`, the key it requires must be set, and the others' keys must not be."""
    choice = getattr(spec, selector)
    for option, key in required.items():
        value = getattr(spec, key)
        if option == choice and not value:
            _fail(key, f"{{key}} is required when {selector} is '{option}'")
        if option != choice and value:
            _fail(key, f"{{key}} is only used when {selector} is '{option}' ({selector} is '{choice}')")


def to_plain(value):
    """Schema objects -> plain YAML-safe data (dicts, lists, str, int, float, bool, None)."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value
