"""Directory writes that fail as one clear line: disk full or a read-only/forbidden destination becomes a WriteError
naming the path (and, for a full disk, the space needed), after the partial temporary directory is removed."""
from __future__ import annotations

import contextlib
import errno
import shutil
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
