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

Only the holder of the cache's writer lock (cache.lock) opens index.sqlite for writing (`ClipIndex`
takes the lock, re-entrantly); readers open it read-only (`ClipIndex.open_readonly`) and keep every
query short, so they never hold a writer up for long (a rollback-journal database, not WAL: WAL's
shared memory does not work on network file systems).

SQLite errors are classified, never guessed (`sqlite_problem`): only SQLITE_CORRUPT / SQLITE_NOTADB
mean a file is damaged; a full disk, a lock held too long, an I/O error or a read-only file system
stop the command with one line (exit 3) and keep every journal and shard.

Names: clip ids and source paths are stored losslessly whatever bytes the file system gave: as TEXT
when they are UTF-8, else as a BLOB of their bytes (a name that is not UTF-8 can never equal a TEXT
one, so each name has one form); Python sees them as str with surrogate escapes (os.fsdecode).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import os
import sqlite3
from operator import itemgetter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from dali_float.cache import format as cf
from dali_float.cache import faults
from dali_float.cache.lock import DEFAULT_TIMEOUT_S, WriterLock
from dali_float.atomic import fsync_dir
from dali_float.errors import CacheBusy, CacheError, EnvironmentProblem, disk_full

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

# What reconciling sources (and `status`'s counts, and a run's uids) needs of each row: read for a million rows,
# so no column more (each costs about 0.1 s per million).
LIGHT = ("clip_id", "clip_uid", "status", "num_frames", "source_path", "size_bytes", "mtime_ns", "content_hash",
         "segment_s", "damaged")
IndexRow = collections.namedtuple("IndexRow", LIGHT)
_as_index_row = functools.partial(tuple.__new__, IndexRow)  # IndexRow._make without a Python call per row


