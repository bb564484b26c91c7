"""The cache's index (index.sqlite) and the writers' journals: one row per clip, crash-safe, one writer each.

Why SQLite, and why journals: the index is updated a group of clips at a time and read by column
(reconciling a million sources needs a few columns, not a million JSON documents), which SQLite
does in one file with atomic, durable transactions. Its locking is not to be trusted on a file
system shared by several machines (NFS), so no SQLite file here ever has two writers: every
preprocessing writer (each worker process of each torchrun rank) commits to a journal of its own,
and only rank 0's parent process writes index.sqlite, merging the journals after its barrier (and,
at the start of a run, those a killed run left). A merge is one transaction; the journal is deleted
after it, and merging it twice gives the same index.

Rows: the columns preprocessing and the loaders' export read (`COLUMNS`), plus the rest of the
ClipEntry as compact JSON (`extra`, fields left at their defaults omitted). `meta.generation` counts
the index's changes: the training view records the generation it was exported from.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from dali_float.cache import format as cf
from dali_float.cache import faults
from dali_float.atomic import fsync_dir

log = logging.getLogger(__name__)

# Stored as columns (the rest of a ClipEntry goes into `extra`).
COLUMNS = ("clip_id", "clip_uid", "status", "num_frames", "shard", "offset", "nbytes", "checksum", "source_path",
           "size_bytes", "mtime_ns", "content_hash", "segment_s", "emotion", "damaged", "extra")
_CLIPS_TABLE = """CREATE TABLE IF NOT EXISTS clips (
    clip_id TEXT PRIMARY KEY, clip_uid INTEGER NOT NULL, status TEXT NOT NULL, num_frames INTEGER NOT NULL,
    shard TEXT NOT NULL, offset INTEGER NOT NULL, nbytes INTEGER NOT NULL, checksum INTEGER NOT NULL,
    source_path TEXT NOT NULL, size_bytes INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, content_hash TEXT NOT NULL,
    segment_s TEXT, emotion BLOB, damaged INTEGER NOT NULL DEFAULT 0, extra TEXT NOT NULL)"""
_INSERT = f"INSERT OR REPLACE INTO clips ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_DEFAULTS = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
             for f in dataclasses.fields(cf.ClipEntry) if f.default is not dataclasses.MISSING
             or f.default_factory is not dataclasses.MISSING}

# What reconciling sources needs of each row.
LIGHT = ("clip_id", "clip_uid", "status", "num_frames", "shard", "offset", "nbytes", "source_path", "size_bytes",
         "mtime_ns", "content_hash", "segment_s", "damaged")
IndexRow = collections.namedtuple("IndexRow", LIGHT)


def to_row(entry: cf.ClipEntry) -> tuple:
    d = entry.to_dict()
    segment = d.pop("segment_s")
    emotion = d.pop("emotion")
    extra = {k: v for k, v in d.items() if k not in COLUMNS and v != _DEFAULTS.get(k, object())}
    return (entry.clip_id, entry.clip_uid, entry.status, entry.num_frames, entry.shard, entry.offset, entry.nbytes,
            entry.checksum, entry.source_path, entry.size_bytes, entry.mtime_ns, entry.content_hash,
            None if segment is None else json.dumps(segment),
            np.asarray(emotion, dtype=cf.EMOTION_DTYPE).tobytes() if len(emotion) else None, 0,
            json.dumps(extra, separators=(",", ":")))


def from_row(row: tuple) -> cf.ClipEntry:
    d = dict(zip(COLUMNS, row))
    d.pop("damaged")
    d.update(json.loads(d.pop("extra")))
    d["segment_s"] = None if d["segment_s"] is None else json.loads(d["segment_s"])
    d["emotion"] = [] if d["emotion"] is None else np.frombuffer(d["emotion"], cf.EMOTION_DTYPE).tolist()
    return cf.ClipEntry.from_dict(d)


def _in_transaction(con: sqlite3.Connection, work, fault: str) -> None:
    """work() in one transaction, committed (durably: synchronous=FULL) or rolled back on any error."""
    con.execute("BEGIN IMMEDIATE")
    try:
        work()
        faults.point(fault)
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise


def _connect(path: Path) -> sqlite3.Connection:
    """Autocommit connection (transactions are explicit), durable commits, a rollback journal (no WAL:
    its shared memory does not work on network file systems)."""
    con = sqlite3.connect(str(path), isolation_level=None, timeout=60)
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA journal_mode=DELETE")
    return con


class ClipIndex:
    """index.sqlite of one cache folder. Only one process writes it (rank 0's parent)."""

    def __init__(self, layout: cf.CacheLayout):
        self.layout = layout
        self.path = layout.index_path
        created = not self.path.exists()
        self.con = _connect(self.path)
        self.con.execute(_CLIPS_TABLE)
        self.con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        if created:
            fsync_dir(self.path.parent)

    @classmethod
    def open_existing(cls, layout: cf.CacheLayout) -> "ClipIndex | None":
        """The index if it exists, else None (never creates one: for the read-only commands)."""
        return cls(layout) if layout.index_path.exists() else None

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "ClipIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        row = self.con.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(row[0]) if row else 0

    def __len__(self) -> int:
        return self.con.execute("SELECT COUNT(*) FROM clips").fetchone()[0]

    def light_rows(self) -> dict[str, IndexRow]:
        """Every row's LIGHT columns by clip id (what reconciling sources reads)."""
        cur = self.con.execute(f"SELECT {', '.join(LIGHT)} FROM clips")
        return {row[0]: IndexRow._make(row) for row in cur}

    def entry(self, clip_id: str) -> cf.ClipEntry | None:
        row = self.con.execute(f"SELECT {', '.join(COLUMNS)} FROM clips WHERE clip_id=?", (clip_id,)).fetchone()
        return None if row is None else from_row(row)

    def entries(self, status: str | None = None) -> Iterator[cf.ClipEntry]:
        """Entries in clip-id order (all, or those of one status)."""
        where, args = ("WHERE status=?", (status,)) if status else ("", ())
        for row in self.con.execute(f"SELECT {', '.join(COLUMNS)} FROM clips {where} ORDER BY clip_id", args):
            yield from_row(row)

    def counts(self) -> dict[str, int]:
        got = dict(self.con.execute("SELECT status, COUNT(*) FROM clips GROUP BY status").fetchall())
        return {s: int(got.get(s, 0)) for s in cf.STATUSES}

    def cached_frames(self) -> int:
        return int(self.con.execute("SELECT COALESCE(SUM(num_frames), 0) FROM clips WHERE status=?",
                                    (cf.STATUS_CACHED,)).fetchone()[0])

    def next_uid(self) -> int:
        return 1 + int(self.con.execute("SELECT COALESCE(MAX(clip_uid), -1) FROM clips").fetchone()[0])

    def live_ends(self) -> dict[str, int]:
        """Per shard, the end of its last live (cached) record: what the shard must be at least."""
        return dict(self.con.execute("SELECT shard, MAX(offset + nbytes) FROM clips WHERE status=? GROUP BY shard",
                                     (cf.STATUS_CACHED,)).fetchall())

    def live_bytes(self) -> dict[str, int]:
        return dict(self.con.execute("SELECT shard, SUM(nbytes) FROM clips WHERE status=? GROUP BY shard",
                                     (cf.STATUS_CACHED,)).fetchall())

    def clips_past(self, shard: str, size: int) -> list[str]:
        """Cached clips of `shard` whose record does not fit in `size` bytes (a truncated shard)."""
        return [r[0] for r in self.con.execute(
            "SELECT clip_id FROM clips WHERE status=? AND shard=? AND offset + nbytes > ? ORDER BY clip_id",
            (cf.STATUS_CACHED, shard, size))]

    def records(self) -> Iterator[tuple[str, str, int, int, int, int]]:
        """(clip_id, shard, offset, nbytes, checksum, num_frames) of every cached clip, in shard order."""
        yield from self.con.execute("SELECT clip_id, shard, offset, nbytes, checksum, num_frames FROM clips "
                                    "WHERE status=? ORDER BY shard, offset", (cf.STATUS_CACHED,))

    # -- writing (one transaction each; the generation counts them) -------------------------------

    def _transaction(self, work) -> None:
        def and_count() -> None:
            work()
            self.con.execute("INSERT INTO meta (key, value) VALUES ('generation', '1') ON CONFLICT(key) DO UPDATE "
                             "SET value = CAST(value AS INTEGER) + 1")

        _in_transaction(self.con, and_count, "index-commit")

    def put(self, entries: Iterable[cf.ClipEntry]) -> None:
        rows = [to_row(e) for e in entries]
        if rows:
            self._transaction(lambda: self.con.executemany(_INSERT, rows))

    def delete(self, clip_ids: Iterable[str]) -> None:
        ids = [(c,) for c in clip_ids]
        if ids:
            self._transaction(lambda: self.con.executemany("DELETE FROM clips WHERE clip_id=?", ids))

    def touch(self, moved: Iterable[tuple[str, int, str]]) -> None:
        """(clip id, mtime_ns, source_path) of sources whose bytes are unchanged but whose mtime or path moved."""
        rows = [(m, p, c) for c, m, p in moved]
        if rows:
            self._transaction(lambda: self.con.executemany(
                "UPDATE clips SET mtime_ns=?, source_path=? WHERE clip_id=?", rows))

    def mark_damaged(self, clip_ids: Iterable[str]) -> None:
        """Clips whose record failed a check: the next run re-does them (their uid is kept)."""
        ids = [(c,) for c in clip_ids]
        if ids:
            self._transaction(lambda: self.con.executemany("UPDATE clips SET damaged=1 WHERE clip_id=?", ids))

    def move_records(self, moves: list[tuple[str, int, str]]) -> None:
        """(new shard, new offset, clip id): records copied elsewhere byte for byte (compaction)."""
        if moves:
            self._transaction(lambda: self.con.executemany("UPDATE clips SET shard=?, offset=? WHERE clip_id=?",
                                                           moves))

    def merge_journals(self) -> int:
        """Merge every journal on disk into the index, oldest first, and delete it; returns rows merged."""
        merged = 0
        for path in self.layout.journals():
            try:
                self.con.execute("ATTACH DATABASE ? AS j", (str(path),))
            except sqlite3.DatabaseError as err:
                log.warning("journal %s is unreadable (%s): removed; its clips are re-done", path, err)
                path.unlink(missing_ok=True)
                continue
            try:
                has_table = self.con.execute("SELECT 1 FROM j.sqlite_master WHERE name='clips'").fetchone()
                if has_table:
                    n = self.con.execute("SELECT COUNT(*) FROM j.clips").fetchone()[0]
                    cols = ", ".join(COLUMNS)
                    self._transaction(lambda: self.con.execute(
                        f"INSERT OR REPLACE INTO clips ({cols}) SELECT {cols} FROM j.clips"))
                    merged += n
            except sqlite3.DatabaseError as err:
                log.warning("journal %s is damaged (%s): removed; its clips are re-done", path, err)
            finally:
                self.con.execute("DETACH DATABASE j")
            faults.point("journal-unlink")
            path.unlink(missing_ok=True)
            Path(f"{path}-journal").unlink(missing_ok=True)  # SQLite's own rollback file, if any
            fsync_dir(path.parent)
        return merged


class Journal:
    """The rows one writer commits, in a SQLite file of its own (see the module docstring)."""

    def __init__(self, layout: cf.CacheLayout, writer: str):
        layout.journals_dir.mkdir(parents=True, exist_ok=True)
        self.path = layout.journal_path(writer)
        self.con = _connect(self.path)
        self.con.execute(_CLIPS_TABLE)
        fsync_dir(self.path.parent)

    def commit(self, entries: list[cf.ClipEntry]) -> None:
        rows = [to_row(e) for e in entries]
        _in_transaction(self.con, lambda: self.con.executemany(_INSERT, rows), "journal-commit")

    def close(self) -> None:
        self.con.close()


def committed_ids(path: Path) -> set[str]:
    """Clip ids committed in a journal or index file so far (none when it has no table yet); read-only."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            return {row[0] for row in con.execute("SELECT clip_id FROM clips")}
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return set()
