"""SIGINT (Ctrl-C) and SIGTERM (what Slurm and `kill` send) as requests to stop, each command deciding where
it may stop: a preprocessing run stops its workers, keeps every clip they finished and says how to continue;
a training run saves a checkpoint after the current step (training.distributed.StopSignal).

`Interrupts` records the first signal (`requested`, `signal_name`). Inside `abortable()` a signal also raises
`Stopped` at once (work that has nothing to save: planning, a clip in flight); inside `deferred()` it is only
recorded, and raised when the block ends if it is still inside an abortable one (a commit is never cut).
The handlers are installed for the `with` block, in the main thread only (elsewhere signals cannot be caught).
"""
from __future__ import annotations

import contextlib
import signal
from types import FrameType
from typing import Any, Iterator


class Stopped(BaseException):
    """Raised where a signal stops abortable work (a BaseException: `except Exception` clauses let it through)."""


class Interrupts:
    """SIGINT and SIGTERM recorded as a request to stop; `abortable()` blocks are stopped at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self.signum = 0
        self.received = 0  # signals caught so far
        self._abortable = 0
        self._previous: dict[int, Any] = {}

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process this signal ended: 128 + its number (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum

    def on_signal(self, signum: int) -> None:
        """Called for every signal caught (the first one is recorded before); subclasses say or escalate."""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = not self.requested
        self.received += 1
        if first:
            self.requested, self.signum, self.signal_name = True, signum, signal.Signals(signum).name
        self.on_signal(signum)
        if first and self._abortable:
            raise Stopped(self.signal_name)

    @contextlib.contextmanager
    def abortable(self) -> Iterator[None]:
        """A signal (or one that came before) stops this block at once with Stopped."""
        if self.requested:
            raise Stopped(self.signal_name)
        self._abortable += 1
        try:
            yield
        finally:
            self._abortable -= 1

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A signal only records its request here; an enclosing abortable block is stopped when this one ends."""
        saved, self._abortable = self._abortable, 0
        try:
            yield
        finally:
            self._abortable = saved
        if saved and self.requested:
            raise Stopped(self.signal_name)

    def __enter__(self) -> "Interrupts":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
