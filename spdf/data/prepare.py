"""Tokenize a document stream into the train/val token files in parallel, resumably and deterministically.

Documents are read in order, in fixed-size batches, from the one source iterator in this process; the batches are
encoded by a pool of worker processes (each loads the tokenizer from its file) and their results are written back in
batch order, so the output is byte-identical for any number of workers. Under a multi-process launch the batches are
shared out among the ranks too (spdf.data.rank_share): rank 0 writes, the others only encode. Every `commit_batches`
batches the files are flushed and fsync'ed, then the progress (documents consumed, file sizes, counts) is written
atomically to `progress_path`; a preparation killed at any point restarts from the last commit: the files are cut
back to the recorded sizes and the consumed documents are skipped. packing.py owns the cache entry's layout and its
meta.json.
"""
from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import sys
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from ..fswrite import write_text_atomic
from .rank_share import RankShare
from .sources import stable_fraction
from .tokenizer import TextTokenizer

SPLITS = ("train", "val")
_FLUSH_TOKENS = 1 << 20

_worker_tokenizer: TextTokenizer | None = None


def default_workers() -> int:
    """The cores this process may run on (a cgroup/affinity limit counts, not the node's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    # the parallelism is across processes; the tokenizers library's own thread pool would oversubscribe the cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = TextTokenizer(tokenizer_path)


def _encode(batch: list[str], tokenizer: TextTokenizer, val_fraction: float) -> list[tuple[bool, np.ndarray]]:
    """(is_val, ids + EOS as int64) per document, in order; the split is by content, as in build_packed_splits."""
    return [(stable_fraction(text) < val_fraction, np.asarray(ids + [tokenizer.eos_id], dtype=np.int64))
            for text, ids in zip(batch, tokenizer.encode_batch(batch))]


def _encode_in_worker(batch: list[str], val_fraction: float):
    return len(batch), _encode(batch, _worker_tokenizer, val_fraction)


def _encoded_batches(batches: Iterator[list[str]], tokenizer: TextTokenizer, val_fraction: float,
                     workers: int) -> Iterator[tuple[int, list]]:
    """(documents in the batch, encoded documents) per batch, in input order."""
    first = next(batches, None)
    if first is None:
        return
    second = next(batches, None)
    batches = itertools.chain([first] + ([second] if second is not None else []), batches)
    if workers <= 1 or second is None:  # one batch is not worth a pool's start-up (seconds: each worker imports)
        for batch in batches:
            yield len(batch), _encode(batch, tokenizer, val_fraction)
        return
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe with the tokenizers library's threads (and torch's)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.path),)) as pool:
        # apply_async with a bounded queue, not imap: imap's feeder thread would read the whole corpus into memory
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch, val_fraction)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _own_batches(batches: Iterator[list[str]], first: int, share: RankShare) -> Iterator[tuple[int, list[str]]]:
    """(index, batch) of this rank's batches; at the end of the stream the `end` marker says how many there were."""
    count = first
    for index, batch in enumerate(batches, first):
        count = index + 1
        if share.owner(index) == share.rank:
            yield index, batch
    share.end(count)


def _merged_batches(batches: Iterator[list[str]], first: int, share: RankShare, tokenizer: TextTokenizer,
                    val_fraction: float, workers: int) -> Iterator[tuple[int, list]]:
    """Rank 0: every batch in order, its own encoded here, the others' taken from the spool."""
    results = _encoded_batches((b for _, b in _own_batches(batches, first, share)), tokenizer, val_fraction, workers)
    try:
        for index in itertools.count(first):
            if share.owner(index) == share.rank:
                result = next(results, None)
                share.encoded_batches += result is not None
            else:
                result = share.take(index)
            if result is None:
                return
            yield result
    finally:
        results.close()


