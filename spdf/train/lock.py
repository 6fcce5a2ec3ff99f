"""One writer per run directory: an advisory flock on `<run_dir>/.lock`, held for the life of the run.

The kernel drops a flock when its holder exits in any way (SIGKILL included), so a lock is never stale; the pid
and host written into the file only serve the message a second run prints. Under a multi-process launch only the
main process takes it: the other ranks are the same run.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from ..errors import SpdfUserError
from ..layout import RunLayout


class RunDirLocked(SpdfUserError):
    """Another spdf process is writing this run directory."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = RunLayout(run_dir).lock
        self._fd: int | None = None

    def acquire(self, shared: bool = False) -> "RunLock":
        """shared: as a reader (`spdf export`): readers run together, never beside the writer."""
        fd = self._open_for_reading() if shared else os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fd is None:
            return self
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown process"
            if not shared and _only_readers(fd):  # the pid in the file is the last writer's, not a reader's
                holder = "a reader (spdf export)"
            os.close(fd)
            raise RunDirLocked(f"run directory {self.path.parent} is in use by {holder}; wait for it to finish or "
                               f"stop it, or choose another run_dir") from None
        if shared:  # several readers may hold it: the file keeps naming its writer
            self._fd = fd
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def _open_for_reading(self) -> int | None:
        """The lock file opened read-only (a flock needs no more), or None where this process cannot create it (a
        read-only copy or mount of a finished run): no writer can run there either, and reading it must not fail."""
        try:
            return os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            pass
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return None
            raise

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _only_readers(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True
