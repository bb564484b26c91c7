"""What the probes measure with, and what they share (bench/probes.py, bench/render_probes.py).

  memory   peak resident memory of a process tree sampled in a thread (MemoryWatch), the process's own
           high-water mark, bytes read from storage
  timing   items per second over warm-up and timed runs (timed_runs), their median and spread
  shared   a spec's preset and model weights, its segments, the cache it names, a sample's bytes
"""
from __future__ import annotations

import glob
import os
import resource
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

_PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------------------------------
# Memory and timing


def _tree_pids(root: int) -> list[int]:
    """`root` and every descendant (DataLoader workers), from /proc/<pid>/task/<tid>/children."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        for path in glob.glob(f"/proc/{pid}/task/*/children"):
            try:
                todo.extend(int(c) for c in open(path).read().split())
            except (OSError, ValueError):
                pass
    return pids


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0  # the process ended between listing and reading


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def disk_read_bytes() -> int:
    """Bytes this process (and its children once reaped: DataLoader workers still running are not in it)
    had fetched from storage, not from the page cache (/proc/self/io read_bytes; 0 where unavailable).
    Readahead the kernel starts for posix_fadvise may be counted to no one."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))
    except (OSError, StopIteration, ValueError):
        return 0


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM of /proc/self/status. Not getrusage's ru_maxrss: Linux
    carries that across fork and exec, so a probe started by a parent holding 1.2 GB reported 1.2 GB
    whatever it used itself (found measuring --scale: every probe after the million-clip write showed
    the writer's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: the best there is


class MemoryWatch:
    """Peak resident memory of this process and its children, sampled every `interval_s` in a thread.

    peak_rss_bytes: max over samples of the RSS summed over the process tree (forked workers count
    their shared pages again: an upper bound), and never below this process's own high-water mark.
    pss_bytes(): proportional set size of the tree now (shared pages split between the processes).
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.baseline_rss_bytes = _rss_bytes(os.getpid())
        self._peak = self.baseline_rss_bytes
        self._peak_children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.wait(self.interval_s):
            pids = _tree_pids(me)
            children = sum(_rss_bytes(p) for p in pids if p != me)
            self._peak_children = max(self._peak_children, children)
            self._peak = max(self._peak, _rss_bytes(me) + children)

    @staticmethod
    def pss_bytes() -> int:
        return sum(_pss_bytes(p) for p in _tree_pids(os.getpid()))

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        own_peak = peak_rss_bytes()
        return {"peak_rss_bytes": max(self._peak, own_peak), "children_peak_rss_bytes": self._peak_children,
                "baseline_rss_bytes": self.baseline_rss_bytes}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed_runs(step: Callable[[], int], device: str, timing: dict[str, Any]) -> list[float]:
    """Items per second of `timing["runs"]` timed runs; step() does one batch and returns its item count.

    Warm-up (excluded): at least `warmup_batches` calls and `warmup_s` seconds. A timed run: at least
    `min_batches` calls and `run_s` seconds, at most `max_batches` calls.
    """
    t0, n = time.perf_counter(), 0
    while n < timing.get("warmup_batches", 1) or time.perf_counter() - t0 < timing.get("warmup_s", 0.0):
        step()
        n += 1
    _sync(device)
    rates = []
    for _ in range(timing.get("runs", 3)):
        t0, items, calls = time.perf_counter(), 0, 0
        while calls < timing.get("min_batches", 1) or (
                time.perf_counter() - t0 < timing.get("run_s", 0.0) and calls < timing.get("max_batches", 10**9)):
            items += step()
            calls += 1
        _sync(device)
        rates.append(items / (time.perf_counter() - t0))
    return rates


def rate_summary(rates: list[float], bytes_per_item: int | None = None, unit: str = "samples_per_s") -> dict[str, Any]:
    """Median, every run and the spread (min, max) of a list of rates; MB/s when bytes_per_item is given."""
    median = statistics.median(rates)
    out: dict[str, Any] = {unit: median, f"{unit}_runs": rates, "spread": [min(rates), max(rates)]}
    if bytes_per_item is not None:
        out.update(bytes_per_sample=bytes_per_item, mb_per_s=median * bytes_per_item / 1e6)
    return out


# --------------------------------------------------------------------------------------------------
# Shared pieces


def _context(spec: dict[str, Any]):
    from dali_float.config import get_preset
    from dali_float.models import ModelSources

    preset = get_preset(spec["preset"])
    given = spec.get("sources") or {}
    sources = ModelSources(**{k: (Path(v) if v is not None and k != "emotion" else v) for k, v in given.items()})
    return preset, sources


def _segments(spec: dict[str, Any]) -> Path | None:
    return Path(spec["segments"]) if spec.get("segments") else None


def sample_bytes(preset) -> int:
    """Bytes one sample of the batch contract carries (float16): the window's rows, the reference
    motion and the emotion vector."""
    from dali_float.cache import format as cf

    width = preset.motion_dim + preset.audio_feature_dim
    return cf.FEATURE_DTYPE.itemsize * (preset.timing.window_frames * width + preset.motion_dim + preset.emotion_dim)


def _open_cache(spec: dict[str, Any], preset):
    from dali_float.loaders import TrainingCache

    return TrainingCache.open(Path(spec["cache_dir"]), preset, spec["fingerprint"])
