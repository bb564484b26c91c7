"""Files written so that a kill at any moment leaves the old file or the new one, never half of one:
write a temporary sibling, flush, fsync, rename over the target, fsync the folder."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

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
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)  # the rename itself survives a crash


def fsync_dir(folder: Path) -> None:
    """fsync a folder: the names created, renamed or removed in it survive a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()))


def remove_temporary_files(root: Path) -> int:
    """Delete leftovers of writes killed half-way under `root`; returns how many were removed."""
    removed = 0
    if Path(root).exists():
        for p in Path(root).rglob(f"*{TMP_MARKER}*"):
            p.unlink(missing_ok=True)
            removed += 1
    return removed
