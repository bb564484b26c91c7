"""Progress of long loops: a tqdm bar on a terminal, a plain log line now and then in a log file.

Every progress bar of the package comes from `progress_bar(...)`, which takes the part of tqdm's
arguments the package uses (iterable or total, desc, unit, initial, disable, leave, unit_scale; other
keywords go to tqdm only) and returns something with tqdm's `update`, `set_postfix_str`, `refresh`,
`close`, iteration and `with`:

- stderr is a terminal: the tqdm bar itself, exactly as before.
- stderr is not a terminal (Slurm, nohup, `2> run.log`): a `LineProgress`, which never writes a
  carriage return. tqdm would redraw its bar there several times a second, one `\\r` after another,
  and a 1,000-step run's log would be mostly bar. A `LineProgress` logs one line when INTERVAL_S
  (30 s; DALI_FLOAT_PROGRESS_INTERVAL_S overrides) have passed since its last line:

      train: 300/1000 (30%) | 4.12 step/s | ETA 02:50 | loss 0.1234 | 33 samples/s | data-wait 3%

  and a last line when it closes: `train: 1000/1000 (100%) in 04:10 | 4.00 step/s | loss ...`.
  The rate of an interval line is that of the interval (the speed now, not diluted by a slow start),
  and the ETA is what is left at that rate; the last line gives the average over the whole loop.
  A bar made with leave=False (gone from a terminal when done) writes its last line only if it wrote
  an interval line: a short loop leaves no trace, as on a terminal.

The lines go through `logging` (logger `dali_float.progress`), not straight to the stream: in a log
file each then carries the time and the same format as the lines around it, and the handler's lock
keeps a progress line and a log record from interleaving. A time-only interval bounds a log's size by
its duration (120 lines an hour a bar at 30 s), whatever the speed or length of the loop.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, Callable, ContextManager, Iterable, Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dali_float.errors import UsageError

INTERVAL_S = 30.0  # between two lines of one bar in a log file
INTERVAL_ENV = "DALI_FLOAT_PROGRESS_INTERVAL_S"

log = logging.getLogger("dali_float.progress")


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
                 initial: float = 0, disable: bool = False, leave: bool = True, unit_scale: bool = False,
                 **bar_options: Any) -> tqdm | LineProgress:
    """A tqdm bar where stderr is a terminal (or when disabled), a LineProgress otherwise (see the module).
    bar_options (position, smoothing, dynamic_ncols) shape the terminal's bar only."""
    if disable or _is_terminal(sys.stderr):
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, leave=leave,
                    unit_scale=unit_scale, **bar_options)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                        unit_scale=unit_scale)


def redirect_logging() -> ContextManager:
    """Around code that logs while bars are shown: on a terminal, log records are written above the bars
    instead of through them (tqdm's logging_redirect_tqdm); in a file there is no bar to keep clear of."""
    return logging_redirect_tqdm() if _is_terminal(sys.stderr) else contextlib.nullcontext()


def interval_from_env() -> float:
    """INTERVAL_S, or DALI_FLOAT_PROGRESS_INTERVAL_S where set (0: a line at every update)."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None:
        return INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):  # `not >=` also refuses nan
        raise UsageError(f"{INTERVAL_ENV} must be a number of seconds >= 0 (the time between two progress lines "
                         f"in a log file); found {raw!r}")
    return value


class LineProgress:
    """tqdm's counting without its drawing: a log line every `interval_s` and one at the end (module docstring).

    interval_s: None: interval_from_env(). clock: seconds, monotonic (tests pass a fake one)."""

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", initial: float = 0, leave: bool = True, unit_scale: bool = False,
                 interval_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        if total is None and iterable is not None:
            with contextlib.suppress(TypeError):  # a generator has no length: no percent, no ETA
                total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.n = iterable, total, initial
        self.desc, self.unit, self.leave, self.unit_scale = desc, unit, leave, unit_scale
        self.interval_s = interval_from_env() if interval_s is None else interval_s
        self._clock = clock
        self._start_s = self._last_s = clock()
        self._start_n = self._last_n = initial
        self._postfix = ""
        self._lines = 0
        self._closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:  # type: ignore[union-attr]
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self._clock()
        if now - self._last_s >= self.interval_s:
            rate = _rate(self.n - self._last_n, now - self._last_s)
            left = self.total - self.n if self.total is not None else None
            eta = tqdm.format_interval(left / rate) if left is not None and rate else "?"
            self._write(f"{self._count()} | {self._rate(rate)}" + (f" | ETA {eta}" if left is not None else ""))
            self._last_s, self._last_n = now, self.n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Shown at the end of the next line (refresh: tqdm's, nothing to redraw here)."""
        self._postfix = s

    def refresh(self) -> None:
        """Nothing to redraw: a changed total shows in the next line."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.leave or self._lines:
            elapsed_s = self._clock() - self._start_s
            self._write(f"{self._count()} in {tqdm.format_interval(elapsed_s)} | "
                        f"{self._rate(_rate(self.n - self._start_n, elapsed_s))}")

    def _count(self) -> str:
        n = self._amount(self.n)
        if self.total is None:
            return n
        percent = f" ({int(100 * self.n / self.total)}%)" if self.total else ""  # 100% only when done
        return f"{n}/{self._amount(self.total)}{percent}"

    def _amount(self, value: float) -> str:
        if self.unit_scale:
            return f"{tqdm.format_sizeof(value)}{self.unit}"
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.4g}"

    def _rate(self, rate: float | None) -> str:
        if rate is None:
            return f"? {self.unit}/s"
        if self.unit_scale:
            return f"{tqdm.format_sizeof(rate)}{self.unit}/s"
        return f"{rate:.0f} {self.unit}/s" if rate >= 100 else f"{rate:.3g} {self.unit}/s"

    def _write(self, text: str) -> None:
        self._lines += 1
        log.info("%s: %s%s", self.desc or "progress", text, f" | {self._postfix}" if self._postfix else "")


Progress = tqdm | LineProgress  # what `progress_bar` returns


def _rate(amount: float, seconds: float) -> float | None:
    return amount / seconds if seconds > 0 else None


def _is_terminal(stream: Any) -> bool:
    """A terminal, or a notebook's output (not a tty, but drawn in place like one, never a log file)."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # None (no stderr at all) or a closed stream
        return False
