"""Planning a run: find the sources, compare them with the entries on disk, split the work.

A source is a clip: a whole video, or a segment of one (`--segments`). The index (index.sqlite, after
merging the journals a killed run left) is the truth. A clip is up to date when its row has the
video's size and mtime (or, after a mere `touch`, the same content hash: then only the row's mtime
is updated) and, for a segment, the same span. Everything else found is pending: new, changed (the
video, or the segment's span), damaged (a cached clip whose record fails the cheap invariants, i.e.
its shard is missing or too short, or that `verify --repair` marked) or forced. Rows whose source
disappeared (a video removed, a segment row dropped) are dropped at the end of the run. So changing a video re-does its segments, and editing a segments file
adds or drops only the rows that changed.

Work is split in two steps. Torchrun ranks take fixed shares (`balance`: greedy longest-first by
duration onto the least-loaded rank); the rule is deterministic, so ranks that plan from the same index
snapshot take disjoint shares without talking to each other. Within a rank, the worker processes take
clips from one queue (`ClipQueue`), one at a time as each becomes free, longest video first, so
that a slow clip does not leave a device idle at the end while another holds a fixed list. Only the columns reconciling needs are read
(`cache.index.LIGHT`): a million rows take a few seconds and no JSON parsing.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import stat
from collections import deque
from dataclasses import dataclass, field
from operator import attrgetter, countOf
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from dali_float.cache import format as cf
from dali_float.cache import store as cache_store
from dali_float.cache.index import ClipIndex, IndexRow
from dali_float.cache.migrate import remove_v1
from dali_float.cli import cores_per_local_rank
from dali_float import media
from dali_float.errors import MediaError
from dali_float.forkserver import worker_context
from dali_float.hashing import sha256_file
from dali_float.progress import progress_bar

log = logging.getLogger(__name__)

# Why a clip is (re)processed.
NEW, CHANGED, DAMAGED, FORCED, RETRY = "new", "changed", "damaged", "forced", "retried"

# Fixed cost of a clip for balancing (hashing, probing, model calls): spreads clips that fail fast.
_PER_CLIP_OVERHEAD_S = 0.1


class Source(NamedTuple):
    """One clip found under the data root, its video as `stat` sees it (size and mtime -1 when stat failed).
    A NamedTuple: a million of them are made in a fraction of a second (a frozen dataclass takes seconds)."""

    clip_id: str
    path: str  # the video's path (a string: a million Path objects cost seconds)
    size_bytes: int
    mtime_ns: int
    regular: bool  # a regular file; FIFOs and devices are never opened (reading one could block)
    span_s: tuple[float, float] | None = None  # a segment [start, end) of the video; None: the whole video

    @property
    def segment_s(self) -> list[float] | None:
        """The span as the entry records it."""
        return None if self.span_s is None else [float(v) for v in self.span_s]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (reference counting still frees). Listing a million sources and
    reading a million index rows makes millions of tuples and strings, none in a cycle, and every full
    collection walks all of them that are alive (`status` at 200,000 clips: 3.37 s with it, 2.82 s without,
    docs/bench/status_gc_pause_ab.txt). Also a decorator: `@gc_paused()`."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _stat(path: str) -> tuple[int, int, bool]:
    try:
        st = os.stat(path)  # follows symlinks: the clip is what the link points to
        return st.st_size, st.st_mtime_ns, stat.S_ISREG(st.st_mode)
    except (OSError, ValueError):  # a dangling symlink, a vanished file, a NUL byte (ValueError): recorded later
        return -1, -1, False


def discover_sources(data_root: Path, segments: Path | None = None) -> list[Source]:
    """The clips of `data_root` (every video, recursive, any case: media.scan_videos; or the rows of a
    segments CSV: media.discover_clips), sorted by clip id; each video is stat-ed once."""
    if segments is None:
        return [Source(clip_id, path, *_stat(path)) for clip_id, path in media.scan_videos(Path(data_root))]
    stats: dict[str, tuple[int, int, bool]] = {}
    found = []
    for spec in media.discover_clips(Path(data_root), segments):
        path = str(spec.path)
        if path not in stats:
            stats[path] = _stat(path)
        found.append(Source(spec.clip_id, path, *stats[path], span_s=spec.span_s))
    return found


def _content_hash(path: str, memo: dict[str, str]) -> str:
    """The video's sha256 (once per video per run: its segments share it); "" when it cannot be read."""
    if path not in memo:
        try:
            memo[path] = sha256_file(Path(path))
        except OSError:
            memo[path] = ""
    return memo[path]


