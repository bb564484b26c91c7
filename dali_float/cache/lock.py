"""One writer at a time, and readers that are never pulled from under (flock(2) on files of the cache folder).

**The writer lock** (`<cache>/writer.lock`, LOCK_EX): held by the one process that writes index.sqlite
and may cut or delete shards: a preprocessing run (rank 0's parent; `train.py` too, while it brings the
cache up to date), `compact`, `migrate`, `verify --repair` and `clear`. The holder writes who it is
into the file (pid, host, command, since); a second writer waits up to its timeout, saying who holds the
lock, then stops with one line (exit 3). The kernel drops the lock when its holder dies, however it dies:
no stale lock to clean up. After taking it the holder checks that the file it locked is still the one
at that path (`clear` may have deleted the folder under a waiter).

**Writer liveness** (`journals/<writer>.lock`, LOCK_EX): every shard writer (a worker process) holds
one for as long as it appends. Before a writer cuts shard tails it waits for every such lock to be free:
an orphan worker of a killed run (they die with their parent, but not in the same instant) is never
cut off mid-append.

**Reader leases** (`training/<generation>.json`, LOCK_SH): a training process holds a shared lock on the
header of the training-view generation it reads, for as long as it reads. A writer never truncates or
deletes the bytes a leased generation references (its shards up to the ends it records) nor that
generation's arrays: it tests each generation header with LOCK_EX|LOCK_NB; a leased one protects its
extents, and what would have been cut is left to the next writer that finds no lease (LMDB's reader
table and SQLite's WAL readers work the same way). Readers never wait for writers (a writer holds a
header's LOCK_EX only for the instant of testing or deleting it) and never take the writer lock, so a
read-only cache (a read-only mount) can be trained on.

flock is local to one machine's kernel; on NFS (v4, Linux clients) it is mapped onto POSIX byte-range
locks that the server arbitrates, and some file systems (older NFS, some FUSE mounts) ignore it. Rule:
on a shared file system, run a cache's writers (preprocessing, compact, clear) from one host at a time,
or hold a lock from a service you trust around them (docs/RELIABILITY.md).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from dali_float.errors import CacheBusy, ReadOnlyCache

log = logging.getLogger(__name__)

WRITER_LOCK = "writer.lock"
DEFAULT_TIMEOUT_S = 60.0
_POLL_S = 0.2
_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def _this_command() -> str:
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"


def holder_of(path: Path) -> dict[str, Any]:
    """What the lock file at `path` says of its holder ({} when it says nothing readable)."""
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(info: dict[str, Any]) -> str:
    if not info:
        return "another process"
    return (f"pid {info.get('pid')} on {info.get('host')} (`{info.get('command')}`) since "
            f"{info.get('since', '?')}")


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


class WriterLock:
    """The cache folder's writer lock (see the module docstring); a context manager.

    Re-entrant within a process (a command that holds it may call another that takes it; the inner one
    then has the outer one's `timeout_s`). `timeout_s`: how long to wait for another holder (0: do not
    wait); what holds the cache's index waits as long (SQLite's busy timeout).
    """

    _held: dict[str, list] = {}  # real path of the lock file -> [fd, depth, timeout_s], this process's locks

    def __init__(self, root: Path, timeout_s: float = DEFAULT_TIMEOUT_S, command: str | None = None,
                 filename: str = WRITER_LOCK):
        self.root = Path(root)
        self.path = self.root / filename  # another name: another lock of the folder (a run folder's run.lock)
        self.timeout_s = float(timeout_s)
        self.command = command or _this_command()
        self._key: str | None = None

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        key = os.path.realpath(self.path)
        if key in self._held:
            self._held[key][1] += 1
            self.timeout_s = self._held[key][2]
            self._key = key
            return
        deadline, told = time.monotonic() + self.timeout_s, False
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                info = holder_of(self.path)
                if time.monotonic() >= deadline:
                    raise CacheBusy(f"the cache {self.root} is being written by {describe_holder(info)}; wait for "
                                    f"it to finish (or stop it) and run the same command again "
                                    f"(--lock_timeout_s waits longer)") from None
                if not told:
                    log.warning("the cache %s is being written by %s: waiting up to %.0f s for it",
                                self.root, describe_holder(info), self.timeout_s)
                    told = True
                time.sleep(_POLL_S)
                continue
            if not _same_file(fd, self.path):  # deleted (clear) or replaced while we waited: take the new one
                os.close(fd)
                continue
            break
        self._write_holder(fd)
        self._held[key] = [fd, 1, self.timeout_s]
        self._key = key
        if told:
            log.info("the other writer finished; going on")

    def _open(self) -> int:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if err.errno in _READ_ONLY_ERRNOS:
                raise ReadOnlyCache(f"the cache {self.root} cannot be written ({err.strerror}): preprocess where "
                                    f"the cache can be written, or give a --cache_dir that can be") from None
            raise

    def _write_holder(self, fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        data = (json.dumps(info) + "\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError as err:  # who holds it is a courtesy: a full disk must not stop the lock
            log.debug("could not record the writer lock's holder: %s", err)

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None or key not in self._held:
            return
        held = self._held[key]
        held[1] -= 1
        if held[1] == 0:
            del self._held[key]
            os.close(held[0])  # drops the flock


def is_write_locked(root: Path) -> dict[str, Any] | None:
    """The holder's info when another process holds `root`'s writer lock, else None (a test, not a wait)."""
    path = Path(root) / WRITER_LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return holder_of(path) or {"pid": "?"}
    finally:
        os.close(fd)
    return None


# --------------------------------------------------------------------------------------------------
# Writer liveness: one lock file per shard writer


class LiveWriter:
    """`journals/<writer>.lock`, held LOCK_EX by one shard writer for as long as it writes; removed at close."""

    def __init__(self, journals_dir: Path, writer: str):
        self.path = Path(journals_dir) / f"{writer}.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # a new, unique name: never contended
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def close(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it: a waiter then sees it gone
            os.close(self.fd)
            self.fd = None


def wait_for_live_writers(journals_dir: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
    """Wait until no shard writer holds a lock in `journals_dir` (a killed run's orphan workers die with
    their parent, within moments); remove the lock files of dead writers. Returns how many were removed.
    CacheBusy when one is still alive after `timeout_s` (a process that should not be writing)."""
    removed, deadline = 0, time.monotonic() + timeout_s
    for path in sorted(Path(journals_dir).glob("*.lock")) if Path(journals_dir).is_dir() else []:
        while True:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                break  # its writer closed it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    pid = path.read_text().strip() if path.exists() else "?"
                    raise CacheBusy(f"a shard writer (pid {pid}, {path.name}) is still writing in {path.parent} "
                                    f"although no run holds the cache's writer lock; stop that process and run "
                                    f"the same command again") from None
                time.sleep(_POLL_S)
                continue
            try:
                if _same_file(fd, path):
                    path.unlink(missing_ok=True)
                    removed += 1
            finally:
                os.close(fd)
            break
    return removed


# --------------------------------------------------------------------------------------------------
# Reader leases: a shared lock on a training-view generation's header


def generation_header_path(training_dir: Path, generation: int) -> Path:
    return Path(training_dir) / f"{generation:010d}.json"


class ReaderLease:
    """A shared lock on one generation's header (training/<generation>.json), held while reading it.

    `header` is that generation's training.json as it was exported. Pickles to nothing (a worker
    process of the holder needs no lease of its own: the holder's protects the files).
    """

    def __init__(self, fd: int, path: Path, header: dict[str, Any]):
        self.fd: int | None = fd
        self.path, self.header = path, header

    @property
    def generation(self) -> int:
        return int(self.header["generation"])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.close()

    def __reduce__(self):
        return (_no_lease, ())


def _no_lease() -> None:
    return None


def take_reader_lease(training_path: Path, training_dir: Path, timeout_s: float = 30.0) -> ReaderLease | None:
    """A lease on the generation training.json names now (None: no training view, or one exported
    before leases existed: the caller says to run preprocessing). Retries while writers replace it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            current = json.loads(Path(training_path).read_text())
            generation = int(current["generation"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # the caller's reading of training.json names the problem
        path = generation_header_path(training_dir, generation)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if json.loads(Path(training_path).read_text()).get("generation") == generation:
                return None  # exported without a per-generation header (an older dali-float)
            continue  # replaced meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # a writer is testing or deleting it this instant
            os.close(fd)
            if time.monotonic() >= deadline:
                raise CacheBusy(f"could not take a reader lease on {path} for {timeout_s:.0f} s") from None
            time.sleep(0.01)
            continue
        if not _same_file(fd, path):  # deleted between our open and our lock
            os.close(fd)
            continue
        try:
            header = json.loads(os.pread(fd, 1 << 24, 0))
        except ValueError:
            os.close(fd)
            return None
        return ReaderLease(fd, path, header)


def leased_generations(training_dir: Path, keep: int | None,
                       delete: bool = True) -> tuple[dict[str, int], list[int]]:
    """({shard name: end} that leased generations reference, [leased generations]).

    For a writer (`delete`): every generation header nobody leases, except generation `keep` (the
    current one), is deleted with its arrays while this writer holds it exclusively (a reader that
    opened it meanwhile sees it gone and retries with the current one). `delete=False`: only look.
    """
    protected: dict[str, int] = {}
    leased: list[int] = []
    folder = Path(training_dir)
    if not folder.is_dir():
        return protected, leased
    for path in sorted(folder.glob("*.json")):
        try:
            generation = int(path.stem)
        except ValueError:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                leased.append(generation)
                try:
                    header = json.loads(os.pread(fd, 1 << 24, 0))
                except ValueError:
                    continue
                for shard in header.get("shards", []):
                    protected[shard["name"]] = max(protected.get(shard["name"], 0), int(shard["end"]))
                continue
            if delete and generation != keep:
                for name in (header_arrays(fd) or []):
                    (folder / name).unlink(missing_ok=True)
                path.unlink(missing_ok=True)  # last: while it exists, its arrays may be leased
        finally:
            os.close(fd)
    return protected, leased


@contextlib.contextmanager
def no_readers(training_dir: Path) -> Iterator[None]:
    """Hold every generation header exclusively for the block (a reader arriving meanwhile waits and then
    finds what the block left); CacheBusy when a reader holds one now."""
    held = []
    try:
        for path in sorted(Path(training_dir).glob("*.json")) if Path(training_dir).is_dir() else []:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            held.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CacheBusy(f"{training_dir.parent} is being read by a training process (generation "
                                f"{path.stem}); stop it and run the same command again") from None
        yield
    finally:
        for fd in held:
            os.close(fd)


def header_arrays(fd: int) -> list[str] | None:
    try:
        header = json.loads(os.pread(fd, 1 << 24, 0))
        return [header["rows"], header["ids"]]
    except (ValueError, KeyError, TypeError):
        return None
