"""The typed settings of spdf.data: a corpus (DataSpec), a downstream task (TaskSpec), a tokenizer (TokenizerSpec).

These are the only description of these settings: a recipe's `data:`, `task:` and `tokenizer:` blocks are these
classes (re-exported by `spdf.recipe_schema`), and every function of spdf.data takes them. They live here rather
than in the recipe schema so that spdf.data does not import the recipe layer above it.

A setting that only one kind of source or task reads is None by default and refused for the others; `option(name)`
gives the value in force (the setting, or that kind's default).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Literal, Optional

from ..typed_spec import Spec, added_later, fail, num, one_of, require_for
from .task_registry import get_task, task_names, task_options


class _KindOptions:
    """For a spec whose `selector` field picks a kind: which optional fields each kind reads, and their defaults."""

    selector: ClassVar[str]
    # field -> {kind: default}; a field set for a kind not listed is an error
    OPTIONS: ClassVar[dict[str, dict[str, object]]] = {}

    def option(self, name: str):
        value = getattr(self, name)
        return self._options()[name][getattr(self, self.selector)] if value is None else value

    def _options(self) -> dict[str, dict[str, object]]:
        return self.OPTIONS

    def _check_options(self):
        kind = getattr(self, self.selector)
        for name, defaults in self._options().items():
            if getattr(self, name) is not None and kind not in defaults:
                fail(name, f"{{key}} is only used when {self.selector} is {' or '.join(map(repr, defaults))} "
                           f"({self.selector} is '{kind}')")


@dataclass(frozen=True, kw_only=True)
class TokenizerSpec(_KindOptions, Spec):
    kind: Literal["train", "file", "hub"] = "train"
    vocab_size: int = num(4096, ge=257)  # kind=train: 256 byte tokens + at least one merge
    path: Optional[str] = None  # kind=file
    name: Optional[str] = None  # kind=hub, e.g. "gpt2"
    # kind=train: read at most this much text (None: all of it)
    max_bytes: Optional[int] = num(None, ge=1, added_later=True)

    selector: ClassVar[str] = "kind"
    OPTIONS: ClassVar = {"max_bytes": {"train": None}}

    def _check(self):
        require_for(self, "kind", {"file": "path", "hub": "name"})
        self._check_options()


@dataclass(frozen=True, kw_only=True)
class DataSpec(_KindOptions, Spec):
    """A pre-training corpus: the standard library's source (offline), local files, or a Hugging Face dataset.

    stdlib `content`: "source" (default) is each module's whole text, code with its docstrings and comments; "text"
    is only the natural language in it, the docstrings and comments of each module (spdf.data.sources.module_text).
    """
    source: Literal["stdlib", "files", "hf"] = "stdlib"
    part: Literal["pretrain", "heldout"] = "pretrain"  # stdlib only
    # stdlib: whole modules or their docstrings/comments; the modules held out (default 0.1)
    content: Optional[Literal["source", "text"]] = added_later(None)
    heldout_fraction: Optional[float] = num(None, ge=0.0, lt=1.0, added_later=True)
    max_bytes: Optional[int] = num(None, ge=1)  # stdlib: cap on the text read
    paths: tuple[str, ...] = ()  # source=files: files or globs (.txt, .jsonl, .parquet)
    text_field: str = "text"  # files (.jsonl/.parquet) and hf: the column holding the text
    name: Optional[str] = None  # source=hf
    config: Optional[str] = None
    split: str = "train"
    streaming: bool = False
    max_tokens: Optional[int] = num(None, ge=1)  # cap on tokens packed (streaming corpora)
    val_fraction: float = num(0.02, gt=0.0, lt=0.5)  # documents held out for validation loss
    workers: Optional[int] = num(None, ge=1)  # tokenizing processes (None: one per available core); same output

    selector: ClassVar[str] = "source"
    OPTIONS: ClassVar = {"heldout_fraction": {"stdlib": 0.1}, "max_bytes": {"stdlib": None},
                         "content": {"stdlib": "source"}}

    def _check(self):
        require_for(self, "source", {"files": "paths", "hf": "name"})
        self._check_options()


@dataclass(frozen=True, kw_only=True)
class SourceSpec(Spec):
    """A named pre-training corpus (a recipe's `sources` list); pre-training phases mix sources by name and weight."""
    name: str
    data: DataSpec

    def _check(self):
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            fail("name", f"{{key}} must be letters, digits, '-' or '_' (it names the source in the metrics), "
                          f"got {self.name!r}")


def docstring_task_leak(data: DataSpec, task: TaskSpec) -> str | None:
    """Why pre-training on `data` would show the model functions of the docstring `task`, or None if it cannot.

    The task takes its functions from the stdlib modules held out of pre-training (stable_fraction(path) <
    heldout_fraction); a stdlib corpus is clean when it reads the pre-training part of a split that holds out at least
    those modules, whatever its `content` (the text source extracts from the same modules as the code source)."""
    if data.source != "stdlib" or task.task != "docstring":
        return None
    if data.part != "pretrain":
        return "reads the held-out stdlib modules the docstring task takes its functions from (part: heldout)"
    data_fraction, task_fraction = data.option("heldout_fraction"), task.option("heldout_fraction")
    if data_fraction < task_fraction:
        return (f"holds out fewer stdlib modules (heldout_fraction {data_fraction}) than the docstring task takes "
                f"its functions from ({task_fraction}): those functions would be pre-trained on")
    return None


@dataclass(frozen=True, kw_only=True)
class TaskSpec(_KindOptions, Spec):
    """A downstream task: prompt/completion examples with every reference of an input grouped together.

    docstring: offline, functions of the standard library modules held out of pre-training (`heldout_fraction` must
    match the pre-training corpus's). jsonl: a local file of {prompt_field, completion_field[, "references"]} rows.
    e2e / webnlg / dart: the Hugging Face datasets, or with `path` a local .json/.jsonl file in the same schema.
    curation: Curation Corpus, a local .csv (as its scraper writes it) or .jsonl. `path` may contain `{split}`
    (one file per split); otherwise a local jsonl/curation file is split by a stable hash of each input.
    The tasks, which settings each reads (with its defaults) and its `path` rule are the entries of
    spdf.data.task_registry (the shipped ones are registered in spdf.data.tasks).
    """
    task: str = one_of("docstring", task_names)  # a registered task
    path: Optional[str] = None  # jsonl (required), curation (needed to run); e2e/webnlg/dart: a local copy
    name: Optional[str] = None  # e2e/webnlg/dart: another Hugging Face dataset id
    config: Optional[str] = None
    max_examples: Optional[int] = num(None, ge=1)  # the first N inputs of a split
    heldout_fraction: Optional[float] = num(None, ge=0.0, lt=1.0, added_later=True)
    validation_fraction: Optional[float] = num(None, gt=0.0, lt=1.0, added_later=True)
    max_prompt_lines: Optional[int] = num(None, ge=1, added_later=True)
    prompt_field: Optional[str] = added_later(None)
    completion_field: Optional[str] = added_later(None)
    article_field: Optional[str] = added_later(None)
    summary_field: Optional[str] = added_later(None)
    max_article_chars: Optional[int] = num(None, ge=1, added_later=True)

    selector: ClassVar[str] = "task"

    def _options(self) -> dict[str, dict[str, object]]:
        table = task_options()  # in the order of this class's fields: the first wrong key is the one named
        return {f.name: table[f.name] for f in fields(self) if f.name in table}

    def _check(self):
        task = get_task(self.task)
        if task.path == "required" and not self.path:
            fail("path", f"{{key}} is required when task is '{self.task}' ({task.path_note})")
        if task.path == "unused" and self.path:
            fail("path", f"{{key}} is not used when task is '{self.task}' ({task.path_note})")
        self._check_options()