def db_text(name: str) -> str | bytes:
    """A name as SQLite stores it: the str when it is UTF-8, else its bytes (a BLOB; see the docstring)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name)


def from_db(value: str | bytes) -> str:
    """A stored name back as Python sees file names (surrogate escapes for bytes that are not UTF-8)."""
    return value if type(value) is str else os.fsdecode(value)


def to_row(entry: cf.ClipEntry) -> tuple:
    d = entry.to_dict()
    segment = d.pop("segment_s")
    emotion = d.pop("emotion")
    extra = {k: v for k, v in d.items() if k not in COLUMNS and v != _DEFAULTS.get(k, object())}
    return (db_text(entry.clip_id), entry.clip_uid, entry.status, entry.num_frames, entry.shard, entry.offset,
            entry.nbytes, entry.checksum, db_text(entry.source_path), entry.size_bytes, entry.mtime_ns,
            entry.content_hash,
            None if segment is None else json.dumps(segment),
            np.asarray(emotion, dtype=cf.EMOTION_DTYPE).tobytes() if len(emotion) else None, 0,
            json.dumps(extra, separators=(",", ":")))


def from_row(row: tuple) -> cf.ClipEntry:
    d = dict(zip(COLUMNS, row))
    d.pop("damaged")
    d["clip_id"], d["source_path"] = from_db(d["clip_id"]), from_db(d["source_path"])
    d.update(json.loads(d.pop("extra")))
    d["segment_s"] = None if d["segment_s"] is None else json.loads(d["segment_s"])
    d["emotion"] = [] if d["emotion"] is None else np.frombuffer(d["emotion"], cf.EMOTION_DTYPE).tolist()
    return cf.ClipEntry.from_dict(d)


# SQLite's primary result codes (sqlite3.h) that classify an error.
SQLITE_PERM, SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR = 3, 5, 6, 8, 10
SQLITE_CORRUPT, SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_NOTADB = 11, 13, 14, 26


def sqlite_code(err: BaseException) -> int:
    """The primary result code of an sqlite3 error (0 when it carries none)."""
    return int(getattr(err, "sqlite_errorcode", 0) or 0) & 0xFF


def is_corrupt(err: BaseException) -> bool:
    """SQLite itself says the file is damaged (the only case where a journal may be given up)."""
    return sqlite_code(err) in (SQLITE_CORRUPT, SQLITE_NOTADB)


def sqlite_problem(err: sqlite3.Error, path: Path, what: str, needed_bytes: int | None = None) -> Exception:
    """The one-line error for an SQLite failure on `path` while doing `what` (never a guess of damage)."""
    code, name = sqlite_code(err), getattr(err, "sqlite_errorname", "") or type(err).__name__
    if code == SQLITE_FULL:
        return disk_full(path, needed_bytes, what=what)
    keep = "nothing was lost (every journal and shard is kept); run the same command again"
    if code in (SQLITE_BUSY, SQLITE_LOCKED):
        return CacheBusy(f"{what} {path} failed: another process held the database for longer than the lock "
                         f"timeout ({name}: a reader keeping a transaction open, or a writer without the cache's "
                         f"lock); {keep} once it is done (--lock_timeout_s waits longer)")
    if code == SQLITE_READONLY or code in (SQLITE_PERM, SQLITE_CANTOPEN):
        return EnvironmentProblem(f"{what} {path} failed: the file cannot be written or opened ({name}: {err}); fix "
                                  f"the permissions or the mount; {keep}")
    if code == SQLITE_IOERR:
        return EnvironmentProblem(f"{what} {path} failed with an I/O error ({name}: {err}); check the disk; {keep}")
    if is_corrupt(err):
        return CacheError(f"{path} is damaged ({name}: {err}): rebuild the cache with `python preprocess.py "
                          f"--force_preprocess` (same flags)")
    return EnvironmentProblem(f"{what} {path} failed ({name}: {err}); {keep}")


def _in_transaction(con: sqlite3.Connection, work, fault: str) -> None:
    """work() in one transaction, committed (durably: synchronous=EXTRA) or rolled back on any error
    (sqlite3 errors come out as SQLite raised them: see `classified`)."""
    con.execute("BEGIN IMMEDIATE")
    try:
        work()
        faults.point(fault)
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def classified(path: Path, what: str) -> Iterator[None]:
    """SQLite errors inside the block come out as `sqlite_problem`'s one line."""
    try:
        yield
    except sqlite3.Error as err:
        raise sqlite_problem(err, path, what) from None


def _connect(path: Path, timeout_s: float = DEFAULT_TIMEOUT_S, readonly: bool = False,
             any_thread: bool = False) -> sqlite3.Connection:
    """Autocommit connection (transactions are explicit), a rollback journal (no WAL: its shared memory
    does not work on network file systems), durable commits: synchronous=EXTRA also syncs the folder
    after the rollback journal is deleted (FULL does not: a power cut could bring a hot journal back
    and roll a committed transaction back). Read-only: `mode=ro`, nothing is written, not even on a
    read-only mount. any_thread: the connection may be used by one thread after another (never by two
    at once: the owner sees to it)."""
    try:
        if readonly:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=timeout_s)
            con.execute("SELECT 1 FROM sqlite_master LIMIT 1")
            return con
        con = sqlite3.connect(str(path), isolation_level=None, timeout=timeout_s, check_same_thread=not any_thread)
        con.execute("PRAGMA synchronous=EXTRA")
        con.execute("PRAGMA journal_mode=DELETE")
        return con
    except sqlite3.Error as err:
        raise sqlite_problem(err, path, "opening") from None


