"""Text sources: iterate documents (one str each) of a DataSpec (see spdf.data.specs).

    DataSpec(source="stdlib", part="pretrain" | "heldout", heldout_fraction=0.1, max_bytes=4_000_000)
    DataSpec(source="stdlib", content="text")       # the same modules' docstrings and comments only
    DataSpec(source="files", paths=("data/*.txt", "x.jsonl", "y.parquet"), text_field="text")
    DataSpec(source="hf", name="monology/pile-uncopyrighted", config=None, split="train", streaming=True)

`max_tokens` and `val_fraction` are read by packing, not here.
"""
from __future__ import annotations

import ast
import functools
import glob
import hashlib
import io
import json
import os
import sys
import sysconfig
import tokenize
from pathlib import Path
from typing import Iterator

from .errors import DataError
from .specs import DataSpec

# Generated tables, tests, GUIs' demos and vendored trees: not the code-with-docstrings we want.
_STDLIB_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__",
                     "turtledemo", "ensurepip", "encodings", "pydoc_data", "__phello__"}
STDLIB_PARTS = ("pretrain", "heldout")


def stable_fraction(key: str) -> float:
    """A number in [0, 1) that depends only on `key` (sha256; Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2.0**64


def stdlib_modules(part: str = "pretrain", heldout_fraction: float = 0.1, max_bytes: int | None = None,
                   content: str = "source") -> list[tuple[str, str]]:
    """(relative path, text) of the standard library's .py modules in one part of a by-module split.

    A module is held out when stable_fraction(its relative posix path) < heldout_fraction, so the split is the same
    on every machine with the same Python whatever `max_bytes` or `content` is. Modules come in (hash, path) order,
    which mixes packages. `content` "source" gives a module's whole text, "text" its docstrings and comments
    (module_text; modules without any are left out). `max_bytes` (utf-8 bytes of the text given) skips any module
    that would overflow the cap.
    """
    if part not in STDLIB_PARTS:
        raise DataError(f"unknown stdlib part '{part}'; allowed: {', '.join(STDLIB_PARTS)}")
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(d in _STDLIB_SKIP_DIRS or d.startswith("config-") for d in rel.parts[:-1]):
            continue
        key = rel.as_posix()
        frac = stable_fraction(key)
        if (frac < heldout_fraction) == (part == "heldout"):
            chosen.append((frac, key, path))
    chosen.sort()
    out, total = [], 0
    for _, key, path in chosen:
        text = _module_text_of(str(path), path.stat().st_mtime_ns) if content == "text" else \
            path.read_bytes().decode("utf-8", errors="replace")
        size = len(text.encode("utf-8"))
        if not text.strip() or (max_bytes is not None and total + size > max_bytes):
            continue
        out.append((key, text))
        total += size
    return out


@functools.lru_cache(maxsize=None)
def _module_text_of(path: str, mtime_ns: int) -> str:
    """module_text of a file, remembered: parsing every module takes seconds, and a run reads the corpus twice (for
    the tokenizer, then for packing)."""
    return module_text(Path(path).read_bytes().decode("utf-8", errors="replace"))


def module_text(source: str) -> str:
    """The natural language of a Python module: its docstrings (module, classes, functions; cleaned) and its comments
    (runs of consecutive comment lines joined into one paragraph, `#` removed), in source order, one blank line between
    paragraphs. A module that does not parse gives "" (its docstrings cannot be told from other strings)."""
    try:
        tree = ast.parse(source)
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (SyntaxError, ValueError, tokenize.TokenError):
        return ""
    pieces = []  # (line, text)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                pieces.append((node.body[0].lineno, doc.strip()))
    runs: list[dict] = []  # a paragraph: own-line comments on consecutive lines, or one comment after code
    for tok in tokens:
        text = tok.string.lstrip("#").strip() if tok.type == tokenize.COMMENT else ""
        if not text or text.startswith("!") or "-*-" in text:  # not prose: rulers, shebangs, coding lines
            continue
        own_line = tok.line.lstrip().startswith("#")
        last = runs[-1] if runs else None
        if own_line and last is not None and last["own_line"] and last["end"] == tok.start[0] - 1:
            last["texts"].append(text)
            last["end"] = tok.start[0]
        else:
            runs.append({"start": tok.start[0], "end": tok.start[0], "texts": [text], "own_line": own_line})
    pieces += [(run["start"], " ".join(run["texts"])) for run in runs]
    return "\n\n".join(text for _, text in sorted(pieces, key=lambda piece: piece[0]))


def _expand_paths(paths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("files source needs 'paths': a non-empty list of files or globs")
    files: list[Path] = []
    for pattern in paths:
        pattern = str(pattern)
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"no file matches '{pattern}'")
            files.extend(matches)
        elif Path(pattern).is_file():
            files.append(Path(pattern))
        else:
            raise DataError(f"file not found: '{pattern}'")
    return files


def _field(row: dict, field: str, where: str):
    if field not in row:
        raise DataError(f"{where} has no field '{field}'; fields: {', '.join(sorted(map(str, row)))}")
    return row[field]


def read_jsonl(path: Path) -> Iterator[dict]:
    """Rows of a .jsonl file; a line that is not a JSON object is a DataError naming file and line."""
    with open(path, "rb") as f:  # decoded per line, so a byte that is not UTF-8 is named with its line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line")
            yield row


def _iter_parquet(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading '{path}' needs pyarrow (pip install pyarrow); or convert it to .jsonl") from None
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column '{field}'; columns: {', '.join(pf.schema_arrow.names)}")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t)


def _iter_files(paths, text_field: str = "text") -> Iterator[str]:
    files = _expand_paths(paths)  # eagerly: a missing file fails at the call, not mid-iteration
    for path in files:
        if path.suffix.lower() not in (".txt", ".jsonl", ".parquet"):
            raise DataError(f"unsupported file type '{path}'; allowed: .txt (one document), .jsonl, .parquet")
    return _read_files(files, text_field)


def _read_files(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            yield path.read_text(encoding="utf-8", errors="replace")
        elif suffix == ".jsonl":
            for row in read_jsonl(path):
                text = _field(row, text_field, str(path))
                if text:
                    yield str(text)
        else:
            yield from _iter_parquet(path, text_field)


CORPUS_OFFLINE_HINT = "offline? use a local source such as {'source': 'files', 'paths': [...]} or {'source': 'stdlib'}"


def load_hf(name: str, config: str | None, split: str, streaming: bool, offline_hint: str = CORPUS_OFFLINE_HINT):
    """datasets.load_dataset, with an unreachable dataset (offline, unknown name) turned into a DataError that ends
    with `offline_hint` (what the caller's user can give instead)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"Hugging Face dataset '{name}' needs the `datasets` package (pip install 'spdf[data]')"
                        ) from None
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # the hub raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ValueError…
        reason = " ".join(str(e).split())[:200]
        raise DataError(f"could not load Hugging Face dataset '{name}' (config {config!r}, split '{split}'): "
                        f"{type(e).__name__}: {reason}; {offline_hint}") from None


def _iter_hf(source: DataSpec) -> Iterator[str]:
    rows = load_hf(source.name, source.config, source.split, source.streaming)  # eagerly: fails at the call
    return (str(text) for row in rows if (text := _field(row, source.text_field, f"dataset '{source.name}'")))


def iter_documents(source: DataSpec) -> Iterator[str]:
    """Documents (str) of a source, in a deterministic order."""
    if source.source == "stdlib":
        modules = stdlib_modules(source.part, source.option("heldout_fraction"), source.max_bytes,
                                 source.option("content"))
        return (text for _, text in modules)
    if source.source == "files":
        return _iter_files(source.paths, source.text_field)
    return _iter_hf(source)


def source_fingerprint(source: DataSpec) -> dict:
    """What, besides the spec itself, decides a source's content: the cache key includes it."""
    if source.source == "stdlib":
        return {"python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"]}
    if source.source == "files":
        files = _expand_paths(source.paths)
        return {"files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]}
    return {}
