"""Downstream tasks → Examples (a prompt and every reference of that input), from a TaskSpec and a split name.

    TaskSpec(task="docstring")     offline: functions of the stdlib modules held out of pre-training
    TaskSpec(task="jsonl", path="data/{split}.jsonl" | "all.jsonl")      rows {"prompt", "completion"[, "references"]}
    TaskSpec(task="e2e" | "webnlg" | "dart")          the Hugging Face datasets (online), in their own schema
    TaskSpec(task="e2e", path="e2e/{split}.jsonl")   the same schema from a local .jsonl/.json copy (offline)
    TaskSpec(task="curation", path="curation.csv")    Curation Corpus as its scraper writes it (or .jsonl)

An input appears once per split with all its references grouped (E2E has several texts per meaning representation,
WebNLG/DART several lexicalisations per triple set): evaluation scores one generation per input against them all,
and training makes one row per (input, reference) (FinetuneDataset). Splits: "train", "validation", and "test" for
the data-to-text tasks. Local files without `{split}` are split by a stable hash of the input.

Each task is one `register_task` entry at the end of this file (spdf.data.task_registry: its loader, splits,
metrics, settings); nothing else in spdf names the tasks one by one.
"""
from __future__ import annotations

import ast
import csv
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from .errors import DataError
from .finetune import Example
from .sources import load_hf, read_jsonl, stable_fraction, stdlib_modules
from .specs import TaskSpec
from .task_registry import Task, get_task, register_task

DOC_PROMPT_END = "\n# Summary:"
# A task's local copy is a file in the dataset's own schema, named by task.path (`spdf evaluate --task-path`)
TASK_OFFLINE_HINT = ("offline? give a local copy in the dataset's own schema: task.path in a recipe, --task-path FILE "
                     "for spdf evaluate ({split} stands for the split name)")


@dataclass
class TaskSplit:
    """The examples of one split of one task (a list-like of Example, one per input)."""
    task: str
    split: str
    examples: list[Example]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def __iter__(self):
        return iter(self.examples)


def docstring_examples(module_text: str, max_prompt_lines: int = 10) -> list[Example]:
    """One Example per function or method with a docstring: prompt = its source (the `def` line and body, dedented,
    at most max_prompt_lines lines) without the docstring, then DOC_PROMPT_END; completion = the docstring's first
    line. Functions whose docstring shares the `def` line are skipped (nothing to remove cleanly)."""
    try:
        tree = ast.parse(module_text)
    except (SyntaxError, ValueError):
        return []
    lines = module_text.splitlines()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=True)
        summary = next((ln.strip() for ln in (doc or "").splitlines() if ln.strip()), "")
        first = node.body[0]
        if len(summary) < 3 or first.lineno == node.lineno:
            continue
        after = lines[first.end_lineno: node.end_lineno]
        while after and not after[0].strip():  # the blank line that usually follows a docstring
            after = after[1:]
        body = lines[node.lineno - 1: first.lineno - 1] + after
        code = textwrap.dedent("\n".join(body[:max_prompt_lines])).rstrip()
        found.append((node.lineno, Example(prompt=code + DOC_PROMPT_END, completion=summary, references=[summary])))
    return [ex for _, ex in sorted(found, key=lambda pair: pair[0])]


def _docstring_task(spec: TaskSpec, split: str) -> list[tuple[str, str]]:
    out = []
    validation_fraction, max_lines = spec.option("validation_fraction"), spec.option("max_prompt_lines")
    for _, text in stdlib_modules("heldout", spec.option("heldout_fraction")):
        # keyed by the def line and summary: twins share a split, and max_prompt_lines does not move examples
        out += [(ex.prompt, ex.completion) for ex in docstring_examples(text, max_lines)
                if _split_of(f"{ex.prompt.splitlines()[0]}\n{ex.completion}", validation_fraction) == split]
    return out


def _split_of(key: str, validation_fraction: float) -> str:
    return "validation" if stable_fraction(key) < validation_fraction else "train"


def _local_path(path, split: str) -> Path:
    if not path:
        raise DataError("this task needs 'path': a local file")
    p = Path(str(path).replace("{split}", split))
    if not p.is_file():
        raise DataError(f"task file not found: '{p}'")
    return p


