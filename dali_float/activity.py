"""What a preprocessing worker's GPU did, for the bench's clip-length probe (bench/clip_lengths.py): when
NVDEC decoded (the intervals of each DALI GPU decode run, on the system-wide monotonic clock, so that the
intervals of several worker processes can be laid side by side: how many streams were in flight), and how
long the motion encoder was busy (CUDA events around each call, read without stalling the stream).

Off unless $DALI_FLOAT_ACTIVITY names a folder; the bench sets it before the fork server starts, so its
workers inherit it. Each worker process then writes its record there when it exits (one JSON file per
process). On the CPU nothing is recorded: there is no NVDEC and no CUDA event.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing.util
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

ENV = "DALI_FLOAT_ACTIVITY"


class _Record:
    """One process's decode intervals and encoder busy time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.decode_intervals: list[tuple[float, float]] = []  # (start, end) time.monotonic() of GPU decode runs
        self.pending: list[tuple[Any, Any]] = []  # CUDA (start, end) events of encoder calls not read yet
        self.busy_ms = 0.0
        self.first = self.last = None  # the first call's start event, the last call's end event
        multiprocessing.util.Finalize(self, self.write, exitpriority=10)  # a worker exits through os._exit

    def add_call(self, start, end) -> None:
        if self.first is None:
            self.first = start
        self.last = end
        self.pending.append((start, end))
        while self.pending and self.pending[0][1].query():  # finished calls: their time, no wait
            a, b = self.pending.pop(0)
            self.busy_ms += a.elapsed_time(b)

    def write(self) -> None:
        for a, b in self.pending:
            b.synchronize()
            self.busy_ms += a.elapsed_time(b)
        self.pending.clear()
        span_ms = self.first.elapsed_time(self.last) if self.first is not None else 0.0
        record = {"pid": os.getpid(), "decode_intervals": self.decode_intervals, "encoder_busy_ms": self.busy_ms,
                  "encoder_span_ms": span_ms}
        (self.folder / f"{os.getpid()}.json").write_text(json.dumps(record))


_record: _Record | None = None
_checked = False
_lock = threading.Lock()  # decode lanes and the encoder's thread ask at once


def _current() -> _Record | None:
    global _record, _checked
    with _lock:
        if not _checked:
            folder = os.environ.get(ENV)
            _record = _Record(Path(folder)) if folder else None
            _checked = True
    return _record


@contextlib.contextmanager
def encoder_call(frames) -> Iterator[None]:
    """Around one motion-encoder call on `frames`: its GPU time, when recording on a CUDA device."""
    record = _current() if frames.is_cuda else None
    if record is None:
        yield
        return
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    yield
    end.record()
    record.add_call(start, end)


@contextlib.contextmanager
def gpu_decode(on_gpu: bool) -> Iterator[None]:
    """Around one DALI decode run: its interval, when recording and it runs on NVDEC (`on_gpu`)."""
    record = _current() if on_gpu else None
    start = time.monotonic()
    yield
    if record is not None:
        record.decode_intervals.append((start, time.monotonic()))


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The processes' records as the bench reports them: NVDEC streams in flight (time-weighted mean over the
    time any was, and the most at once) and the encoder's busy fraction (its GPU time over the span from its
    first call to its last; with several processes, their sums); None where nothing was recorded (the CPU)."""
    edges = sorted([(a, 1) for r in records for a, _ in r["decode_intervals"]]
                   + [(b, -1) for r in records for _, b in r["decode_intervals"]])
    streams = None
    if edges:
        busy_s = weighted = 0.0
        now, most, previous = 0, 0, edges[0][0]
        for t, step in edges:
            if now:
                busy_s += t - previous
                weighted += now * (t - previous)
            now, previous = now + step, t
            most = max(most, now)
        streams = {"mean": weighted / busy_s if busy_s > 0 else float(most), "max": most, "decoding_s": busy_s}
    span = sum(r["encoder_span_ms"] for r in records)
    busy = sum(r["encoder_busy_ms"] for r in records) / span if span > 0 else None
    return {"nvdec_streams_in_flight": streams, "encoder_busy_fraction": busy}


@contextlib.contextmanager
def collecting(folder: Path) -> Iterator[dict[str, Any]]:
    """The records the workers write into `folder` (this process's $DALI_FLOAT_ACTIVITY) during the block,
    summarized into the dict yielded (filled when the block ends; the records are removed)."""
    before = set(folder.glob("*.json"))
    summary: dict[str, Any] = {}
    yield summary
    new = sorted(set(folder.glob("*.json")) - before)
    summary.update(summarize([json.loads(p.read_text()) for p in new]))
    for p in new:
        p.unlink()
