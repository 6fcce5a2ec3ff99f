"""Content checksums of the packed token files of a data cache entry, per chunk.

The size check alone lets a zeroed or overwritten stretch of `train.bin` train silently. Each split file gets one
CRC-32 per 64 MiB chunk (spdf.manifest's hash, for the same reason: accidental damage, 2-3 GB/s per core), written
into meta.json when the entry is made and verified when a run starts, chunks in parallel threads (zlib releases the
GIL). Chunks keep a damaged region locatable in the message and let the threads share one large file.
benchmarks/results/integrity_cost.md measures the cost.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..manifest import crc32_of
from .errors import DataError

CHUNK_BYTES = 64 << 20


def _spans(size: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(chunk, size - start)) for start in range(0, size, chunk)] or [(0, 0)]


def _crcs(path: Path, spans: list[tuple[int, int]]) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(spans), os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda span: crc32_of(path, *span), spans))


def chunk_checksums(path: Path, chunk: int = CHUNK_BYTES) -> dict:
    """{"chunk_bytes", "crc32": [one per chunk]} of the file at `path`."""
    return {"chunk_bytes": chunk, "crc32": _crcs(Path(path), _spans(Path(path).stat().st_size, chunk))}


def verify_chunk_checksums(path: Path, recorded: dict, entry: Path) -> None:
    """Raise DataError naming the first chunk of `path` (a file of cache entry `entry`) whose CRC-32 differs."""
    path = Path(path)
    spans = _spans(path.stat().st_size, recorded["chunk_bytes"])
    if len(spans) != len(recorded["crc32"]):
        raise DataError(f"data cache {path}: {len(spans)} chunks on disk, {len(recorded['crc32'])} recorded in "
                        f"meta.json (truncated?); delete {entry} and run again to rebuild it from the source")
    for (start, length), got, want in zip(spans, _crcs(path, spans), recorded["crc32"]):
        if got != want:
            raise DataError(f"data cache {path}: bytes {start:,}-{start + length:,} do not match the checksum "
                            f"written when the cache was made (damaged); delete {entry} and run again to rebuild "
                            f"it from the source")
