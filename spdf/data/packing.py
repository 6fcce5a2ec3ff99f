"""Tokenize a source once, pack it into fixed-length sequences in memory-mapped token files, cache by content.

Layout of one cache entry, `cache_dir/<key>/`: `train.bin`, `val.bin` (flat token streams, uint16 when the vocab
has fewer than 65536 tokens, else uint32; every document is followed by EOS) and `meta.json`, written last and
atomically, so an entry with a meta.json is complete; it holds a CRC-32 per 64 MiB chunk of each token file,
verified whenever the entry is reused (spdf.data.checksums). Sequence i of a split is tokens[i*seq_len : i*seq_len+seq_len+1]:
seq_len+1 tokens (inputs = row[:-1], targets = row[1:]); consecutive rows share one boundary token, so every token
after the first is a target exactly once. The tail that does not fill a row is dropped (meta "dropped_tokens").
While an entry is being built it holds `.train.bin.partial`, `.val.bin.partial` and `.progress.json` (spdf.data.prepare:
parallel, resumable tokenization) and a `.build.lock` held by the building process.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from pathlib import Path
import numpy as np
import torch

from .checksums import chunk_checksums, verify_chunk_checksums
from .errors import DataError
from ..fswrite import write_text_atomic
from ..typed_spec import to_plain
from .prepare import SPLITS, default_workers, help_tokenize, tokenize_splits
from .rank_share import RankShare
from .sources import iter_documents, source_fingerprint
from .specs import DataSpec
from .tokenizer import TextTokenizer

FORMAT_VERSION = 1


class PackedDataset(torch.utils.data.Dataset):
    """Rows of seq_len+1 tokens (LongTensor) read from a flat token file through a lazily opened np.memmap."""

    def __init__(self, path: str | os.PathLike, seq_len: int, dtype: str = "uint16", content: str | None = None):
        """content: what the file's bytes are (build_packed_splits gives the sha256 of its recorded chunk
        checksums), so a resumed run can tell that its data is the same; None where unknown."""
        self.path, self.seq_len, self.dtype = Path(path), int(seq_len), np.dtype(dtype)
        self.content = content
        if not self.path.is_file():
            raise DataError(f"token file not found: '{self.path}'")
        self.n_tokens = self.path.stat().st_size // self.dtype.itemsize
        self._tokens = None  # opened on first use so the dataset pickles cheaply into DataLoader workers

    @property
    def tokens(self) -> np.ndarray:
        """The whole flat token stream (memory-mapped, read-only)."""
        if self._tokens is None:
            self._tokens = (np.memmap(self.path, dtype=self.dtype, mode="r") if self.n_tokens
                            else np.zeros(0, dtype=self.dtype))
        return self._tokens

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int) -> torch.Tensor:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences")
        start = (i % n) * self.seq_len
        return torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}


# Settings added after cache entries already existed: left out of the key while unset, so those entries stay valid.
_ADDED_LATER = ("content",)


def _keyed_source(source: DataSpec) -> dict:
    """The source's settings that decide its tokens: `workers` does not (the output is the same for any count), and
    leaving it out keeps the keys of entries built before it existed."""
    return {k: v for k, v in to_plain(source).items()
            if k != "workers" and not (k in _ADDED_LATER and v is None)}


def cache_key(source: DataSpec, tokenizer: TextTokenizer, seq_len: int) -> str:
    """sha256 over what decides the packed tokens: source spec (+ file stats), tokenizer file, seq_len, val split."""
    payload = {"version": FORMAT_VERSION, "source": _keyed_source(source), "fingerprint": source_fingerprint(source),
               "tokenizer": tokenizer.file_hash, "seq_len": seq_len}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size < 2**16 else "uint32"


def _load_cached(entry: Path, key: str) -> dict | None:
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta["splits"].values()
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"data cache {meta_path} is unreadable ({type(e).__name__}: damaged); delete {entry} and run "
                        f"again to rebuild it from the source") from None
    itemsize = np.dtype(meta["dtype"]).itemsize
    intact = meta.get("key") == key and all(
        (entry / s["file"]).is_file() and (entry / s["file"]).stat().st_size == s["tokens"] * itemsize
        for s in meta["splits"].values())
    return meta if intact else None


def verify_entry(entry: Path, meta: dict) -> None:
    """Check the token files of a complete cache entry against the chunk checksums in its meta.json (an entry of an
    older spdf has none: checked by size only, with a warning)."""
    for split in meta["splits"].values():
        recorded = split.get("checksums")
        if recorded is None:
            print(f"spdf: warning: data cache {entry} was made by an older spdf without checksums: checked by size "
                  f"only (delete it to rebuild it with them)", file=sys.stderr, flush=True)
            return
        verify_chunk_checksums(entry / split["file"], recorded, entry)


def build_packed_splits(source: DataSpec, tokenizer: TextTokenizer, cache_dir: str | os.PathLike, seq_len: int,
                        batch_docs: int = 256, progress: bool = True, ranks: tuple[int, int] = (0, 1),
                        verify: bool = True) -> tuple[PackedDataset, PackedDataset, dict]:
    """(train, val, meta): packed splits of `source`, built once into `cache_dir/<key>/` and reused afterwards.

    `source.max_tokens` stops tokenizing after that many tokens (EOS included), so a streaming corpus yields shards
    of the wanted size. Documents go to "val" when stable_fraction(text) < source.val_fraction. meta is the saved
    meta.json plus "cache_hit" (True when nothing was tokenized) and "dir" (the cache entry). A cache hit reads
    nothing of the source itself (an offline resume of a Pile run works). `source.workers` processes tokenize (None:
    one per available core); the output is the same for any count, and an interrupted build resumes from its last
    committed chunk. With `ranks` = (rank, world) of a multi-process launch every rank calls this at once: each
    tokenizes its share of the batches (spdf.data.rank_share; the cache directory must be on a file system they all
    see), rank 0 writes the entry, and meta has "rank_batches", the batches this rank tokenized. With `verify`, an
    entry found complete is checked against its content checksums (spdf.data.checksums) before it is used.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
    val_fraction, max_tokens = source.val_fraction, source.max_tokens
    key = cache_key(source, tokenizer, seq_len)
    entry = Path(cache_dir) / key[:24]
    meta = _load_cached(entry, key)
    cache_hit = meta is not None
    if cache_hit and verify:
        verify_entry(entry, meta)
    rank, world = ranks
    share = (RankShare(entry, rank, world, batch_docs, complete=lambda: _load_cached(entry, key) is not None)
             if world > 1 and meta is None else None)
    if meta is None and rank > 0 and share is not None:
        meta = _help(entry, key, source, tokenizer, batch_docs, share)
    elif meta is None:
        meta = _build(entry, key, source, tokenizer, seq_len, val_fraction, max_tokens, batch_docs, progress, share)
    dtype = meta["dtype"]
    train, val = (PackedDataset(entry / meta["splits"][s]["file"], seq_len, dtype, _content(meta["splits"][s]))
                  for s in SPLITS)
    extra = {"rank_batches": share.encoded_batches if share is not None else 0} if world > 1 else {}
    return train, val, {**meta, "cache_hit": cache_hit, "dir": str(entry), **extra}


