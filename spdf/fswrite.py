"""Directory writes that fail as one clear line: disk full or a read-only/forbidden destination becomes a WriteError
naming the path (and, for a full disk, the space needed), after the partial temporary directory is removed; and
single files replaced atomically (temporary file, then rename)."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path


class WriteError(ValueError):
    """A checkpoint, export or run file could not be written for a reason the user must fix (space, permissions)."""


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


@contextlib.contextmanager
def writing_dir(tmp: Path, what: str, needed_bytes: int):
    """Run the body, which fills the temporary directory `tmp`; on a filesystem error remove `tmp` and raise a
    WriteError (other errors pass through, `tmp` removed too: a half-written directory is never left behind)."""
    try:
        yield
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        target = Path(tmp).parent
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = shutil.disk_usage(target).free
            except OSError:
                free = 0
            raise WriteError(f"no space left on the device writing {what} into {target}: it needs about "
                             f"{_mb(needed_bytes)}, {_mb(free)} free; free some space and run the same command "
                             f"again (temporary files removed)") from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise WriteError(f"cannot write {what} into {target}: {e.strerror}") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def replacing_file(path: Path):
    """Yield a temporary path beside `path` for the body to fill, then rename it onto `path`: a reader sees the old
    file or the new one, never half of one. On any error the temporary file is removed and `path` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # the mode a plain open() would give, not mkstemp's owner-only 0600
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with replacing_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
