"""The errors a user can cause, each with one clear line and the exit code the scripts use.

Scripts catch `DaliFloatError` at the top (see `dali_float.cli.run_main`) and print `error: <message>`
without a traceback. Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class DaliFloatError(Exception):
    """Base of every user-facing error; `str(err)` is the one line the user sees."""

    exit_code = 1


class UsageError(DaliFloatError):
    """Bad command line or environment: unknown preset, path that does not exist, missing GPU."""

    exit_code = 2


class CheckpointError(UsageError):
    """A checkpoint that cannot be loaded: missing file, wrong keys or shapes, another preset."""


class CacheError(UsageError):
    """The feature cache is missing, stale, half-written or of another format version.

    The message always names the command that fixes it.
    """


class Interrupted(DaliFloatError):
    """SIGINT or SIGTERM stopped the command after it saved what it had finished; the message says what and the
    command to continue. Exit 128 + the signal's number, as a shell reports it (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class NoSourcesError(DaliFloatError):
    """The data root (or segment list) holds no video to preprocess: exit 1, nothing is touched."""


class MediaError(DaliFloatError):
    """One clip cannot be used (unreadable, no video stream, no audio, unsupported codec).

    Preprocessing records it as a `failed` entry and goes on with the other clips.
    """


class ClipSkipped(DaliFloatError):
    """One clip is valid but unusable for training (shorter than one window): recorded as `skipped`."""


class EnvironmentProblem(DaliFloatError):
    """The machine, not the input: a full disk, an I/O error, a folder that cannot be listed, a read-only
    file system, the cache held by another writer. Exit 3: nothing finished is lost; fix the cause and
    run the same command again."""

    exit_code = 3


class CacheBusy(EnvironmentProblem):
    """Another process holds the cache's writer lock (or its readers hold what a command must delete)."""


class RunFolderBusy(EnvironmentProblem):
    """Another process trains into the run folder (--output_dir) now."""


class ReadOnlyCache(EnvironmentProblem):
    """The cache folder cannot be written (a read-only mount, or no write permission)."""


def by_name(name: str) -> type[DaliFloatError] | None:
    """The DaliFloatError subclass of this name (an error sent as text by a worker process), else None."""
    found = globals().get(name)
    return found if isinstance(found, type) and issubclass(found, DaliFloatError) else None


def describe_disk(path) -> str:
    """'<mount point> (<free> free of <size>)' for the file system holding `path` (its nearest existing parent)."""
    import os
    import shutil
    from pathlib import Path

    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    mount = p
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return str(mount)
    return f"{mount} ({usage.free / 1e6:.1f} MB free of {usage.total / 1e6:.1f} MB)"


def disk_full(path, needed_bytes: int | None = None, what: str = "writing") -> EnvironmentProblem:
    """The one line for ENOSPC/EDQUOT (or SQLITE_FULL): which disk, how much space, what to do."""
    need = f"; about {needed_bytes / 1e6:.1f} MB more are needed" if needed_bytes else ""
    return EnvironmentProblem(f"the disk is full: {what} {path} failed on {describe_disk(path)}{need}. Free space "
                              f"there (or point --cache_dir at a larger disk) and run the same command again: every "
                              f"finished clip is kept")