def help_tokenize(share: RankShare, paths: dict[str, Path], progress_path: Path, key: str, docs: Iterable[str],
                  tokenizer: TextTokenizer, val_fraction: float, batch_docs: int, workers: int) -> deque:
    """A helper rank: encode this rank's batches after rank 0's last commit into the spool, until rank 0 needs no
    more or the stream ends; returns the spool files written (for RankShare.clean_up). `paths`: rank 0's partial
    token files (whether its commit can be resumed is decided from them, as rank 0 decides it)."""
    state = _resumable_progress(progress_path, key, paths)
    documents = state["documents"] if state else 0
    docs = itertools.islice(iter(docs), documents, None)
    batches = iter(lambda: list(itertools.islice(docs, batch_docs)), [])
    indices: deque = deque()

    def own() -> Iterator[list[str]]:
        for index, batch in _own_batches(batches, documents // batch_docs, share):
            if share.stopped(index):
                return
            indices.append(index)
            yield batch

    written: deque = deque()
    results = _encoded_batches(own(), tokenizer, val_fraction, workers)
    try:
        for n_docs, encoded in results:
            index = indices.popleft()
            if share.stopped(index):
                break
            share.put(index, n_docs, encoded, written)
            share.encoded_batches += 1
    finally:
        results.close()
    return written


def _read_progress(progress_path: Path, key: str, warn: bool) -> dict | None:
    """The commit in `progress_path` if it is one of this `key`'s; None if there is none, or it is another key's or
    unreadable (damaged by hand or by a file system that lost it): the preparation then starts from the first
    document, which gives the same bytes."""
    if not progress_path.is_file():
        return None
    try:
        progress = json.loads(progress_path.read_text(encoding="utf-8"))
        if not (isinstance(progress["documents"], int) and all(isinstance(progress["bytes"][s], int) and
                                                              isinstance(progress["counts"][s]["tokens"], int)
                                                              for s in SPLITS)):
            raise TypeError("a number expected")
    except (OSError, ValueError, KeyError, TypeError) as e:
        if warn:
            print(f"spdf: warning: {progress_path} is unreadable ({type(e).__name__}); tokenizing this cache entry "
                  f"again from the start", file=sys.stderr, flush=True)
        return None
    return progress if progress.get("key") == key else None


def _resumable_progress(progress_path: Path, key: str, paths: dict[str, Path], warn: bool = False) -> dict | None:
    """The last commit of this `key`'s preparation, if every partial file in `paths` still holds the bytes it
    recorded; None to start from the first document. A file that is missing or shorter (renamed into the entry by a
    build killed while finishing it, or cut by hand) cannot be resumed: truncate() would pad it with zeros up to the
    recorded size, packed as token 0 and checksummed as if they were data. Every rank decides alike: rank 0 only
    shortens a partial file below its commit when it starts over."""
    state = _read_progress(progress_path, key, warn)
    if state is None:
        return None
    short = [s for s in SPLITS if state["bytes"][s] and
             (not paths[s].is_file() or paths[s].stat().st_size < state["bytes"][s])]
    if not short:
        return state
    if warn:
        print(f"spdf: warning: {paths[short[0]]} is shorter than the last commit of its preparation; tokenizing "
              f"this cache entry again from the start", file=sys.stderr, flush=True)
    return None


def _write_progress(progress_path: Path, progress: dict) -> None:
    write_text_atomic(progress_path, json.dumps(progress))


def tokenize_splits(paths: dict[str, Path], progress_path: Path, key: str, docs: Iterable[str],
                    tokenizer: TextTokenizer, val_fraction: float, max_tokens: int | None, dtype: str,
                    batch_docs: int = 256, workers: int = 1, commit_batches: int = 64,
                    progress: bool = False, share: RankShare | None = None) -> dict:
    """Write each document's ids + EOS to paths["train"] or paths["val"] (by stable_fraction of its text), resuming
    from `progress_path` when it holds a commit of the same `key`; returns {"counts", "truncated"}.

    `max_tokens` stops after that many tokens (EOS included), cutting the last document. The progress file is left in
    place: the caller removes it once the result is complete (its meta.json written). With `share` (rank 0 of a
    multi-process launch) the other ranks encode their share of the batches (help_tokenize); the bytes are the same.
    """
    state = _resumable_progress(progress_path, key, paths, warn=True) or {
        "key": key, "documents": 0, "bytes": {s: 0 for s in SPLITS},
        "counts": {s: {"tokens": 0, "documents": 0} for s in SPLITS}}
    counts, documents = state["counts"], state["documents"]
    total = sum(c["tokens"] for c in counts.values())
    files, stream = {}, None
    try:
        for s in SPLITS:
            # cut back to the last commit: whatever was written after it is written again
            files[s] = open(paths[s], "r+b" if paths[s].exists() else "wb")
            files[s].truncate(state["bytes"][s])
            files[s].seek(state["bytes"][s])
        docs = itertools.islice(iter(docs), documents, None)  # the committed documents are read again but not tokenized
        batches = iter(lambda: list(itertools.islice(docs, batch_docs)), [])
        first = documents // batch_docs  # commits fall between whole batches: the index of the next batch
        stream = (_encoded_batches(batches, tokenizer, val_fraction, workers) if share is None else
                  _merged_batches(batches, first, share, tokenizer, val_fraction, workers))
        buffers: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        buffered = {s: 0 for s in SPLITS}
        truncated = False

        def flush(split: str) -> None:
            if buffers[split]:
                np.concatenate(buffers[split]).astype(dtype).tofile(files[split])
                buffers[split].clear()
                buffered[split] = 0

        def commit() -> None:
            for s in SPLITS:
                flush(s)
                files[s].flush()
                os.fsync(files[s].fileno())
            _write_progress(progress_path, {"key": key, "documents": documents, "counts": counts,
                                            "bytes": {s: files[s].tell() for s in SPLITS}})

        bar = tqdm(total=max_tokens, initial=total, unit="tok", unit_scale=True, desc="tokenize+pack",
                   disable=not progress)
        for n_batch, (n_docs, encoded) in enumerate(stream, 1):
            before = total
            for is_val, ids in encoded:
                if max_tokens is not None and total + len(ids) >= max_tokens:
                    ids, truncated = ids[:max_tokens - total], True
                split = "val" if is_val else "train"
                buffers[split].append(ids)
                buffered[split] += len(ids)
                counts[split]["tokens"] += len(ids)
                counts[split]["documents"] += 1
                total += len(ids)
                if buffered[split] >= _FLUSH_TOKENS:
                    flush(split)
                if truncated:
                    break
            documents += n_docs
            bar.update(total - before)
            if truncated:
                if share is not None:
                    share.stop(first + n_batch - 1)
                break
            if n_batch % commit_batches == 0:
                commit()
        bar.close()
        for s in SPLITS:  # on disk before the caller renames them into the entry and writes its meta.json
            flush(s)
            files[s].flush()
            os.fsync(files[s].fileno())
    finally:
        if stream is not None:
            stream.close()  # its worker pool stops now, not when collected
        for f in files.values():
            f.close()
    return {"counts": counts, "truncated": truncated}