@dataclass
class Reconciliation:
    """How the sources compare with the index's rows.

    up_to_date: clip ids whose row stays. touched: (clip id, mtime_ns, source path) of rows whose
    content is unchanged but whose mtime (or absolute path) moved: update them. pending: clip id ->
    NEW / CHANGED / DAMAGED / FORCED. gone: clip ids whose source disappeared.
    """

    up_to_date: list[str] = field(default_factory=list)
    touched: list[tuple[str, int, str]] = field(default_factory=list)
    pending: dict[str, str] = field(default_factory=dict)
    gone: list[str] = field(default_factory=list)


def reconcile(sources: list[Source], rows: dict[str, IndexRow], damaged: Iterable[str] = (),
              force: bool = False, retry: Iterable[str] = ()) -> Reconciliation:
    """Classify every source and row (reads files only to hash sources whose mtime alone changed).

    sources: each clip id once (as discover_sources gives them).

    damaged: cached clips whose record failed a check (cache_store.cheap_check, or rows marked by
    `verify --repair`): re-done even though their source is unchanged.
    retry: failed clips to process again although their source is unchanged (ClipIndex.retryable).
    """
    rec = Reconciliation()
    hashes: dict[str, str] = {}
    damaged, retry = set(damaged), set(retry)
    # The loop runs once per source (a million times): its names are local, and a whole video's span (None on
    # both sides) is compared without a call.
    up_to_date, touched, pending, row_of = rec.up_to_date, rec.touched, rec.pending, rows.get
    for src in sources:
        clip_id = src.clip_id
        row = row_of(clip_id)
        if row is None:
            pending[clip_id] = NEW
        elif force:
            pending[clip_id] = FORCED
        elif row.status == cf.STATUS_CACHED and (row.damaged or clip_id in damaged):
            pending[clip_id] = DAMAGED
        elif row.status == cf.STATUS_FAILED and clip_id in retry:
            pending[clip_id] = RETRY
        elif row.size_bytes != src.size_bytes or ((row.segment_s is not None or src.span_s is not None)
                                                  and _segment(row) != src.segment_s):
            pending[clip_id] = CHANGED
        elif row.mtime_ns == src.mtime_ns:
            up_to_date.append(clip_id)
            if row.source_path != src.path:  # the data root moved: same bytes, new address
                touched.append((clip_id, row.mtime_ns, src.path))
        elif src.regular and row.content_hash and _content_hash(src.path, hashes) == row.content_hash:
            # `touch`, a copy that kept the bytes: nothing to recompute, only the mtime to remember.
            up_to_date.append(clip_id)
            touched.append((clip_id, src.mtime_ns, src.path))
        else:
            pending[clip_id] = CHANGED
    # Every source has its own clip id, so when as many rows were matched as there are, none is gone (no set of
    # a million ids to build).
    if len(up_to_date) + len(pending) - countOf(pending.values(), NEW) < len(rows):
        rec.gone = sorted(rows.keys() - set(map(attrgetter("clip_id"), sources)))
    return rec


def _segment(row: IndexRow) -> list[float] | None:
    return None if row.segment_s is None else json.loads(row.segment_s)


@dataclass
class Snapshot:
    """What every rank plans from: the index's rows (LIGHT columns), the clips failing the cheap
    invariants, the failed clips to try again, and the next free uid."""

    rows: dict[str, IndexRow]
    damaged: dict[str, str]
    next_uid: int
    retry: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, layout: cf.CacheLayout, retry_failed: bool = False) -> "Snapshot":
        """Read-only (the ranks other than 0 plan from what rank 0 recovered, holding no lock)."""
        with ClipIndex.open_readonly(layout) as index:
            return cls.of(layout, index, retry_failed)

    @classmethod
    def of(cls, layout: cf.CacheLayout, index: ClipIndex, retry_failed: bool = False) -> "Snapshot":
        return cls(index.light_rows(), cache_store.cheap_check(layout, index), index.next_uid(),
                   index.retryable(all_failed=retry_failed))


