"""Tokenizers: a tokenizer.json file, a Hugging Face Hub name, or a byte-level BPE trained on the corpus itself.

A TokenizerSpec (spdf.data.specs) chooses:

    TokenizerSpec(kind="train", vocab_size=4096, max_bytes=None)   # offline default; reused from save_dir if present
    TokenizerSpec(kind="file", path="path/to/tokenizer.json")
    TokenizerSpec(kind="hub", name="gpt2")                           # GPT-2: 50257 tokens, eos <|endoftext|> = 50256
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import DataError
from ..fswrite import write_text_atomic
from ..layout import TOKENIZER_FILE, TOKENIZER_RECORD_FILE
from .specs import TokenizerSpec

EOS_TOKEN = "<|endoftext|>"
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>")
_MIN_VOCAB = 257  # 256 byte symbols + the end-of-text token


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus what training needs: eos_id, vocab_size, path and the file's sha256."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as e:
            raise DataError(f"cannot read tokenizer file '{self.path}': {' '.join(str(e).split())[:200]}") from None
        self.file_hash = hashlib.sha256(self.path.read_bytes()).hexdigest()
        check_recorded_hash(self.path, self.file_hash)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        eos = next((t for t in _EOS_CANDIDATES if self.tokenizer.token_to_id(t) is not None), None)
        if eos is None:
            raise DataError(f"tokenizer '{self.path}' has no end-of-text token; expected one of {_EOS_CANDIDATES}")
        self.eos_token, self.eos_id = eos, self.tokenizer.token_to_id(eos)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"TextTokenizer('{self.path}', vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def read_record(record_path: Path) -> dict | None:
    """The sidecar that says how a run directory's tokenizer.json was made (None if there is none)."""
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise DataError(f"{record_path} is unreadable ({type(e).__name__}); restore it or make the run again") from None
    if not isinstance(record, dict):
        raise DataError(f"{record_path} is not a tokenizer record (expected a JSON object)")
    return record


def check_recorded_hash(path: Path, file_hash: str) -> None:
    """A run directory's tokenizer.json must match the sha256 its sidecar recorded when it was made: a flipped bit
    can leave valid JSON (and a different vocabulary) that would otherwise load without a word."""
    record_path = path.parent / TOKENIZER_RECORD_FILE
    record = read_record(record_path) if path.name == TOKENIZER_FILE else None
    recorded = record.get("sha256") if record else None
    if recorded is not None and recorded != file_hash:
        raise DataError(f"{path} does not match the checksum recorded in {record_path} when it was "
                        f"made (damaged or edited); restore it (each export of the run holds a copy: "
                        f"phases/<phase>/export/tokenizer.json)")


def record_tokenizer(path: Path, record: dict, data: bytes | None = None) -> None:
    """Write the sidecar of `path` with `record` plus the sha256 of `data`, the bytes about to be written to `path`
    (default: the file's own bytes)."""
    sha = hashlib.sha256(Path(path).read_bytes() if data is None else data).hexdigest()
    write_text_atomic(Path(path).parent / TOKENIZER_RECORD_FILE, json.dumps({**record, "sha256": sha}))


def _save_with_record(tokenizer: Tokenizer, path: Path, record: dict) -> None:
    """The sidecar (how it was made, and the file's sha256) first, the tokenizer last: its presence means the pair
    is complete."""
    text = tokenizer.to_str(pretty=True)
    write_text_atomic(path.parent / TOKENIZER_RECORD_FILE,
                      json.dumps({**record, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}))
    write_text_atomic(path, text)


def train_bpe(documents: Iterable[str], vocab_size: int, max_bytes: int | None = None) -> Tokenizer:
    """A byte-level BPE (GPT-2 style: no unknown tokens, exact round trip) with `<|endoftext|>` as id 0."""
    if not isinstance(vocab_size, int) or not _MIN_VOCAB <= vocab_size <= 2**32:
        raise DataError(f"tokenizer vocab_size must be an integer >= {_MIN_VOCAB}, got {vocab_size!r}")

    n_docs = 0

    def capped() -> Iterable[str]:
        nonlocal n_docs
        total = 0
        for doc in documents:
            n_docs += 1
            yield doc
            total += len(doc.encode("utf-8"))
            if max_bytes is not None and total >= max_bytes:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(capped(), trainer=trainer)
    if not n_docs:
        raise DataError("cannot train a tokenizer on an empty corpus: the source yielded no documents")
    return tok


def load_or_train_tokenizer(spec: TokenizerSpec, documents: Iterable[str] | None,
                            save_dir: str | os.PathLike) -> TextTokenizer:
    """A TextTokenizer as `spec` says.

    kind "train": reuse `save_dir/tokenizer.json` if it was trained with the same spec, else train a byte-level BPE
    on `documents` (an iterable of str, consumed once; `max_bytes` caps how much of it is read) and save it there
    atomically. kind "file": load that file. kind "hub": download (online only) and save a copy in `save_dir`, so
    later runs and the data cache key use the same file. `documents` is only read for kind "train".
    """
    if spec.kind == "file":
        path = Path(spec.path)
        if not path.is_file():
            raise DataError(f"tokenizer file not found: '{path}'")
        return TextTokenizer(path)

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    path, record_path = save_dir / TOKENIZER_FILE, save_dir / TOKENIZER_RECORD_FILE
    # A sidecar records how the saved file was made, so a changed spec never silently reuses the wrong vocab.
    if spec.kind == "hub":
        record = {"kind": "hub", "name": spec.name}
    else:
        record = {"kind": "train", "vocab_size": spec.vocab_size, "max_bytes": spec.max_bytes}
    if path.is_file():
        previous = read_record(record_path)
        if previous is not None:
            previous = {k: v for k, v in previous.items() if k != "sha256"}  # the file's checksum, not the spec
        if previous != record:
            raise DataError(f"'{path}' was made with {previous} but the spec asks {record}; "
                            f"delete it or choose another save_dir")
        return TextTokenizer(path)
    if spec.kind == "hub":
        try:
            tok = Tokenizer.from_pretrained(spec.name)
        except Exception as e:
            raise DataError(f"could not fetch tokenizer '{spec.name}' from the Hugging Face Hub "
                            f"({type(e).__name__}); offline? use tokenizer kind 'train' (with vocab_size) or "
                            f"kind 'file' (with path)") from None
    elif documents is None:
        raise DataError("tokenizer kind 'train' needs documents to train on")
    else:
        tok = train_bpe(documents, record["vocab_size"], record["max_bytes"])
    _save_with_record(tok, path, record)
    return TextTokenizer(path)
