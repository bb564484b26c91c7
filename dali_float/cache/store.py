"""Shards: appending clip records (one writer per shard), committing them in groups, recovering after a
crash, and compaction. The record layout is cache.format's; the rows go to cache.index.

Write order of a group of clips (`ShardWriter`): append every record to the writer's shard, fsync the
shard, commit the rows in the writer's journal. A kill at any moment leaves committed clips whole
(their bytes were durable before their rows) and, at worst, an uncommitted tail on the shard, which
`recover` cuts off. A group is at most `group_clips` clips or `group_seconds` seconds of work: that
is what a kill can cost, and what saves one fsync per clip (with many short clips the fsyncs were
the fixed cost per clip). The seconds count from the group's start (the last commit), so a clip that
finishes once they are up is committed at once, and `commit_if_due` (called between a clip's frame
batches) commits a finished clip on time while the next one is long in the works.

Compaction copies the live records of shards holding dead ones (clips re-done or dropped) into new
shards, fsyncs them, moves the rows in one index transaction (the commit point), then deletes the
old shards. Before the commit the new shards hold no live record, after it the old ones hold none:
either way `recover` deletes what is left over, and no live clip's bytes ever change.

Cutting and deleting (recover, trim_shards, compact) happen under the cache's writer lock (taken here,
re-entrantly) and never touch what a reader's leased training-view generation references
(cache.lock): those bytes are left for the next writer that finds no lease. A full disk while
appending is one line naming the disk (exit 3); what was committed before stays.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Callable

import numpy as np

from dali_float.cache import format as cf
from dali_float.cache import faults
from dali_float.atomic import fsync_dir, remove_temporary_files
from dali_float.cache.index import ClipIndex, Journal
from dali_float.cache.lock import LiveWriter, WriterLock, leased_generations, wait_for_live_writers
from dali_float.config import Preset
from dali_float.errors import disk_full
from dali_float.progress import progress_bar

log = logging.getLogger(__name__)

GROUP_CLIPS = 64  # clips per commit at most
GROUP_SECONDS = 2.0  # seconds of work a group holds at most (a finished clip's wait for its commit)


def writer_name(tag: str) -> str:
    """A name no other writer (process, rank, machine, run) has; names sort by creation time."""
    host = re.sub(r"[^A-Za-z0-9]+", "", socket.gethostname())[:16] or "host"
    return f"{time.time_ns():016x}-{tag}-{host}-{os.getpid()}"


class ShardAppender:
    """Appends bytes to one writer's shards (`<writer>-<n>.bin`), starting a new one past `shard_bytes`."""

    def __init__(self, layout: cf.CacheLayout, writer: str, shard_bytes: int = cf.SHARD_BYTES):
        self.layout, self.writer, self.shard_bytes = layout, writer, shard_bytes
        self.fd: int | None = None
        self.name, self.size, self.count, self.dirty = "", 0, 0, False

    def fits(self, nbytes: int) -> bool:
        return self.fd is not None and (self.size == 0 or self.size + nbytes <= self.shard_bytes)

    def start_shard(self) -> None:
        """Close the current shard (the caller synced it) and create the next one."""
        self.close()
        self.layout.shards_dir.mkdir(parents=True, exist_ok=True)
        self.name = f"{self.writer}-{self.count:04d}.bin"
        self.count += 1
        self.fd = os.open(self.layout.shard_path(self.name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self.size = 0
        fsync_dir(self.layout.shards_dir)

    def append(self, data: np.ndarray | bytes) -> tuple[str, int]:
        """Write `data` at the end of the current shard; (shard name, offset). Not durable until sync()."""
        view = memoryview(data).cast("B")
        offset, half = self.size, len(view) // 2
        self._write(view[:half])
        faults.point("shard-append")  # a torn record: the tail recovery cuts off
        self._write(view[half:])
        self.size += len(view)
        self.dirty = True
        return self.name, offset

    def _write(self, view: memoryview) -> None:
        try:
            while len(view):
                view = view[os.write(self.fd, view):]
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full(self.layout.shard_path(self.name), len(view), "appending to") from None
            raise

    def sync(self) -> None:
        if self.dirty and self.fd is not None:
            faults.point("shard-fsync")
            try:
                os.fsync(self.fd)
            except OSError as err:  # ENOSPC can surface at fsync on some file systems (NFS, thin volumes)
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise disk_full(self.layout.shard_path(self.name), what="syncing") from None
                raise
            self.dirty = False

    def close(self) -> None:
        if self.fd is not None:
            self.sync()
            os.close(self.fd)
            self.fd = None


class ShardWriter:
    """One preprocessing writer: clip records into its shards, their rows into its journal, in groups."""

    def __init__(self, layout: cf.CacheLayout, preset: Preset, writer: str, *, shard_bytes: int = cf.SHARD_BYTES,
                 group_clips: int = GROUP_CLIPS, group_seconds: float = GROUP_SECONDS):
        self.preset = preset
        layout.journals_dir.mkdir(parents=True, exist_ok=True)
        self.live = LiveWriter(layout.journals_dir, writer)  # recovery waits for it (cache.lock)
        self.appender = ShardAppender(layout, writer, shard_bytes)
        self.journal = Journal(layout, writer)
        self.group_clips, self.group_seconds = group_clips, group_seconds
        self.pending: list[cf.ClipEntry] = []
        self._group_started = time.monotonic()  # the last commit: a group's work counts from there

    def write(self, entry: cf.ClipEntry, features: cf.ClipFeatures | None = None) -> cf.ClipEntry:
        """Append a cached clip's record (or record a failed / skipped entry); commits when the group is due.
        Returns the entry with its storage fields filled in."""
        if features is not None:
            features.check(self.preset)
            record = features.to_record(self.preset)
            if not self.appender.fits(len(record)):
                self.flush()  # the rows of the current shard go with it
                self.appender.start_shard()
            entry.shard, entry.offset = self.appender.append(record)
            entry.status, entry.num_frames, entry.nbytes = cf.STATUS_CACHED, features.num_frames, len(record)
            entry.checksum = cf.checksum(record)
            entry.emotion = [float(v) for v in np.asarray(features.emotion, dtype=cf.EMOTION_DTYPE)]
        else:
            assert entry.status in (cf.STATUS_FAILED, cf.STATUS_SKIPPED), entry.status
            entry.shard, entry.offset, entry.nbytes, entry.checksum, entry.emotion = "", -1, 0, 0, []
        self.pending.append(entry)
        if len(self.pending) >= self.group_clips:
            self.flush()
        else:
            self.commit_if_due()
        return entry

    def commit_if_due(self) -> None:
        """Commit the pending clips once the group has lasted `group_seconds` (between records only: never
        while a record is half appended)."""
        if self.pending and time.monotonic() - self._group_started >= self.group_seconds:
            self.flush()

    def flush(self) -> None:
        """Make the pending clips durable: fsync the shard, then commit their rows (the commit point)."""
        if not self.pending:
            return
        self.appender.sync()
        self.journal.commit(self.pending)
        faults.point("journal-committed")  # committed, not yet reported: the parent must not call them failed
        self.pending = []
        self._group_started = time.monotonic()

    def close(self) -> None:
        try:
            self.flush()
        finally:  # a failed last commit still lets go of the shard and the journal
            try:
                self.appender.close()
            finally:
                self.journal.close()
                self.live.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # an error: commit what was done, then let it propagate
            try:
                self.close()
            except Exception as err:  # noqa: BLE001 - the original error matters more
                log.warning("committing the clips done before the error failed too (%s)", err)


def read_record(layout: cf.CacheLayout, shard: str, offset: int, nbytes: int) -> np.ndarray:
    """The bytes of one record (uint8); OSError naming the shard when it ends early."""
    with open(layout.shard_path(shard), "rb") as f:
        data = os.pread(f.fileno(), nbytes, offset)
    if len(data) != nbytes:
        raise OSError(f"{layout.shard_path(shard)} ends at byte {offset + len(data)}, the record needs "
                      f"{offset + nbytes}")
    return np.frombuffer(data, dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# Recovery and the cheap invariants


@dataclasses.dataclass
class Recovery:
    temporary_files: int = 0
    merged_rows: int = 0
    truncated: list[str] = dataclasses.field(default_factory=list)
    removed_shards: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.temporary_files or self.truncated or self.removed_shards)


def recover(layout: cf.CacheLayout, index: ClipIndex) -> Recovery:
    """What a killed run (or compaction) left, put right; under the writer lock (the index's).

    Waits for the shard writers of a killed run to be gone, removes temporary files, merges leftover
    journals, deletes shards without a live record and cuts every shard back to the end of its last
    live record (a partial tail, or dead records at the end), sparing what readers lease.
    """
    wait_for_live_writers(layout.journals_dir)
    rec = Recovery(temporary_files=remove_temporary_files(layout.root), merged_rows=index.merge_journals())
    rec.truncated, rec.removed_shards = trim_shards(layout, index)
    return rec


def trim_shards(layout: cf.CacheLayout, index: ClipIndex) -> tuple[list[str], list[str]]:
    """Cut every shard back to the end of its last live record and delete shards without one (a killed
    writer's tail, or records of clips re-done or dropped at the end of a shard). Under the writer lock,
    after the journals are merged (a journal still on disk stops it: its shards' records are not in the
    index yet); bytes a leased training-view generation references stay (cache.lock). Returns (cut,
    deleted) shard names."""
    cut, deleted = [], []
    with WriterLock(layout.root):
        if layout.journals():
            log.warning("not cutting shards: %d journal(s) are not merged yet", len(layout.journals()))
            return cut, deleted
        ends = index.live_ends()
        protected, leased = leased_generations(layout.training_dir, _current_generation(layout))
        kept = 0
        for path in layout.shard_files():
            end = max(ends.get(path.name, 0), protected.get(path.name, 0))
            if path.name not in ends and path.name not in protected:
                path.unlink()
                deleted.append(path.name)
            elif path.stat().st_size > end:
                os.truncate(path, end)
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                cut.append(path.name)
            if path.name in protected and protected[path.name] > ends.get(path.name, 0):
                kept += 1
        if deleted:
            fsync_dir(layout.shards_dir)
        if kept:
            log.info("%d shard(s) keep bytes that a reader still training on generation(s) %s uses; the next "
                     "run without such a reader reclaims them", kept, ", ".join(map(str, leased)))
    return cut, deleted


def _current_generation(layout: cf.CacheLayout) -> int | None:
    """The generation training.json names (None: no view yet)."""
    from dali_float.cache.view import read_view_header

    try:
        header = read_view_header(layout)
    except Exception:  # noqa: BLE001 - an unreadable view is rewritten; no generation to keep
        return None
    return None if header is None else header.get("generation")


def shard_size(path: Path) -> int:
    """The shard's size in bytes, -1 when it is missing."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def cheap_check(layout: cf.CacheLayout, index: ClipIndex) -> dict[str, str]:
    """Cached clips whose record cannot be whole: its shard is missing or shorter than the record's end.
    One stat per shard; {clip id: problem}."""
    problems: dict[str, str] = {}
    for shard, end in index.live_ends().items():
        path = layout.shard_path(shard)
        size = shard_size(path)
        if size >= end:
            continue
        why = f"shard {path} is missing" if size < 0 else f"shard {path} ends at byte {size}, its record goes further"
        for clip_id in index.clips_past(shard, max(size, 0)):
            problems[clip_id] = why
    return problems


# --------------------------------------------------------------------------------------------------
# Compaction


def dead_bytes(layout: cf.CacheLayout, index: ClipIndex) -> dict[str, int]:
    """Per shard, the bytes no live record uses."""
    live = index.live_bytes()
    return {p.name: p.stat().st_size - live.get(p.name, 0) for p in layout.shard_files()}


def compact(layout: cf.CacheLayout, index: ClipIndex, shard_bytes: int = cf.SHARD_BYTES,
            progress: bool = False, export_view: Callable[[], object] | None = None) -> dict[str, int]:
    """Rewrite every shard holding dead bytes with only its live records (see the module docstring).
    Under the writer lock. `export_view` writes the training view of the moved records: it runs
    right after the commit point and before any old shard is deleted, so a reader opening the cache
    meanwhile finds either the old generation (then leased, its shards kept) or the new one. Old shards
    a reader still leases are deleted by a later writer. A record failing its length or CRC-32 stops it before
    the commit point, its new shards removed (damage is never copied): CacheError naming the clip and
    `verify --repair`. Returns {shards, records, reclaimed_bytes, deferred}."""
    with WriterLock(layout.root):
        recover(layout, index)
        dead = {name: n for name, n in dead_bytes(layout, index).items() if n > 0}
        if not dead:
            return {"shards": 0, "records": 0, "reclaimed_bytes": 0, "deferred": 0}
        before = sum((layout.shard_path(n).stat().st_size for n in dead), 0)
        rows = sorted((r for r in index.records() if r[1] in dead), key=lambda r: (r[1], r[2]))
        appender = ShardAppender(layout, writer_name("compact"), shard_bytes)
        moves = []
        new_shards: list[str] = []
        fds = {name: os.open(layout.shard_path(name), os.O_RDONLY) for name in dead}
        try:
            for clip_id, shard, offset, nbytes, crc, _ in progress_bar(rows, desc="compacting", unit="clip",
                                                                      disable=not progress, leave=False):
                data = os.pread(fds[shard], nbytes, offset)
                if len(data) != nbytes or cf.checksum(data) != crc:
                    raise cf.CacheError(f"compaction stopped before changing anything: the record of {clip_id!r} "
                                        f"in {layout.shard_path(shard)} is damaged; run `python preprocess.py "
                                        f"verify --repair` first")
                if not appender.fits(nbytes):
                    appender.sync()
                    appender.start_shard()
                    new_shards.append(appender.name)
                moves.append((*appender.append(data), clip_id))
                faults.point("compact-copy")
            faults.point("compact-fsync")
            appender.close()  # fsyncs the last new shard
            fsync_dir(layout.shards_dir)
        except BaseException:
            # Stopped before the commit point (a damaged record, a full disk): the new shards hold no live
            # record, so remove them now and leave the folder as it was (a kill leaves them to `recover`).
            if appender.fd is not None:
                os.close(appender.fd)
                appender.fd = None
            for name in new_shards:
                layout.shard_path(name).unlink(missing_ok=True)
            if new_shards:
                fsync_dir(layout.shards_dir)
            raise
        finally:
            for fd in fds.values():
                os.close(fd)
        index.move_records(moves)  # the commit point
        if export_view is not None:
            export_view()
        protected, _ = leased_generations(layout.training_dir, _current_generation(layout))
        deferred = 0
        for name in dead:
            faults.point("compact-unlink")
            if name in protected:
                deferred += 1  # a reader still uses it: the next writer without one deletes it
                continue
            layout.shard_path(name).unlink()
        fsync_dir(layout.shards_dir)
        if deferred:
            log.info("%d old shard(s) are kept while a training process reads them; the next run or compaction "
                     "without such a reader deletes them", deferred)
        after = sum(layout.shard_path(n).stat().st_size for n in {m[0] for m in moves})
        return {"shards": len(dead), "records": len(moves), "reclaimed_bytes": before - after, "deferred": deferred}