def _row(row: dict, key: str, where) -> str:
    if key not in row:
        raise DataError(f"{where} has no field '{key}'; fields: {', '.join(sorted(map(str, row)))}")
    return str(row[key])


def _jsonl_task(spec: TaskSpec, split: str) -> list[tuple[str, str]]:
    p = _local_path(spec.path, split)
    prompt_field, completion_field = spec.option("prompt_field"), spec.option("completion_field")
    out = []
    for row in read_jsonl(p):
        prompt, completion = _row(row, prompt_field, p), _row(row, completion_field, p)
        if "{split}" in spec.path or _split_of(prompt, spec.option("validation_fraction")) == split:
            out += [(prompt, str(ref)) for ref in row.get("references") or [completion]]
    return out


def _curation_task(spec: TaskSpec, split: str) -> list[tuple[str, str]]:
    p = _local_path(spec.path, split)
    article_field, summary_field = spec.option("article_field"), spec.option("summary_field")
    if p.suffix.lower() == ".csv":
        f = open(p, encoding="utf-8", newline="")
        rows = csv.DictReader(f)
    else:
        f, rows = None, read_jsonl(p)
    out = []
    try:
        for row in _named_decode_errors(rows, p):
            article, summary = _row(row, article_field, p).strip(), _row(row, summary_field, p).strip()
            if not article:  # the scraper leaves an empty article where a page could not be fetched
                continue
            if "{split}" in spec.path or _split_of(article, spec.option("validation_fraction")) == split:
                out.append((f"Article: {article[:spec.option('max_article_chars')]}\nSummary:", summary))
    finally:
        if f:
            f.close()
    return out


def _named_decode_errors(rows, path: Path):
    """`rows` of a file read as text, a byte that is not UTF-8 named with the file (csv's reader does not)."""
    try:
        yield from rows
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a block)") from None


def _column(obj, key: str) -> list:
    """datasets gives a sequence of structs as a dict of lists; plain JSON gives a list of dicts."""
    return obj[key] if isinstance(obj, dict) else [item[key] for item in obj]


def _e2e_row(row: dict, where: str) -> tuple[str, list[str]]:
    return _row(row, "meaning_representation", where), [_row(row, "human_reference", where)]


def _webnlg_row(row: dict, where: str) -> tuple[str, list[str]]:
    triple_sets = _column(row["modified_triple_sets"], "mtriple_set")
    return " ; ".join(triple_sets[0] if triple_sets else []), _column(row["lex"], "text")


def _dart_row(row: dict, where: str) -> tuple[str, list[str]]:
    return " ; ".join(" | ".join(t) for t in row["tripleset"]), _column(row["annotations"], "text")


def _read_rows(path: Path) -> list[dict]:
    """Rows of a local .jsonl (one object per line) or .json (a list of objects, or JSON lines) file."""
    if path.suffix.lower() == ".json":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
            if not all(isinstance(r, dict) for r in rows):
                raise DataError(f"{path}: expected a list of JSON objects")
            return rows
    return list(read_jsonl(path))


@dataclass(frozen=True)
class DataToText:
    """The loader of a data-to-text task: a Hugging Face dataset (`name`/`config` may name another one) or, with
    `path`, a local copy in the same schema. `row` gives one row's (data, references); the prompt is
    "Data: <data>\\nText:"."""
    dataset: str  # the default Hub id
    config: str | None
    row: Callable[[dict, str], tuple[str, list[str]]]
    hub_splits: Mapping[str, str] = field(default_factory=dict)  # our split -> the dataset's, where they differ

    def hub_split(self, split: str) -> str:
        return self.hub_splits.get(split, split)

    def __call__(self, spec: TaskSpec, split: str) -> list[tuple[str, str]]:
        if spec.path:
            where = str(_local_path(spec.path, split))
            rows = _read_rows(Path(where))
        else:
            name = spec.name or self.dataset
            config = spec.config if spec.config is not None else self.config
            where = f"dataset '{name}'"
            rows = load_hf(name, config, self.hub_split(split), streaming=False, offline_hint=TASK_OFFLINE_HINT)
        try:
            return self.pairs_of(rows, where)
        except (KeyError, TypeError, IndexError) as e:
            raise DataError(f"{where} does not have the {spec.task} layout spdf expects ({type(e).__name__}: {e}); "
                            f"convert it to a jsonl task with prompt/completion/references") from None

    def pairs_of(self, rows, where: str) -> list[tuple[str, str]]:
        """(prompt, reference) pairs of rows in the dataset's own schema (as the Hub or a local copy gives them)."""
        out = []
        for row in rows:
            data, refs = self.row(row, where)
            prompt = f"Data: {data}\nText:"
            out += [(prompt, ref) for ref in refs] or [(prompt, "")]  # "": an input without references, refused later
        return out