class ClipIndex:
    """index.sqlite of one cache folder. Only the holder of the cache's writer lock writes it: opening it
    for writing takes that lock (re-entrant in one process); `open_readonly` takes none."""

    def __init__(self, layout: cf.CacheLayout, timeout_s: float = DEFAULT_TIMEOUT_S, *, _readonly: bool = False):
        self.layout = layout
        self.path = layout.index_path
        self.readonly = _readonly
        self._lock = None
        if _readonly:
            self.con = _connect(self.path, timeout_s, readonly=True)
            return
        self._lock = WriterLock(layout.root, timeout_s)
        self._lock.acquire()
        try:
            created = not self.path.exists()
            self.con = _connect(self.path, self._lock.timeout_s)  # the outer holder's wait when re-entered
            with classified(self.path, "creating"):
                self.con.execute(_CLIPS_TABLE)
                self.con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            if created:
                fsync_dir(self.path.parent)
        except BaseException:
            self._lock.release()
            raise

    @classmethod
    def open_existing(cls, layout: cf.CacheLayout) -> "ClipIndex | None":
        """The index read-only if it exists, else None (never creates one: for the read-only commands)."""
        return cls.open_readonly(layout) if layout.index_path.exists() else None

    @classmethod
    def open_readonly(cls, layout: cf.CacheLayout, timeout_s: float = DEFAULT_TIMEOUT_S) -> "ClipIndex":
        """The index for reading only: no lock, no write, works on a read-only mount."""
        return cls(layout, timeout_s, _readonly=True)

    def close(self) -> None:
        self.con.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

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
        blob_names = self.has_blob_names()
        return _light_by_id(self.con.execute(f"SELECT {', '.join(LIGHT)} FROM clips"), blob_names)

    def has_blob_names(self) -> bool:
        return self.con.execute("SELECT 1 FROM clips WHERE typeof(clip_id)='blob' OR typeof(source_path)='blob' "
                                "LIMIT 1").fetchone() is not None

    def entry(self, clip_id: str) -> cf.ClipEntry | None:
        row = self.con.execute(f"SELECT {', '.join(COLUMNS)} FROM clips WHERE clip_id=?",
                               (db_text(clip_id),)).fetchone()
        return None if row is None else from_row(row)

    def entries(self, *statuses: str) -> Iterator[cf.ClipEntry]:
        """Entries in clip-id order (all, or those of the statuses given: one pass over the table for several).
        Read whole first: a reader never holds the database while its caller works (a writer would wait for it)."""
        where = f"WHERE status IN ({', '.join('?' * len(statuses))})" if statuses else ""
        rows = self.con.execute(f"SELECT {', '.join(COLUMNS)} FROM clips {where} ORDER BY clip_id", statuses).fetchall()
        for row in rows:
            yield from_row(row)

    def retryable(self, all_failed: bool = False) -> set[str]:
        """Failed clips the next run tries again: those that failed for a cause outside the clip (a
        permission, memory, an I/O error: `transient` in the entry), or every failed one (`all_failed`)."""
        where = "" if all_failed else " AND json_extract(extra, '$.transient') = 1"
        return {from_db(r[0]) for r in self.con.execute(f"SELECT clip_id FROM clips WHERE status=?{where}",
                                                         (cf.STATUS_FAILED,))}

    def counts(self) -> dict[str, int]:
        got = dict(self.con.execute("SELECT status, COUNT(*) FROM clips GROUP BY status").fetchall())
        return {s: int(got.get(s, 0)) for s in cf.STATUSES}

    def cached_frames(self) -> int:
        return int(self.con.execute("SELECT COALESCE(SUM(num_frames), 0) FROM clips WHERE status=?",
                                    (cf.STATUS_CACHED,)).fetchone()[0])

    def stage_time(self) -> tuple[int, int, float]:
        """(clips, frames, seconds) of the cached clips that recorded their per-stage times: what preprocessing
        them took (one worker's seconds), for an estimate of what more would take."""
        clips, frames, seconds = self.con.execute(
            "SELECT COUNT(*), COALESCE(SUM(num_frames), 0), COALESCE(SUM((SELECT SUM(value) FROM json_each("
            "json_extract(extra, '$.stage_seconds')))), 0) FROM clips WHERE status=? AND "
            "json_extract(extra, '$.stage_seconds') IS NOT NULL", (cf.STATUS_CACHED,)).fetchone()
        return int(clips), int(frames), float(seconds)

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
        return [from_db(r[0]) for r in self.con.execute(
            "SELECT clip_id FROM clips WHERE status=? AND shard=? AND offset + nbytes > ? ORDER BY clip_id",
            (cf.STATUS_CACHED, shard, size))]

    def records(self, chunk: int = 100_000) -> Iterator[tuple[str, str, int, int, int, int]]:
        """(clip_id, shard, offset, nbytes, checksum, num_frames) of every cached clip, in shard order.

        Fetched `chunk` rows per query (by rowid, each query its own short read), never one long read
        holding the database while the caller checks bytes. A writer changing the index meanwhile is
        seen or not: the caller re-reads a clip's row before calling its bytes damaged."""
        last = -1
        while True:
            got = self.con.execute(
                "SELECT rowid, clip_id, shard, offset, nbytes, checksum, num_frames FROM clips "
                "WHERE status=? AND rowid>? ORDER BY rowid LIMIT ?", (cf.STATUS_CACHED, last, chunk)).fetchall()
            if not got:
                return
            last = got[-1][0]
            got.sort(key=lambda r: (r[2], r[3]))
            for _, clip_id, *rest in got:
                yield (from_db(clip_id), *rest)

    # -- writing (one transaction each; the generation counts them) -------------------------------

    def _transaction(self, work) -> None:
        with classified(self.path, "writing the index"):
            self._raw_transaction(work)

    def _raw_transaction(self, work) -> None:
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
        ids = [(db_text(c),) for c in clip_ids]
        if ids:
            self._transaction(lambda: self.con.executemany("DELETE FROM clips WHERE clip_id=?", ids))

    def touch(self, moved: Iterable[tuple[str, int, str]]) -> None:
        """(clip id, mtime_ns, source_path) of sources whose bytes are unchanged but whose mtime or path moved."""
        rows = [(m, db_text(p), db_text(c)) for c, m, p in moved]
        if rows:
            self._transaction(lambda: self.con.executemany(
                "UPDATE clips SET mtime_ns=?, source_path=? WHERE clip_id=?", rows))

    def mark_damaged(self, clip_ids: Iterable[str]) -> None:
        """Clips whose record failed a check: the next run re-does them (their uid is kept)."""
        ids = [(db_text(c),) for c in clip_ids]
        if ids:
            self._transaction(lambda: self.con.executemany("UPDATE clips SET damaged=1 WHERE clip_id=?", ids))

    def move_records(self, moves: list[tuple[str, int, str]]) -> None:
        """(new shard, new offset, clip id): records copied elsewhere byte for byte (compaction)."""
        rows = [(s, o, db_text(c)) for s, o, c in moves]
        if rows:
            self._transaction(lambda: self.con.executemany("UPDATE clips SET shard=?, offset=? WHERE clip_id=?",
                                                           rows))

    def merge_journals(self) -> int:
        """Merge every journal on disk into the index, oldest first, and delete it; returns rows merged.

        A journal is given up (removed, its clips re-done) only when SQLite says it is damaged
        (SQLITE_CORRUPT / SQLITE_NOTADB). Anything else (a full disk, a lock held too long, an I/O error)
        stops here with one line, keeping it and every other journal for the next run."""
        merged = 0
        for path in self.layout.journals():
            try:
                merged += self._merge_one(path)
            except sqlite3.Error as err:
                if not is_corrupt(err):
                    # The index grows by about the journal's rows, and its rollback journal holds as much again.
                    raise sqlite_problem(err, path, "merging the journal", 2 * _size(path)) from None
                log.warning("journal %s is damaged (%s): removed; its clips are re-done", path,
                            getattr(err, "sqlite_errorname", err))
            faults.point("journal-unlink")
            path.unlink(missing_ok=True)
            Path(f"{path}-journal").unlink(missing_ok=True)  # SQLite's own rollback file, if any
            fsync_dir(path.parent)
        return merged

    def _merge_one(self, path: Path) -> int:
        """One journal's rows into the index in one transaction (sqlite3.Error as SQLite raised it)."""
        self.con.execute("ATTACH DATABASE ? AS j", (str(path),))
        try:
            if not self.con.execute("SELECT 1 FROM j.sqlite_master WHERE name='clips'").fetchone():
                return 0  # created, nothing committed yet
            n = self.con.execute("SELECT COUNT(*) FROM j.clips").fetchone()[0]
            cols = ", ".join(COLUMNS)
            self._raw_transaction(lambda: self.con.execute(
                f"INSERT OR REPLACE INTO clips ({cols}) SELECT {cols} FROM j.clips"))
            return n
        finally:
            self.con.execute("DETACH DATABASE j")