def recover(layout: cf.CacheLayout, header: cf.CacheHeader, sources: list[Source],
            force: bool = False, retry_failed: bool = False) -> tuple[Snapshot, Reconciliation]:
    """Bring the cache folder to a consistent state before any clip is processed (one process only).

    Creates the folder (with --force, a version 1 layout is deleted first), merges the journals and
    cuts the shard tails a killed run left (cache_store.recover), checks the cheap invariants and
    records the new mtime or path of touched sources. Rows of vanished sources stay until the run
    ends, so the next free uid still counts theirs. A rerun with nothing to do writes nothing.
    """
    if force and layout.stored_version() == cf.LEGACY_FORMAT_VERSION:
        log.info("--force_preprocess: removing the version 1 layout of %s", layout.root)
        remove_v1(layout, header_too=True)
    layout.check_version()
    remove_v1(layout)  # what a migration killed after its commit point left
    layout.create(header)
    with ClipIndex(layout) as index:
        done = cache_store.recover(layout, index)
        if done:
            log.info("recovered an interrupted run: removed %d temporary file(s), cut %d shard tail(s), removed "
                     "%d shard(s) without a live record", done.temporary_files, len(done.truncated),
                     len(done.removed_shards))
        snapshot = Snapshot.of(layout, index, retry_failed)
        for clip_id, why in sorted(snapshot.damaged.items())[:5]:
            log.warning("%s: %s; re-doing it", clip_id, why)
        if len(snapshot.damaged) > 5:
            log.warning("... %d damaged clip(s) in all", len(snapshot.damaged))
        rec = reconcile(sources, snapshot.rows, snapshot.damaged, force, snapshot.retry)
        index.touch(rec.touched)
    return snapshot, rec


@dataclass
class ClipTask:
    """One clip to process: where it is, its uid, and (if probing worked) what probing found."""

    clip_id: str
    path: str
    clip_uid: int
    size_bytes: int
    mtime_ns: int
    regular: bool
    span_s: tuple[float, float] | None = None  # a segment of the video; None: the whole video
    info: media.VideoInfo | None = None  # None: not probed or probing failed (the worker says why)
    duration_s: float = 0.0  # weight for balancing; 0 for clips that will fail fast
    # Decoded with no other clip beside it (a worker died while decoding it among others): whichever worker
    # takes it, a second death then names it.
    alone: bool = False

    def new_entry(self, status: str, **fields) -> cf.ClipEntry:
        """An entry of this clip (what identifies its source filled in) with `status` and `fields`."""
        return cf.ClipEntry(clip_id=self.clip_id, source_path=self.path, size_bytes=self.size_bytes,
                            mtime_ns=self.mtime_ns, content_hash="", status=status, clip_uid=self.clip_uid,
                            segment_s=None if self.span_s is None else [float(v) for v in self.span_s],
                            **fields)


def make_tasks(sources: list[Source], rec: Reconciliation, snapshot: Snapshot) -> list[ClipTask]:
    """The pending clips as tasks, sorted by clip id. A clip keeps its uid; new ones get the next free
    uids in clip-id order (`snapshot.next_uid` counts every row, failed and vanished ones too)."""
    base = snapshot.next_uid
    tasks = []
    for src in sources:
        if src.clip_id not in rec.pending:
            continue
        old = snapshot.rows.get(src.clip_id)
        if old is not None and old.clip_uid >= 0:
            uid = old.clip_uid
        else:
            uid, base = base, base + 1
        tasks.append(ClipTask(src.clip_id, src.path, uid, src.size_bytes, src.mtime_ns, src.regular,
                              src.span_s))
    return tasks


_PROBE_POOL_MIN_VIDEOS = 64  # fewer are probed in this process (a second or so)
_PROBE_CHUNK = 16  # videos per hand-out to a pool process


