"""Files written so that a kill at any moment leaves the old file or the new one, never half of one:
write a temporary sibling, flush, fsync, rename over the target, fsync the folder."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable

from dali_float.errors import UsageError, disk_full

log = logging.getLogger(__name__)

TMP_MARKER = ".tmp-"  # temporary files are <name>.tmp-<pid>; leftovers of a killed write match *.tmp-*


def write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(file)` on a temporary sibling of `path`, then put it in place atomically."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)  # the rename itself survives a crash


def make_folder_durably(folder: Path) -> None:
    """mkdir -p, fsyncing each new folder's parent so that the new names survive a crash."""
    folder = Path(folder)
    if folder.is_dir():
        return
    make_folder_durably(folder.parent)
    try:
        folder.mkdir()
    except FileExistsError:
        return
    fsync_dir(folder.parent)


def fsync_dir(folder: Path) -> None:
    """fsync a folder: the names created, renamed or removed in it survive a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()))


def create_folder_once(final: Path, complete_file: str, fill: Callable[[Path], Any], what: str) -> Path:
    """The folder `final`, made by `fill(tmp)` on a temporary sibling renamed into place unless
    `final/complete_file` already exists; `what` names it in the log.

    The rename is atomic, so a half-filled folder is never seen under its final name; of two processes
    racing, one rename wins and the other uses the winner's folder. UsageError when `final` exists
    without `complete_file` (a folder left by something else).
    """
    final = Path(final)
    if (final / complete_file).is_file():
        return final
    log.info("writing %s in %s (once)", what, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fill(tmp)
        try:
            os.rename(tmp, final)  # replaces only a missing or empty folder
        except OSError as err:
            if not (final / complete_file).is_file():
                raise UsageError(f"{final} exists but is not complete (no {complete_file}: {err.strerror}); "
                                 f"remove it and run again") from None
            log.info("another process wrote %s first; using it", what)
        else:
            log.info("%s ready in %s", what, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_temporary_files(root: Path) -> int:
    """Delete leftovers of writes killed half-way under `root`; returns how many were removed."""
    removed = 0
    if Path(root).exists():
        for p in Path(root).rglob(f"*{TMP_MARKER}*"):
            p.unlink(missing_ok=True)
            removed += 1
    return removed
