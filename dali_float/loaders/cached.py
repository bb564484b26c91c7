"""Opening a feature cache for training: checks first, so a user never sees a DALI stack trace.

Both cached loaders (`torch`, `dali`) read through `TrainingCache`: the training view's memory-mapped
arrays (cache.view: per clip its shard, byte offset, frame count, emotion and id) and the shards.
Nothing here holds a Python object per clip. `WindowReader` is the one reading of a window the
torch loader, the DALI loader's Python fallback and the bench's copy ceiling share; `pread_fully` the one
positioned read (the resident strategy loads its partition with it).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from dali_float.cache import format as cf
from dali_float.cache.index import ClipIndex
from dali_float.cache.store import read_record, shard_size
from dali_float.cache.view import TrainingView, writer_active
from dali_float.config import Preset
from dali_float.errors import CacheError, UsageError

log = logging.getLogger(__name__)


class TrainingCache:
    """The trainable clips of one fingerprinted cache folder (those holding at least one window)."""

    def __init__(self, layout: cf.CacheLayout, view: TrainingView, preset: Preset, fix: str):
        self.layout, self.view, self.preset, self.fix = layout, view, preset, fix

    @property
    def fingerprint(self) -> str:
        return self.view.header["fingerprint"]

    @property
    def root(self) -> Path:
        return self.layout.root

    def __len__(self) -> int:
        return len(self.view)

    @property
    def num_frames(self) -> np.ndarray:
        """(clips,) int64 frame counts (a view of the mapped rows)."""
        return self.view.num_frames

    def clip_id(self, i: int) -> str:
        return self.view.clip_id(i)

    def clip_ids(self, indices) -> list[str]:
        return self.view.clip_ids(indices)

    def index_of(self, clip_id: str) -> int:
        i = self.view.find(clip_id)
        if i is None:
            raise UsageError(f"clip {clip_id!r} is not among the trainable clips of {self.root} "
                             f"(e.g. {self.clip_id(0)!r})")
        return i

    def shard_paths(self) -> list[str]:
        return [str(p) for p in self.view.shards]

    def read_features(self, i: int) -> cf.ClipFeatures:
        """Every array of clip `i` (read from its shard; the bench, the sampler and the tests use it)."""
        row = self.view.rows[i]
        t = int(row["num_frames"])
        nbytes = cf.record_bytes(self.preset, t)
        shard = self.view.shards[int(row["shard"])].name
        return cf.ClipFeatures.from_record(read_record(self.layout, shard, int(row["offset"]), nbytes), self.preset,
                                           t, row["emotion"])

    def entry(self, clip_id: str) -> cf.ClipEntry | None:
        """The index's entry of a clip (source path, crop, ...): one SQLite query, not for the hot path."""
        with ClipIndex.open_readonly(self.layout) as index:
            return index.entry(clip_id)

    def close(self) -> None:
        """Let go of the reader lease (writers may then reclaim what this generation used)."""
        self.view.close()

    def describe_failure(self, i: int, what: str) -> str:
        """One line naming clip `i`, its shard and byte range, and the command that re-does it."""
        row = self.view.rows[int(i)]
        shard = self.view.shards[int(row["shard"])]
        return (f"reading clip {self.clip_id(i)!r} from {shard} (bytes from {int(row['offset'])}) failed ({what}): "
                f"run `{self.fix}` (it re-does the clips whose records are damaged; "
                f"`python preprocess.py verify --repair` checks every byte)")

    @classmethod
    def open(cls, cache_dir: Path, preset: Preset, fingerprint: str,
             preprocess_command: str | None = None) -> "TrainingCache":
        """Open the cache for `fingerprint`, or raise a CacheError saying what to run.

        Missing, stale (only caches of other weights/settings exist), version 1 (says how to convert),
        unfinished (no training view), out of date with its index, a shard shorter than its records
        (names the clip and the file), or no clip long enough.
        """
        cache_dir = Path(cache_dir)
        # Without the caller's command, a template, never a command that pastes as it is: without the data
        # root, crop and weights flags it would preprocess the demo corpus into this folder.
        fix = preprocess_command or (f"python preprocess.py --preset {preset.name} --cache_dir {cache_dir} "
                                     f"--data_root DIR --crop MODE [weights flags]")
        root = cf.cache_root(cache_dir, preset, fingerprint)
        if not root.exists():
            others = sorted(p.name for p in cache_dir.glob(f"{preset.name}-*")
                            if (p / "cache.json").exists() or (p / "manifest.json").exists()) \
                if cache_dir.exists() else []
            if others:
                raise CacheError(f"the feature cache in {cache_dir} is stale: it was built with other weights or "
                                 f"settings ({', '.join(others)}; current: {root.name}). Run `{fix}`")
            raise CacheError(f"no feature cache for preset {preset.name!r} in {cache_dir}. Run `{fix}`")
        layout = cf.CacheLayout(root)
        layout.check_version()
        view = TrainingView.open(layout, fix)
        if view.header.get("fingerprint") != fingerprint:
            raise CacheError(f"{layout.training_path} belongs to fingerprint {view.header.get('fingerprint')}, "
                             f"expected {fingerprint}. Run `{fix} --force_preprocess`")
        if layout.index_path.exists():
            with ClipIndex.open_readonly(layout) as index:
                behind = index.generation != view.generation
            if behind and not writer_active(layout):
                view.close()
                raise CacheError(f"the training view of {root} is older than its index (a run or a compaction "
                                 f"was interrupted). Run `{fix}`")
            if behind:  # a writer is at work: its new view comes at its end; this one is whole and leased
                log.info("another process is updating %s: training on its generation %d as it is", root,
                         view.generation)
        cache = cls(layout, view, preset, fix)
        cache._check_shards()
        if not len(view):
            raise CacheError(f"the feature cache {root} holds no clip of at least {preset.timing.window_frames} "
                             f"frames: see `python preprocess.py status`")
        return cache

    def _check_shards(self) -> None:
        """The cheap invariant: every shard holds its records' bytes; else the first clip that lacks them."""
        for number, (path, end) in enumerate(zip(self.view.shards, self.view.shard_ends)):
            size = shard_size(path)
            if size >= end:
                continue
            rows = self.view.rows
            ends = rows["offset"] + cf.record_bytes(self.preset, rows["num_frames"])
            bad = np.flatnonzero((rows["shard"] == number) & (ends > max(size, 0)))
            what = "the shard is missing" if size < 0 else f"the shard ends at byte {size}"
            raise CacheError(self.describe_failure(int(bad[0]) if len(bad) else 0, what))


