"""Downstream tasks → prompt/completion Examples, from a task spec dict and a split name.

    {"task": "docstring", "max_examples": None, "heldout_fraction": 0.1, "validation_fraction": 0.1,
     "max_prompt_lines": 10}                      # offline: functions of the stdlib modules held out of pre-training
    {"task": "jsonl", "path": "data/{split}.jsonl" | "all.jsonl", "prompt_field": "prompt",
     "completion_field": "completion", "validation_fraction": 0.1}      # optional "references": list[str] per row
    {"task": "e2e" | "webnlg" | "dart"}           # Hugging Face datasets (online); "name"/"config" override the id
    {"task": "curation", "path": "curation.jsonl|.csv", "article_field": "article_content",
     "summary_field": "summary"}                  # Curation Corpus is distributed as a CSV you scrape yourself

Every spec accepts "max_examples" (first N of the split). Splits: "train", "validation" (and "test" for the
Hugging Face tasks). Local files are split by a stable hash of the prompt, `validation_fraction` of it held out.
"""
from __future__ import annotations

import ast
import csv
import textwrap
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .finetune import Example
from .sources import check_spec, load_hf, read_jsonl, stable_fraction, stdlib_modules

TASKS = ("docstring", "jsonl", "e2e", "webnlg", "dart", "curation")
# task: (default hub id, default config, {our split: the dataset's split})
HF_TASKS = {
    "e2e": ("tuetschek/e2e_nlg", None, {"train": "train", "validation": "validation", "test": "test"}),
    "webnlg": ("webnlg-challenge/web_nlg", "release_v3.0_en", {"train": "train", "validation": "dev", "test": "test"}),
    "dart": ("Yale-LILY/dart", None, {"train": "train", "validation": "validation", "test": "test"}),
}
_LOCAL_SPLITS = ("train", "validation")
_KEYS = {
    "docstring": {"heldout_fraction", "validation_fraction", "max_prompt_lines"},
    "jsonl": {"path", "prompt_field", "completion_field", "validation_fraction"},
    "e2e": {"name", "config"}, "webnlg": {"name", "config"}, "dart": {"name", "config"},
    "curation": {"path", "article_field", "summary_field", "validation_fraction", "max_article_chars"},
}
DOC_PROMPT_END = "\n# Summary:"


@dataclass
class TaskSplit:
    """The examples of one split of one task (a list-like of Example)."""
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


def _docstring_task(split: str, heldout_fraction: float = 0.1, validation_fraction: float = 0.1,
                    max_prompt_lines: int = 10) -> list[Example]:
    out = []
    for _, text in stdlib_modules("heldout", heldout_fraction):
        # keyed by the def line and summary: twins share a split, and max_prompt_lines does not move examples
        out += [ex for ex in docstring_examples(text, max_prompt_lines)
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


def _jsonl_task(split: str, path=None, prompt_field: str = "prompt", completion_field: str = "completion",
                validation_fraction: float = 0.1) -> list[Example]:
    p = _local_path(path, split)
    out = []
    for row in read_jsonl(p):
        prompt, completion = _row(row, prompt_field, p), _row(row, completion_field, p)
        refs = [str(r) for r in row.get("references") or [completion]]
        if "{split}" in str(path) or _split_of(prompt, validation_fraction) == split:
            out.append(Example(prompt, completion, refs))
    return out


def _curation_task(split: str, path=None, article_field: str = "article_content", summary_field: str = "summary",
                   validation_fraction: float = 0.05, max_article_chars: int = 4000) -> list[Example]:
    p = _local_path(path, split)
    if p.suffix.lower() == ".csv":
        f = open(p, encoding="utf-8", newline="")
        rows = csv.DictReader(f)
    else:
        f, rows = None, read_jsonl(p)
    out = []
    try:
        for row in rows:
            article, summary = _row(row, article_field, p).strip(), _row(row, summary_field, p).strip()
            if article and summary and _split_of(article, validation_fraction) == split:
                out.append(Example(f"Article: {article[:max_article_chars]}\nSummary:", summary, [summary]))
    finally:
        if f:
            f.close()
    return out


def _column(obj, key: str) -> list:
    """datasets gives a sequence of structs as a dict of lists; plain JSON gives a list of dicts."""
    return obj[key] if isinstance(obj, dict) else [item[key] for item in obj]


def _data_to_text(task: str, rows, where: str) -> list[Example]:
    grouped: dict[str, list[str]] = {}
    for row in rows:
        if task == "e2e":
            data, refs = _row(row, "meaning_representation", where), [_row(row, "human_reference", where)]
        elif task == "webnlg":
            triple_sets = _column(row["modified_triple_sets"], "mtriple_set")
            data, refs = " ; ".join(triple_sets[0] if triple_sets else []), _column(row["lex"], "text")
        else:
            data = " ; ".join(" | ".join(t) for t in row["tripleset"])
            refs = _column(row["annotations"], "text")
        grouped.setdefault(data, []).extend(r.strip() for r in refs if r and r.strip())
    return [Example(f"Data: {data}\nText:", refs[0], refs) for data, refs in grouped.items() if refs]


def _hf_task(task: str, split: str, name: str | None = None, config: str | None = None) -> list[Example]:
    default_name, default_config, splits = HF_TASKS[task]
    name = name or default_name
    config = config if config is not None else default_config
    rows = load_hf(name, config, splits[split], streaming=False)
    try:
        return _data_to_text(task, rows, f"dataset '{name}'")
    except (KeyError, TypeError, IndexError) as e:
        raise DataError(f"dataset '{name}' does not have the {task} layout spdf expects ({type(e).__name__}: {e}); "
                        f"convert it to a jsonl task with prompt/completion/references") from None


def load_finetune_task(task: dict, split: str) -> TaskSplit:
    """The Examples of `split` ("train", "validation"; "test" for e2e/webnlg/dart) of a task spec dict."""
    kind = task.get("task") if isinstance(task, dict) else task
    if kind not in TASKS:
        raise DataError(f"unknown fine-tuning task {kind!r}; allowed: {', '.join(TASKS)}")
    check_spec(task, kind, _KEYS[kind] | {"task", "max_examples"}, "task")
    allowed = tuple(HF_TASKS[kind][2]) if kind in HF_TASKS else _LOCAL_SPLITS
    if split not in allowed:
        raise DataError(f"unknown split '{split}' for task '{kind}'; allowed: {', '.join(allowed)}")
    args = {k: v for k, v in task.items() if k not in ("task", "max_examples")}
    if kind == "docstring":
        examples = _docstring_task(split, **args)
    elif kind == "jsonl":
        examples = _jsonl_task(split, **args)
    elif kind == "curation":
        examples = _curation_task(split, **args)
    else:
        examples = _hf_task(kind, split, **args)
    max_examples = task.get("max_examples")
    if max_examples is not None:
        if not isinstance(max_examples, int) or max_examples < 1:
            raise DataError(f"max_examples must be a positive integer or null, got {max_examples!r}")
        examples = examples[:max_examples]
    if not examples:
        raise DataError(f"task '{kind}' has no examples in split '{split}'")
    return TaskSplit(kind, split, examples)
