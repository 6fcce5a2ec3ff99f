"""spdf's one durable writer: writes that fail as one clear line: disk full or a read-only/forbidden destination
becomes a WriteError naming the path (and, for a full disk, the space needed), after the partial temporary file or
directory is removed; single files replaced atomically (temporary file, fsync, then rename), JSON among them (and
read back with a one-line error for a missing or corrupt file).

Not every writer says "disk full" the same way: Python raises OSError(ENOSPC), safetensors a SafetensorError whose
text holds "No space left on device (os error 28)", and torch.save's C++ stream writer a RuntimeError ("unexpected
pos …", "basic_ios::clear: iostream error", "file write failed") with no errno at all. write_failure() recognises
each of them; for torch's, by the free space left on the device when it failed.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import CheckpointError, SpdfUserError


class WriteError(SpdfUserError):
    """A checkpoint, export or run file could not be written for a reason the user must fix (space, permissions)."""


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


_FULL_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
# torch.save's PyTorchStreamWriter (inline_container.cc) reports a failed write without an errno
_TORCH_WRITER_TEXTS = ("inline_container", "pytorchstreamwriter", "iostream error", "file write failed",
                       "unexpected pos")
_ROOM = 64 << 20  # a device with less than this free after a failed torch.save counts as full


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def write_failure(e: BaseException, what: str, target: Path, needed_bytes: int = 0) -> WriteError | None:
    """The WriteError to report for a failed write of `what` into `target`, or None if `e` is no filesystem problem
    (a bug, an interrupt: it must pass through as it is)."""
    text = str(e).lower()
    code = e.errno if isinstance(e, OSError) else None
    full = code in (errno.ENOSPC, errno.EDQUOT) or (isinstance(e, Exception) and any(t in text for t in _FULL_TEXTS))
    if not full and isinstance(e, RuntimeError) and any(t in text for t in _TORCH_WRITER_TEXTS):
        free = _free_bytes(target)
        full = free is not None and free < max(_ROOM, needed_bytes // 100)
        if not full:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return WriteError(f"could not write {what} into {target}: {first}")
    if full:
        free = _free_bytes(target) or 0
        need = f"it needs about {_mb(needed_bytes)}, " if needed_bytes else ""
        return WriteError(f"no space left on the device writing {what} into {target}: {need}{_mb(free)} free; free "
                          f"some space and run the same command again (temporary files removed)")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return WriteError(f"cannot write {what} into {target}: {e.strerror}")
    return None


@contextlib.contextmanager
def writing_dir(tmp: Path, what: str, needed_bytes: int):
    """Run the body, which fills the temporary directory `tmp`; on a filesystem error (disk full, read-only,
    forbidden; whichever writer raised it) remove `tmp` and raise a WriteError. Other errors pass through, `tmp`
    removed too: a half-written directory is never left behind."""
    try:
        yield
    except BaseException as e:
        failure = write_failure(e, what, Path(tmp).parent, needed_bytes)  # before the removal frees the space
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise failure from None
        raise


@contextlib.contextmanager
def replacing_file(path: Path, what: str | None = None):
    """Yield a temporary path beside `path` for the body to fill, then rename it onto `path`: a reader sees the old
    file or the new one, never half of one. On any error the temporary file is removed and `path` is untouched; a
    full disk or a forbidden write is a WriteError naming `path`."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        failure = write_failure(e, what or path.name, path.parent)
        if failure is not None:
            raise failure from None
        raise
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # the mode a plain open() would give, not mkstemp's owner-only 0600
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        failure = write_failure(e, what or path.name, path.parent)
        Path(tmp).unlink(missing_ok=True)
        if failure is not None:
            raise failure from None
        raise


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_abandoned(paths, keep: Path | None = None) -> None:
    """Remove each directory of `paths` named `<name>.<pid>` whose writing process is gone (a writer killed mid-way
    leaves a model's worth of files under a hidden name); a live writer's, and `keep`, stay."""
    for path in paths:
        if Path(path) != keep and not _alive(Path(path).name.rpartition(".")[2]):
            shutil.rmtree(path, ignore_errors=True)


def check_dir_target(path: Path, what: str) -> None:
    """Refuse, before any work, a directory to write into that is a file or lies under one (which mkdir would only
    report as "[Errno 17] File exists" or "[Errno 20] Not a directory")."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise WriteError(f"{what} {path}: {parent} is a file, not a directory; choose another directory")


# what a file system that cannot fsync a directory says (some FUSE and network ones): nothing more can be done there
_NO_DIRECTORY_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF, errno.EACCES}


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)  # a read-only descriptor flushes the file's (or directory's) dirty data too
    except OSError as e:
        if Path(path).is_dir() and e.errno in _NO_DIRECTORY_SYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not (Path(path).is_dir() and e.errno in _NO_DIRECTORY_SYNC):
            raise
    finally:
        os.close(fd)


def sync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then every directory (itself last): called before a rename publishes a
    checkpoint or export, so that after a power loss the published name never holds files the disk did not get
    (zero-length, or holes of zeros), while the older checkpoints that rotation deleted next are gone. Files in
    parallel threads (the kernel writes each back on its own). Inside writing_dir: a full disk reported only now
    (delayed allocation, quotas, network file systems) is a WriteError like any other."""
    directory = Path(directory)
    paths = sorted(directory.rglob("*"), key=lambda p: -len(p.parts))  # deepest first: a directory after its files
    files = [p for p in paths if p.is_file()]
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(files), os.cpu_count() or 1))) as pool:
        list(pool.map(_fsync, files))
    for d in [p for p in paths if p.is_dir()] + [directory]:
        _fsync(d)


def sync_dir(directory: Path) -> None:
    """fsync a directory: a rename inside it (a checkpoint or export published) reaches the disk before the caller
    deletes anything older."""
    _fsync(Path(directory))


def write_text_atomic(path: Path, text: str) -> None:
    with replacing_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # a full disk may only show at the flush; a rename must not publish a short file


def finite_json(value):
    """`value` with every NaN/inf float replaced by None: JSON has no NaN, and strict readers refuse a bare `NaN`."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json_atomic(path: Path, data: dict) -> None:
    # a temporary file per call (two writers never share one), removed on any error; a full disk names `path`
    write_text_atomic(path, json.dumps(finite_json(data), indent=2, sort_keys=True, allow_nan=False))


def read_json(path: Path, what: str) -> dict:
    """The JSON object of a file spdf wrote (a checkpoint's or export's description, a run's record): a missing or
    corrupt one is a CheckpointError naming `what` and the path."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what}: {path} is corrupt ({e})") from None


def append_line(path: Path, line: str) -> None:
    """Append one line to a log file (metrics.jsonl); a full disk is a WriteError naming the file."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        failure = write_failure(e, str(path), Path(path).parent)
        if failure is not None:
            raise failure from None
        raise