class WindowReader:
    """Windows and reference rows of a TrainingCache's clips with os.preadv into caller buffers.

    Shard file descriptors are opened on first use in each process (DataLoader worker processes open
    their own) and kept: a few shards, not one file per clip.
    """

    def __init__(self, cache: TrainingCache):
        self.cache = cache
        self.rows = cache.view.rows
        self.paths = cache.shard_paths()
        self.row_bytes = cf.row_bytes(cache.preset)
        self.window = cache.preset.timing.window_frames
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # another process (a worker): its own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY | os.O_CLOEXEC)
        return fd

    def advise(self, samples) -> None:
        """Tell the kernel which windows come next, (clip index, start, ref) each, before reading any:
        where they are not in the page cache (a cache larger than memory) their disk reads then run
        side by side instead of one after the other. About a microsecond each where they are."""
        for clip_index, start, ref in samples:
            row = self.rows[clip_index]
            fd, base = self._fd(int(row["shard"])), int(row["offset"])
            os.posix_fadvise(fd, base + start * self.row_bytes, self.window * self.row_bytes, os.POSIX_FADV_WILLNEED)
            os.posix_fadvise(fd, base + ref * self.row_bytes, self.row_bytes, os.POSIX_FADV_WILLNEED)

    def read(self, clip_index: int, start: int, ref: int, window_out: np.ndarray, ref_out: np.ndarray) -> None:
        """Rows [start, start + 60) of clip `clip_index` into window_out, the first bytes of row `ref`
        (len(ref_out) bytes' worth: the motion latent) into ref_out. CacheError naming the clip and
        the shard when the shard ends early or the window lies outside the clip."""
        row = self.rows[clip_index]
        t = int(row["num_frames"])
        if start < 0 or start + self.window > t or not 0 <= ref < t:
            raise IndexError(f"window at {start} or reference {ref} is outside clip {self.cache.clip_id(clip_index)!r} "
                             f"({t} frames)")
        base = int(row["offset"])
        fd = self._fd(int(row["shard"]))
        for out, offset in ((window_out, base + start * self.row_bytes), (ref_out, base + ref * self.row_bytes)):
            if not pread_fully(fd, out, offset):
                raise CacheError(self.cache.describe_failure(clip_index, "the shard ends early"))


def pread_fully(fd: int, out, offset: int) -> bool:
    """Fill the buffer `out` (anything with the buffer protocol) from byte `offset` of `fd` with os.preadv;
    False when the file ends first (the bytes read so far are in `out`)."""
    view = memoryview(out).cast("B")
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            return False
        got += n
    return True
