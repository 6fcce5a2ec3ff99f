"""Tokenizing one cache entry across the ranks of a multi-process launch, through files in the entry.

Batch i of the document stream (batch_docs documents, numbered from the start of the stream, so a resumed
preparation numbers them as the first one did) is tokenized by rank i % world. Every rank reads the whole stream
(reading is cheap next to tokenizing) and encodes only its own batches, each with its own worker processes. A helper
rank (rank > 0) writes each encoded batch atomically to `<entry>/.spool-<batch_docs>/<i>.npz`; rank 0 writes the
token files exactly as one process does, taking batch after batch in order: its own from its workers, the others'
from the spool (deleting each once taken). So the bytes are those of a one-process preparation for any number of
ranks, and rank 0's commits and resume work unchanged. Two markers, both functions of the data alone (so one left by
a killed run is still true): `stop` (rank 0 has every batch it needs, up to this index) and `end` (the stream has
this many batches). The ranks must share the cache directory's file system (spdf.train checks this before using it).
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np

from ..fswrite import write_text_atomic

POLL_SECONDS = 0.02


class RankShare:
    def __init__(self, entry: Path, rank: int, world: int, batch_docs: int,
                 complete: Callable[[], bool] = lambda: False, ahead: int = 4):
        # batches are numbered in units of batch_docs: spool files of another batch size are other batches
        self.spool, self.rank, self.world = Path(entry) / f".spool-{batch_docs}", int(rank), int(world)
        # whether the entry is complete (another process built it meanwhile: rank 0 then takes nothing)
        self.complete = complete
        self.ahead = ahead  # batches a helper may have waiting in the spool before it pauses
        self.spool.mkdir(parents=True, exist_ok=True)
        self.encoded_batches = 0  # batches this rank tokenized (reported, and checked by the tests)

    def owner(self, index: int) -> int:
        return index % self.world

    def _path(self, index: int) -> Path:
        return self.spool / f"{index:012d}.npz"

    def _marker(self, name: str) -> int | None:
        path = self.spool / name
        return json.loads(path.read_text())["batch"] if path.is_file() else None

    def _set_marker(self, name: str, index: int) -> None:
        write_text_atomic(self.spool / name, json.dumps({"batch": index}))

    # ---- rank 0 ------------------------------------------------------------------------------------------------
    def take(self, index: int) -> tuple[int, list] | None:
        """Batch `index` of another rank, waiting for it; None when the stream ended before it."""
        path = self._path(index)
        while not path.is_file():
            end = self._marker("end")
            if end is not None and index >= end:
                return None
            time.sleep(POLL_SECONDS)
        with np.load(path) as data:
            n_docs, is_val, lengths, ids = int(data["n_docs"]), data["is_val"], data["lengths"], data["ids"]
        path.unlink()
        return n_docs, list(zip(is_val.tolist(), np.split(ids, np.cumsum(lengths)[:-1]) if len(lengths) else []))

    def stop(self, index: int) -> None:
        """No batch after `index` is needed (rank 0 reached the token budget there)."""
        self._set_marker("stop", index)

    # ---- helper ranks ------------------------------------------------------------------------------------------
    def stopped(self, index: int) -> bool:
        """Whether rank 0 needs no batch `index` (it has all it needs, or the entry is complete without it)."""
        stop = self._marker("stop")
        return (stop is not None and index > stop) or self.complete()

    def put(self, index: int, n_docs: int, encoded: list, written: deque) -> None:
        while len(written) >= self.ahead and written[0].is_file():  # rank 0 has not taken the oldest yet
            if self.stopped(index):
                return
            time.sleep(POLL_SECONDS)
        while written and not written[0].is_file():
            written.popleft()
        lengths = np.array([len(ids) for _, ids in encoded], dtype=np.int64)
        ids = np.concatenate([ids for _, ids in encoded]) if encoded else np.zeros(0, dtype=np.int64)
        path = self._path(index)
        tmp = self.spool / f".{path.stem}.{os.getpid()}.tmp.npz"
        np.savez(tmp, n_docs=n_docs, is_val=np.array([v for v, _ in encoded], dtype=bool), lengths=lengths, ids=ids)
        os.replace(tmp, path)
        written.append(path)

    def end(self, batches: int) -> None:
        """The stream has `batches` batches in all (counted from its start)."""
        self._set_marker("end", batches)

    def clean_up(self, written: deque) -> None:
        """Remove this helper's batches that rank 0 did not need (past its stop), once the entry is complete."""
        for path in written:
            path.unlink(missing_ok=True)
