"""Content manifests: one `manifest.json` per checkpoint or export, naming every file with its size and CRC-32.

It is written last, after every other file is complete, so its presence says "this directory was finished" and its
hashes say "and no byte has changed since". A flipped byte in the middle of a tensor loads without error (the
safetensors header is intact), so only a content hash catches it. The damage to catch is accidental (bad disks,
cut copies, flipped bits), not tampering, so the hash is zlib's CRC-32: measured 2.6 GB/s from the page cache against
0.96 GB/s for sha256, and a random change escapes it with probability 2^-32 (the size is checked too). Files are
hashed one thread each, in parallel (zlib releases the GIL). The check right after a write compares sizes only (the
hashes were just computed from those very bytes; re-hashing the page cache would prove nothing more); loading
re-hashes everything. benchmarks/results/manifest_cost.md compares both with the cost of writing a checkpoint.
"""
from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import SpdfUserError
from .fswrite import write_text_atomic
from .layout import MANIFEST_FILE


class ManifestError(SpdfUserError):
    """A directory whose files do not match its manifest (changed, truncated, missing) or whose manifest is unreadable."""


HASH = "crc32"
_BLOCK = 8 << 20


def crc32_of(path: Path, start: int = 0, length: int | None = None) -> str:
    """CRC-32 (8 hex digits) of `length` bytes of `path` from `start` (to the end if None), read in 8 MiB blocks."""
    crc, buf = 0, bytearray(_BLOCK)
    view = memoryview(buf)
    left = length if length is not None else float("inf")
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while left > 0 and (n := f.readinto(view[:int(min(_BLOCK, left))])):
            crc = zlib.crc32(view[:n], crc)
            left -= n
    return f"{crc:08x}"


def _digest(path: Path) -> str:
    return crc32_of(path)


def _digests(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths), os.cpu_count() or 1))) as pool:
        return list(pool.map(_digest, paths))


def write_manifest(directory: Path) -> Path:
    """Checksum every file under `directory` (the manifest itself excepted) and write the manifest atomically."""
    directory = Path(directory)
    paths = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE]
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, HASH: digest}
             for p, digest in zip(paths, _digests(paths))}
    write_text_atomic(directory / MANIFEST_FILE,
                      json.dumps({"version": 1, "hash": HASH, "files": files}, indent=1, sort_keys=True))
    return directory / MANIFEST_FILE


def files_under(directory: Path) -> tuple[str, ...]:
    """Every file under `directory` but its manifest, relative to it: what a checkpoint's manifest must list (nothing
    is added to a checkpoint after its manifest, unlike an export, which may gain an evaluation report later)."""
    directory = Path(directory)
    return tuple(str(p.relative_to(directory)) for p in sorted(directory.rglob("*"))
                 if p.is_file() and p.name != MANIFEST_FILE)


def has_manifest(directory: Path) -> bool:
    return (Path(directory) / MANIFEST_FILE).is_file()


def verify_manifest(directory: Path, content: bool = True, required: tuple[str, ...] = ()) -> int:
    """Check every file the manifest names (size, then with `content` its CRC-32); returns how many. Raises
    ManifestError naming the first file that differs, or the first of `required` (the files a checkpoint or export
    must have) that the manifest does not name: a manifest listing nothing proves nothing. Files the manifest does
    not name are otherwise ignored (e.g. an evaluation report later written into an export)."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files")
        if manifest["hash"] != HASH:
            raise ValueError(f"unknown hash {manifest['hash']!r}")
    except FileNotFoundError:
        raise ManifestError(f"{directory} has no {MANIFEST_FILE}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{directory / MANIFEST_FILE} is unreadable ({type(e).__name__})") from None
    if not files:
        raise ManifestError(f"{directory / MANIFEST_FILE} lists no files (it must name every file of the directory)")
    unlisted = [name for name in required if name not in files]
    if unlisted:
        raise ManifestError(f"{directory / MANIFEST_FILE} does not list {unlisted[0]}, which the directory must have")
    names = sorted(files)
    for name in names:
        path = directory / name
        if not path.is_file():
            raise ManifestError(f"{path} is missing")
        size = path.stat().st_size
        if size != files[name]["bytes"]:
            raise ManifestError(f"{path} has {size} bytes, the manifest says {files[name]['bytes']} (truncated?)")
    if content:
        for name, digest in zip(names, _digests([directory / n for n in names])):
            if digest != files[name][HASH]:
                raise ManifestError(f"{directory / name} does not match its checksum in the manifest (damaged)")
    return len(files)
