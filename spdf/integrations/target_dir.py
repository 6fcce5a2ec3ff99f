"""Where an export into another ecosystem's format may be written, and how an earlier one is replaced.

`spdf export SOURCE OUT` replaces OUT as a whole, so OUT must be something it may delete: a path that does not exist
yet, an empty directory, or (with force=True only) a directory an earlier export of the same kind wrote. It never
writes inside, onto or around the run directory SOURCE belongs to, nor SOURCE itself, and it holds that run's lock as
a reader while it reads, so a training run can neither start nor be running meanwhile.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from ..errors import CheckpointError
from ..fswrite import remove_abandoned
from ..layout import RunLayout, temporary_dir


def run_dir_of(path: Path) -> Path | None:
    """The run directory `path` is (or lies inside: a phase, its export or a checkpoint), or None."""
    run = RunLayout.containing(path)
    return run.root if run is not None else None


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_target(out_dir: Path, protected: list[Path], is_previous: Callable[[Path], bool], kind: str,
                 force: bool) -> None:
    """Refuse (CheckpointError, one line) an `out_dir` that overlaps a protected path or holds anything but an
    earlier export of this kind; an earlier export only with force=True."""
    out = Path(out_dir).resolve()
    for path in protected:
        if _overlap(out, Path(path).resolve()):
            raise CheckpointError(f"{out_dir} overlaps {path}: spdf export never writes into, onto or around the run "
                                  f"or export it reads; choose a directory outside it")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory; choose a new or empty directory")
    if not any(out.iterdir()):
        return
    if not is_previous(out):
        raise CheckpointError(f"{out_dir} is not empty and is not an earlier {kind} export; spdf export only "
                              f"replaces its own exports: choose a new or empty directory")
    if not force:
        raise CheckpointError(f"{out_dir} holds an earlier {kind} export; pass --force to replace it")


def _old_dir(out_dir: Path, pid) -> Path:
    """Where replace_dir moves the export it replaces, until the new one is in place."""
    return out_dir.with_name(f".old-{out_dir.name}.{pid}")


def remove_abandoned_writes(out_dir: Path, keep: Path) -> None:
    """Remove what an export into `out_dir` killed mid-way left beside it: its temporary directory (a model's worth
    of files under a hidden name) and the earlier export it was replacing (the new one goes in its place)."""
    out_dir = Path(out_dir)
    remove_abandoned([*out_dir.parent.glob(f"{temporary_dir(out_dir).name}.*"),
                      *out_dir.parent.glob(f"{_old_dir(out_dir, '').name}*")], keep=keep)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Put the finished `tmp` in place of `out_dir` (absent, empty or an export check_target let through)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        old = _old_dir(out_dir, os.getpid())
        os.replace(out_dir, old)  # the rename first: a crash leaves the old export or the new one in place
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


@contextlib.contextmanager
def reading_run(source: Path) -> Iterator[None]:
    """Hold the run lock of the run directory `source` lies in as a reader, if it lies in one."""
    run_dir = run_dir_of(source)
    if run_dir is None:
        yield
        return
    from ..train.lock import RunLock  # the training package's lock; imported only where a run is read

    lock = RunLock(run_dir).acquire(shared=True)
    try:
        yield
    finally:
        lock.release()
