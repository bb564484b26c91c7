"""The training view: the index's trainable clips as memory-mapped NumPy arrays (written and read here).

The loaders never touch index.sqlite's rows and hold no per-clip Python object: they map
`training/<generation>.rows.npy` (one `cache.format.training_row_dtype` record per clip: shard number,
byte offset, frame count, uid, emotion, where its id is) and `training/<generation>.ids` (the clip
ids, UTF-8, in clip-id order, so one is found by binary search). Memory grows with the clips the
loaders actually touch, not with the cache: ~60 bytes per clip, paged in on use.

`export` rewrites the view after a run that changed the index (its generation): the arrays, then
`training/<generation>.json` (the generation's header), then training.json (the commit point), which
names the arrays, so a reader sees one whole generation. A reader holds a shared lock on its
generation's header for as long as it reads (cache.lock: a reader lease): no writer deletes that
generation's arrays or cuts the shard bytes it references meanwhile. Older generations nobody reads
are deleted by the next export.

Clip ids are stored as their file-system bytes (UTF-8, or the raw bytes of a name that is not:
os.fsencode), sorted bytewise, as the index orders them.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from dali_float.cache import format as cf
from dali_float.cache import faults
from dali_float.atomic import TMP_MARKER, write_atomic, write_json_atomic
from dali_float.cache.index import ClipIndex
from dali_float.cache.lock import ReaderLease, generation_header_path, is_write_locked, leased_generations, \
    take_reader_lease
from dali_float.config import Preset
from dali_float.errors import CacheError

log = logging.getLogger(__name__)

_CHUNK = 100_000  # rows fetched from SQLite at a time while exporting


def read_view_header(layout: cf.CacheLayout) -> dict[str, Any] | None:
    try:
        return json.loads(layout.training_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CacheError(f"{layout.training_path} is unreadable ({err}): run `python preprocess.py` "
                         f"(same flags) to write it again") from None


def export(layout: cf.CacheLayout, index: ClipIndex, preset: Preset, fingerprint: str, force: bool = False) -> bool:
    """Write the training view of the index's current generation (unless it is already on disk).
    Clips shorter than one window, and clips marked damaged, are left out. Returns whether it wrote."""
    generation = index.generation
    old = read_view_header(layout)
    if not force and old is not None and old.get("generation") == generation \
            and old.get("format_version") == cf.FORMAT_VERSION \
            and generation_header_path(layout.training_dir, generation).exists():
        return False
    window = preset.timing.window_frames
    where = "WHERE status=? AND num_frames>=? AND damaged=0"
    args = (cf.STATUS_CACHED, window)
    n = index.con.execute(f"SELECT COUNT(*) FROM clips {where}", args).fetchone()[0]
    short = index.con.execute("SELECT COUNT(*) FROM clips WHERE status=? AND num_frames<?", args).fetchone()[0]
    if short:
        log.warning("%d cached clip(s) shorter than one %d-frame window are left out of training", short, window)
    rows = np.zeros(n, dtype=cf.training_row_dtype(preset))
    shard_numbers: dict[str, int] = {}
    ends: dict[str, int] = {}
    ids: list[bytes] = []
    pos = id_pos = 0
    # Bytewise order of the names: TEXT sorts as its UTF-8 bytes, but BLOB names (not UTF-8) sort after
    # every TEXT one unless both are compared as BLOBs; the index on clip_id serves the usual case.
    order = "CAST(clip_id AS BLOB)" if index.has_blob_names() else "clip_id"
    cur = index.con.execute(f"SELECT clip_id, clip_uid, shard, offset, nbytes, num_frames, emotion FROM clips "
                            f"{where} ORDER BY {order}", args)
    while chunk := cur.fetchmany(_CHUNK):
        clip_ids, uids, shards, offsets, nbytes, frames, emotions = zip(*chunk)
        encoded = [c if type(c) is bytes else c.encode() for c in clip_ids]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        part = rows[pos:pos + len(chunk)]
        part["shard"] = [shard_numbers.setdefault(s, len(shard_numbers)) for s in shards]
        part["offset"], part["num_frames"], part["uid"] = offsets, frames, uids
        part["id_length"] = lengths
        part["id_offset"] = id_pos + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        part["emotion"] = np.frombuffer(b"".join(emotions), dtype=cf.EMOTION_DTYPE).reshape(len(chunk), -1)
        for s, o, b in zip(shards, offsets, nbytes):
            ends[s] = max(ends.get(s, 0), o + b)
        ids.extend(encoded)
        pos, id_pos = pos + len(chunk), id_pos + int(lengths.sum())
    stem = f"{generation:010d}"
    layout.training_dir.mkdir(parents=True, exist_ok=True)
    rows_path, ids_path = layout.training_dir / f"{stem}.rows.npy", layout.training_dir / f"{stem}.ids"
    write_atomic(rows_path, lambda f: np.save(f, rows, allow_pickle=False))
    write_atomic(ids_path, lambda f: f.write(b"".join(ids)))
    header = {
        "format_version": cf.FORMAT_VERSION, "fingerprint": fingerprint, "generation": generation,
        "preset": preset.name, "window_frames": window, "clips": int(n), "frames": int(rows["num_frames"].sum()),
        "rows": rows_path.name, "ids": ids_path.name,
        "shards": [{"name": s, "end": ends[s]} for s in sorted(shard_numbers, key=shard_numbers.get)],
    }
    write_json_atomic(generation_header_path(layout.training_dir, generation), header)
    faults.point("export-commit")
    write_json_atomic(layout.training_path, header)
    remove_unread_generations(layout, generation)
    return True


def remove_unread_generations(layout: cf.CacheLayout, current: int) -> list[int]:
    """Delete the arrays of every generation but `current` that no reader leases (and stray files no
    generation header names); returns the leased generations kept."""
    _, leased = leased_generations(layout.training_dir, current)
    named = set()
    for path in layout.training_dir.glob("*.json"):
        try:
            header = json.loads(path.read_text())
            named.update((path.name, header["rows"], header["ids"]))
        except (OSError, ValueError, KeyError, TypeError):
            named.add(path.name)
    for path in layout.training_dir.iterdir():
        if path.name not in named and TMP_MARKER not in path.name:
            path.unlink(missing_ok=True)
    return leased


class TrainingView:
    """The arrays of one exported generation, memory-mapped (see the module docstring), and the reader
    lease that keeps them and the shard bytes they address in place while this view is open."""

    def __init__(self, layout: cf.CacheLayout, header: dict[str, Any], lease: ReaderLease | None = None):
        self.layout, self.header, self.lease = layout, header, lease
        self.generation = int(header["generation"])
        self.rows = np.load(layout.training_dir / header["rows"], mmap_mode="r")
        ids_path = layout.training_dir / header["ids"]
        self.ids = np.memmap(ids_path, dtype=np.uint8, mode="r") if os.path.getsize(ids_path) else np.zeros(0, np.uint8)
        self.shards = [layout.shard_path(s["name"]) for s in header["shards"]]
        self.shard_ends = [int(s["end"]) for s in header["shards"]]

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (to a DataLoader worker): reopen this generation's arrays by path there, never copy
        # the mapped bytes (~60 per clip: 60 MB at a million clips).
        return type(self), (self.layout, self.header)

    @classmethod
    def open(cls, layout: cf.CacheLayout, fix: str) -> "TrainingView":
        """The current generation, leased. Opens nothing for writing (a read-only cache is fine)."""
        lease = take_reader_lease(layout.training_path, layout.training_dir)
        header = lease.header if lease is not None else read_view_header(layout)
        if header is None:
            raise CacheError(f"the feature cache {layout.root} is half-written (preprocessing did not finish). "
                             f"Run `{fix}`")
        if lease is None:  # exported by a dali-float without leases: the next run writes the header
            log.info("the training view of %s has no generation header yet (an older dali-float wrote it): "
                     "reading it without a lease; `%s` adds one", layout.root, fix)
        if header.get("format_version") != cf.FORMAT_VERSION:
            raise CacheError(f"{layout.training_path} has format version {header.get('format_version')}, this "
                             f"dali-float reads {cf.FORMAT_VERSION}. Run `{fix}`")
        try:
            return cls(layout, header, lease)
        except (OSError, ValueError, KeyError) as err:
            if lease is not None:
                lease.close()
            raise CacheError(f"the training view of {layout.root} is damaged ({err}). Run `{fix}`") from None

    def close(self) -> None:
        """Let go of the lease (the arrays stay mapped until this object is gone)."""
        if self.lease is not None:
            self.lease.close()

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_frames(self) -> np.ndarray:
        return self.rows["num_frames"]

    def _id_bytes(self, i: int) -> bytes:
        row = self.rows[int(i)]
        start = int(row["id_offset"])
        return bytes(self.ids[start:start + int(row["id_length"])])

    def clip_id(self, i: int) -> str:
        return os.fsdecode(self._id_bytes(i))

    def clip_ids(self, indices) -> list[str]:
        return [self.clip_id(i) for i in np.asarray(indices).reshape(-1).tolist()]

    def find(self, clip_id: str) -> int | None:
        """The row of `clip_id` (binary search: the ids are sorted bytewise, as the export wrote them)."""
        key, lo, hi = os.fsencode(clip_id), 0, len(self.rows)
        while lo < hi:
            mid = (lo + hi) // 2
            here = self._id_bytes(mid)
            if here < key:
                lo = mid + 1
            elif here > key:
                hi = mid
            else:
                return mid
        return None


def writer_active(layout: cf.CacheLayout) -> bool:
    """Whether another process holds the cache's writer lock now (a run or compaction in progress)."""
    return is_write_locked(layout.root) is not None
