"""Content hashes of files and folders (source videos, checkpoints, model folders)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dali_float.atomic import write_atomic
from dali_float.paths import home

_CHUNK_BYTES = 1 << 20
_MEMO_NAME = "weight_hashes.json"


def sha256_file(path: Path, remember: bool = False) -> str:
    """SHA-256 of a file. `remember`: reuse the hash recorded for the same (path, size, mtime) —
    for large model weights, hashed at every start of a run otherwise (~1 s per GB)."""
    path = Path(path)
    if remember:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        memo = _read_memo()
        if key in memo:
            return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            h.update(chunk)
    digest = h.hexdigest()
    if remember:
        memo[key] = digest
        _write_memo(memo)
    return digest


def sha256_tree(path: Path, remember: bool = False) -> str:
    """Hash of a folder: every file's relative name and content, in sorted order."""
    h = hashlib.sha256()
    root = Path(path)
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(sha256_file(p, remember).encode())
    return h.hexdigest()


def _read_memo() -> dict[str, str]:
    try:
        return json.loads((home() / _MEMO_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _write_memo(memo: dict[str, str]) -> None:
    path = home() / _MEMO_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: f.write(json.dumps(memo).encode()))
    except OSError:
        pass  # a cache of hashes: losing it costs time, not correctness
