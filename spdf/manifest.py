"""Content manifests: one `manifest.json` per checkpoint or export, naming every file with its size and sha256.

It is written last, after every other file is complete, so its presence says "this directory was finished" and its
hashes say "and no byte has changed since". A flipped byte in the middle of a tensor loads without error (the
safetensors header is intact), so only a content hash catches it. sha256 through hashlib.file_digest reads at
disk/page-cache speed; benchmarks/results/manifest_cost.md compares it with the cost of writing a checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_FILE = "manifest.json"


class ManifestError(ValueError):
    """A directory whose files do not match its manifest (changed, truncated, missing) or whose manifest is unreadable."""


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: Path) -> Path:
    """Hash every file under `directory` (the manifest itself excepted) and write the manifest atomically."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _digest(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    tmp = directory / f".{MANIFEST_FILE}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"version": 1, "hash": "sha256", "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST_FILE)
    return directory / MANIFEST_FILE


def has_manifest(directory: Path) -> bool:
    return (Path(directory) / MANIFEST_FILE).is_file()


def verify_manifest(directory: Path) -> int:
    """Check every file the manifest names (size first, then content); returns how many. Raises ManifestError naming
    the first file that differs. Files the manifest does not name are ignored (e.g. an evaluation report later
    written into an export)."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        raise ManifestError(f"{directory} has no {MANIFEST_FILE}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{directory / MANIFEST_FILE} is unreadable ({type(e).__name__})") from None
    for name, entry in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            raise ManifestError(f"{path} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ManifestError(f"{path} has {size} bytes, the manifest says {entry['bytes']} (truncated?)")
        if _digest(path) != entry["sha256"]:
            raise ManifestError(f"{path} does not match its sha256 in the manifest (damaged)")
    return len(files)