def probe_processes(videos: int) -> int:
    """How many processes probe `videos` videos: 1 below _PROBE_POOL_MIN_VIDEOS, else this rank's share of
    the machine's cores (cli.cores_per_local_rank), with at least a chunk of videos each."""
    if videos < _PROBE_POOL_MIN_VIDEOS:
        return 1
    return max(1, min(cores_per_local_rank(), videos // _PROBE_CHUNK))


def _probe_or_none(path: str) -> media.VideoInfo | None:
    try:
        return media.probe_video(Path(path))
    except MediaError:
        return None
    except Exception:  # noqa: BLE001 - a probing bug costs this clip (in the worker), not the plan
        log.debug("probing %s failed", path, exc_info=True)
        return None


def probe_tasks(tasks: list[ClipTask], progress: bool = False, processes: int | None = None) -> None:
    """Probe each regular-file task's video (once per video: segments share it) for its duration; a
    MediaError leaves info None (the worker probes again and records the one-line reason).

    processes: default `probe_processes`. Probing is mostly FFmpeg demuxing on one core per video; at
    10^5-10^6 new clips one process would take hours (~20 ms a 720p/1080p clip here), so large plans
    probe in a pool, started by the fork server as DataLoader workers are (dali_float.forkserver): this
    process may already run DALI or OpenMP threads, which a forked child would inherit half of.
    """
    paths = sorted({task.path for task in tasks if task.regular})
    processes = probe_processes(len(paths)) if processes is None else processes
    bar = dict(desc="probing", unit="video", disable=not progress or len(paths) < 20, leave=False)
    if processes > 1 and len(paths) > 1:
        log.info("probing %d videos in %d processes", len(paths), processes)
        with worker_context().Pool(processes) as pool:
            probed = dict(zip(paths, progress_bar(pool.imap(_probe_or_none, paths, chunksize=_PROBE_CHUNK),
                                                  total=len(paths), **bar)))
    else:
        probed = {path: _probe_or_none(path) for path in progress_bar(paths, **bar)}
    for task in tasks:
        task.info = probed.get(task.path) if task.regular else None
        if task.info is not None:
            end = task.info.duration_s if task.span_s is None else min(task.span_s[1], task.info.duration_s)
            task.duration_s = max(0.0, end - (task.span_s[0] if task.span_s else 0.0))


def balance(tasks: list[ClipTask], bins: int) -> list[list[ClipTask]]:
    """Split tasks into `bins` lists of about equal total duration (greedy longest first onto the
    least-loaded bin; ties by video, segment start, clip id and bin index, so every process computes the same
    split)."""
    shares: list[list[ClipTask]] = [[] for _ in range(bins)]
    loads = [0.0] * bins
    # Longest first (to the millisecond: a float span such as 12-14.4 must not part a video's segments), then
    # a video's segments together in time order. Within a rank the workers' order is ClipQueue's (by video);
    # this order is for callers that run a share as it is (tools/preprocess_profile.py, the tests).
    for task in sorted(tasks, key=lambda t: (-round(t.duration_s, 3), t.path, t.span_s or (0.0, 0.0), t.clip_id)):
        i = min(range(bins), key=lambda b: (loads[b], b))
        shares[i].append(task)
        loads[i] += task.duration_s + _PER_CLIP_OVERHEAD_S
    return shares


def video_runs(tasks: Iterable[ClipTask]) -> list[list[ClipTask]]:
    """The tasks grouped by video, each video's segments in order of their start; the longest video
    (by the summed duration of its pending clips) first, ties by path. A worker that processes one video's
    segments one after another can share that video's work (its audio decode, its demux)."""
    by_video: dict[str, list[ClipTask]] = {}
    for task in tasks:
        by_video.setdefault(task.path, []).append(task)
    runs = [sorted(run, key=lambda t: (t.span_s[0] if t.span_s else 0.0, t.clip_id)) for run in by_video.values()]
    return sorted(runs, key=lambda run: (-sum(t.duration_s for t in run), run[0].path))


class ClipQueue:
    """A rank's pending clips, handed to its worker processes one at a time, as each asks.

    Whole videos go out longest first. A worker that took a segment gets the next segment of the same
    video when it asks again (the video's run stays with it, in order); when no video is left untouched,
    a worker that asks takes the second half of the largest run another worker holds, so that nobody
    waits while one worker has a long list ahead of it. Clips of a worker process that died come back
    to the worker's slot (`give_back`) and go first, to the fresh process that takes its place.
    """

    def __init__(self, tasks: Iterable[ClipTask]) -> None:
        self._runs: deque[deque[ClipTask]] = deque(deque(run) for run in video_runs(tasks))
        self._held: dict[int, deque[ClipTask]] = {}  # worker slot -> the rest of the run it is on

    def __len__(self) -> int:
        """Clips not handed out yet."""
        return sum(map(len, self._runs)) + sum(map(len, self._held.values()))

    def take(self, worker: int) -> ClipTask | None:
        """The next clip for `worker`, or None when none is left to hand out."""
        run = self._held.get(worker)
        if not run:
            run = self._runs.popleft() if self._runs else self._split(worker)
            if run is None:
                self._held.pop(worker, None)
                return None
            self._held[worker] = run
        return run.popleft()

    def _split(self, worker: int) -> deque[ClipTask] | None:
        """The second half (in order) of the largest run another worker holds; None if all are empty."""
        donor = max((run for w, run in self._held.items() if w != worker and run),
                    key=lambda run: sum(t.duration_s for t in run), default=None)
        if donor is None:
            return None
        tail = [donor.pop() for _ in range((len(donor) + 1) // 2)]
        return deque(reversed(tail))

    def give_back(self, worker: int, tasks: list[ClipTask]) -> None:
        """`tasks` (handed to `worker`, not done, in the order it got them) go back to its slot, first in line."""
        run = self._held.setdefault(worker, deque())
        run.extendleft(reversed(tasks))