def group_references(pairs: list[tuple[str, str]], task: str, split: str) -> list[Example]:
    """One Example per distinct prompt, in first-seen order, with its distinct non-empty references in order."""
    grouped: dict[str, list[str]] = {}
    for prompt, ref in pairs:
        refs = grouped.setdefault(prompt, [])
        ref = ref.strip()
        if ref and ref not in refs:
            refs.append(ref)
    for prompt, refs in grouped.items():
        if not refs:
            raise DataError(f"task '{task}', split '{split}': the input {prompt[:80]!r} has no references; every "
                            f"input needs at least one non-empty reference (remove it from the data)")
    return [Example(prompt, refs[0], refs) for prompt, refs in grouped.items()]


def load_finetune_task(spec: TaskSpec, split: str) -> TaskSplit:
    """The Examples of `split` ("train", "validation"; "test" for e2e/webnlg/dart): one per input, references
    grouped; `spec.max_examples` keeps the first N inputs."""
    task = get_task(spec.task)
    if split not in task.splits:
        raise DataError(f"unknown split '{split}' for task '{spec.task}'; allowed: {', '.join(task.splits)}")
    examples = group_references(task.pairs(spec, split), spec.task, split)
    if spec.max_examples is not None:
        examples = examples[:spec.max_examples]
    if not examples:
        raise DataError(f"task '{spec.task}' has no examples in split '{split}'")
    return TaskSplit(spec.task, split, examples)


# ------------------------------------------------------------------------------------------ the shipped tasks
_DATA_TO_TEXT_SPLITS = ("train", "validation", "test")
_HUB_OPTIONS = {"name": None, "config": None}  # another Hugging Face dataset id and config
_TEXT_METRICS = ("bleu", "rouge_l", "chrf")

register_task(Task("docstring", _docstring_task, _TEXT_METRICS, path="unused",
                   path_note="it reads the standard library",
                   options={"heldout_fraction": 0.1, "validation_fraction": 0.1, "max_prompt_lines": 10}))
register_task(Task("e2e", DataToText("tuetschek/e2e_nlg", None, _e2e_row),
                   ("bleu", "nist", "meteor", "rouge_l", "cider"), splits=_DATA_TO_TEXT_SPLITS, options=_HUB_OPTIONS))
register_task(Task("webnlg", DataToText("webnlg-challenge/web_nlg", "release_v3.0_en", _webnlg_row,
                                        hub_splits={"validation": "dev"}),
                   ("bleu", "meteor", "ter", "chrf"), splits=_DATA_TO_TEXT_SPLITS, options=_HUB_OPTIONS))
register_task(Task("dart", DataToText("Yale-LILY/dart", None, _dart_row), ("bleu", "meteor", "ter", "chrf"),
                   splits=_DATA_TO_TEXT_SPLITS, options=_HUB_OPTIONS))
register_task(Task("curation", _curation_task, ("rouge1", "rouge2", "rouge_l"),  # path: needed to run, not to plan
                   options={"validation_fraction": 0.05, "article_field": "article_content",
                            "summary_field": "summary", "max_article_chars": 4000}))
register_task(Task("jsonl", _jsonl_task, _TEXT_METRICS, path="required",
                   path_note='a file of {"prompt", "completion"} lines',
                   options={"validation_fraction": 0.1, "prompt_field": "prompt", "completion_field": "completion"}))