def _content(split: dict) -> str | None:
    """The identity of a split's token file by its bytes: the sha256 of its chunk checksums and size (None for an
    entry of an older spdf, which recorded none)."""
    if split.get("checksums") is None:
        return None
    return hashlib.sha256(json.dumps([split["tokens"], split["checksums"]], sort_keys=True).encode()).hexdigest()


def _workers(source: DataSpec, share: RankShare | None) -> int:
    """source.workers, else the cores this process may use, shared among the ranks of this node."""
    if source.workers:
        return source.workers
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if share is not None else 1
    return max(1, default_workers() // max(local_ranks, 1))


def _partial_paths(entry: Path) -> dict[str, Path]:
    """The token files of an entry being built: fixed names, not per-process ones, so a killed preparation resumes
    from them and its progress file."""
    return {s: entry / f".{s}.bin.partial" for s in SPLITS}


def _help(entry: Path, key: str, source: DataSpec, tokenizer: TextTokenizer, batch_docs: int,
          share: RankShare) -> dict:
    """A helper rank: tokenize this rank's batches for rank 0, then wait until rank 0 has completed the entry."""
    written = help_tokenize(share, _partial_paths(entry), entry / ".progress.json", key, iter_documents(source),
                            tokenizer, source.val_fraction, batch_docs, _workers(source, share))
    while (meta := _load_cached(entry, key)) is None:  # rank 0 failing ends the launch, and this process with it
        time.sleep(0.1)
    share.clean_up(written)
    return meta


def _build(entry: Path, key: str, source: DataSpec, tokenizer: TextTokenizer, seq_len: int, val_fraction: float,
           max_tokens: int | None, batch_docs: int, progress: bool, share: RankShare | None = None) -> dict:
    docs = iter_documents(source)  # first: a missing file or unreachable dataset fails before anything is written
    entry.mkdir(parents=True, exist_ok=True)
    with open(entry / ".build.lock", "a") as lock:
        # two processes building one entry would interleave their writes to the same partial files: the second
        # waits, then finds the entry complete
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = _load_cached(entry, key)
        return meta if meta is not None else _build_locked(entry, key, source, docs, tokenizer, seq_len,
                                                           val_fraction, max_tokens, batch_docs, progress, share)


def _build_locked(entry: Path, key: str, source: DataSpec, docs, tokenizer: TextTokenizer, seq_len: int,
                  val_fraction: float, max_tokens: int | None, batch_docs: int, progress: bool,
                  share: RankShare | None) -> dict:
    (entry / "meta.json").unlink(missing_ok=True)  # a stale entry stops counting as complete before files change
    dtype = token_dtype(tokenizer.vocab_size)
    partial = _partial_paths(entry)
    progress_path = entry / ".progress.json"
    start = time.perf_counter()
    result = tokenize_splits(partial, progress_path, key, docs, tokenizer, val_fraction, max_tokens, dtype,
                             batch_docs=batch_docs, workers=_workers(source, share), progress=progress, share=share)
    counts = result["counts"]
    try:
        if counts["train"]["tokens"] <= seq_len:
            raise DataError(f"source {source.source!r} gave {counts['train']['tokens']} training tokens, "
                            f"not one sequence of seq_len+1 = {seq_len + 1}; add data or lower seq_len")
        if val_fraction > 0 and counts["val"]["tokens"] <= seq_len:
            raise DataError(f"val_fraction={val_fraction} held out {counts['val']['documents']} documents, "
                            f"{counts['val']['tokens']} tokens: not one sequence of {seq_len + 1}; raise val_fraction")
    except DataError:  # complete but unusable: nothing to resume
        for path in (*partial.values(), progress_path):
            path.unlink(missing_ok=True)
        raise
    splits = {}
    for s in SPLITS:
        n = counts[s]["tokens"]
        rows = max(0, (n - 1) // seq_len)
        splits[s] = {"file": f"{s}.bin", "tokens": n, "documents": counts[s]["documents"], "sequences": rows,
                     "dropped_tokens": n - rows * seq_len - 1 if rows else n,
                     "checksums": chunk_checksums(partial[s])}  # verified whenever a run reuses the entry
    # the renames last, together: a build killed among them finds a partial file gone and starts over (prepare's
    # _resumable_progress), never resumes into it
    for s in SPLITS:
        os.replace(partial[s], entry / f"{s}.bin")
    meta = {"version": FORMAT_VERSION, "key": key, "source": _keyed_source(source),
            "tokenizer_hash": tokenizer.file_hash,
            "tokenizer_path": str(tokenizer.path), "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "seq_len": seq_len, "val_fraction": val_fraction, "dtype": dtype, "max_tokens": max_tokens,
            "truncated": result["truncated"], "splits": splits,
            "build_seconds": round(time.perf_counter() - start, 3)}
    write_text_atomic(entry / "meta.json", json.dumps(meta, indent=2, sort_keys=True))
    progress_path.unlink(missing_ok=True)
    return meta