class Journal:
    """The rows one writer commits, in a SQLite file of its own (see the module docstring)."""

    def __init__(self, layout: cf.CacheLayout, writer: str):
        layout.journals_dir.mkdir(parents=True, exist_ok=True)
        self.path = layout.journal_path(writer)
        self.con = _connect(self.path, any_thread=True)  # commits come from the worker's writer thread
        with classified(self.path, "creating the journal"):
            self.con.execute(_CLIPS_TABLE)
        fsync_dir(self.path.parent)

    def commit(self, entries: list[cf.ClipEntry]) -> None:
        rows = [to_row(e) for e in entries]
        with classified(self.path, "committing to the journal"):
            _in_transaction(self.con, lambda: self.con.executemany(_INSERT, rows), "journal-commit")

    def close(self) -> None:
        self.con.close()


def _committed_rows(path: Path, columns) -> list[tuple]:
    """`columns` of every row committed in a journal (or index) file, opened read-only; [] when it has no
    table yet or cannot be read."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            return con.execute(f"SELECT {', '.join(columns)} FROM clips").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return []


def read_entries(path: Path, clip_ids: list[str] | None = None) -> list[cf.ClipEntry]:
    """The entries committed in a journal (or index) file, all or those of `clip_ids`; read-only
    ([] when it has no table yet or cannot be read)."""
    rows = _committed_rows(path, COLUMNS)
    wanted = None if clip_ids is None else set(clip_ids)
    entries = [from_row(r) for r in rows]
    return entries if wanted is None else [e for e in entries if e.clip_id in wanted]


def light_rows_of(path: Path) -> dict[str, IndexRow]:
    """The LIGHT columns of every row committed in a journal (or index) file so far, by clip id; read-only
    ({} when it has no table yet or cannot be read): what `status` counts of a run that was killed or stopped
    before its journals were merged."""
    return _light_by_id(_committed_rows(path, LIGHT), blob_names=True)


def _light_by_id(rows: Iterable[tuple], blob_names: bool) -> dict[str, IndexRow]:
    """Rows of the LIGHT columns (a cursor's, or a list) as IndexRows by clip id, made by C loops (a million rows:
    a few tenths of a second less than a comprehension; from a cursor, no list of a million tuples meanwhile).
    blob_names: some names may be stored as bytes (not UTF-8): decode them."""
    named = list(map(_as_index_row, rows))
    by_id = dict(zip(map(itemgetter(0), named), named))
    if blob_names:  # rare in an index (which asks SQLite first); a journal's rows are always decoded
        by_id = {from_db(k): r._replace(clip_id=from_db(r.clip_id), source_path=from_db(r.source_path))
                 for k, r in by_id.items()}
    return by_id


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def committed_ids(path: Path) -> set[str]:
    """Clip ids committed in a journal or index file so far (none when it has no table yet); read-only."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            return {from_db(row[0]) for row in con.execute("SELECT clip_id FROM clips")}
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return set()
