"""Graceful pre-emption: SIGTERM (how clusters pre-empt) or SIGINT asks the loop to stop after the current optimizer
step and write a checkpoint; a second signal stops at once.

The loop reduces the request over ranks each step (with the non-finite flag, one small all-reduce), so every rank
stops at the same step even if only one was signalled.
"""
from __future__ import annotations

import signal
import sys


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint; the exit code is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """Installs SIGTERM/SIGINT handlers while entered (main thread only; elsewhere signals keep their handlers)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: no more waiting
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        print(f"spdf: {signal.Signals(signum).name} received: stopping after the current step with a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        try:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: signals cannot be handled here
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
