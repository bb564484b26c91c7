"""Opening a feature cache for training: checks first, so a user never sees a DALI stack trace.

Both cached loaders (`torch`, `dali`) read through `TrainingCache`: the clips usable for training,
their files, and the mapping from the clip uid stored in each clip_info.npy back to its clip id.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dali_float import cache_format as cf
from dali_float.config import Preset
from dali_float.errors import CacheError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedClip:
    clip_id: str
    clip_uid: int
    num_frames: int
    frames_path: Path
    info_path: Path


class TrainingCache:
    """The cached clips of one fingerprinted cache folder that hold at least one window."""

    def __init__(self, layout: cf.CacheLayout, manifest: cf.Manifest, preset: Preset, clips: list[CachedClip]):
        self.layout, self.manifest, self.preset, self.clips = layout, manifest, preset, clips

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def root(self) -> Path:
        return self.layout.root

    def clip_id_of_uid(self) -> dict[int, str]:
        return {c.clip_uid: c.clip_id for c in self.clips}

    def frames_files_by_uid(self) -> list[str]:
        """Paths indexed by clip uid ("" where no usable clip has that uid)."""
        files = [""] * (1 + max(c.clip_uid for c in self.clips))
        for c in self.clips:
            files[c.clip_uid] = str(c.frames_path)
        return files

    def frames_bytes(self) -> int:
        return sum(c.frames_path.stat().st_size for c in self.clips)

    @classmethod
    def open(cls, cache_dir: Path, preset: Preset, fingerprint: str,
             preprocess_command: str | None = None) -> "TrainingCache":
        """Open the cache for `fingerprint`, or raise a CacheError saying what to run.

        Missing, stale (only caches of other weights/settings exist), unfinished (no manifest),
        half-written (an entry whose files are gone), another format version, or no clip long enough.
        """
        cache_dir = Path(cache_dir)
        fix = preprocess_command or f"python preprocess.py --preset {preset.name} --cache_dir {cache_dir}"
        root = cf.cache_root(cache_dir, preset, fingerprint)
        if not root.exists():
            others = sorted(p.name for p in cache_dir.glob(f"{preset.name}-*") if (p / "cache.json").exists()) \
                if cache_dir.exists() else []
            if others:
                raise CacheError(f"the feature cache in {cache_dir} is stale: it was built with other weights or "
                                 f"settings ({', '.join(others)}; current: {root.name}). Run `{fix}`")
            raise CacheError(f"no feature cache for preset {preset.name!r} in {cache_dir}. Run `{fix}`")
        layout = cf.CacheLayout(root)
        if not layout.manifest_path.exists():
            raise CacheError(f"the feature cache {root} is half-written (preprocessing did not finish). Run `{fix}`")
        manifest = layout.load_manifest()
        if manifest.fingerprint != fingerprint:
            raise CacheError(f"{layout.manifest_path} belongs to fingerprint {manifest.fingerprint}, "
                             f"expected {fingerprint}. Run `{fix} --force_preprocess`")
        window = preset.timing.window_frames
        clips, short = [], []
        for entry in manifest.entries(cf.STATUS_CACHED):
            if entry.num_frames < window:
                short.append(entry.clip_id)
                continue
            frames = layout.stream_path(entry.key, cf.FRAMES)
            info = layout.stream_path(entry.key, cf.CLIP_INFO)
            if not (frames.exists() and info.exists() and layout.entry_path(entry.key).exists()):
                raise CacheError(f"the feature cache {root} is half-written: files of {entry.clip_id!r} are "
                                 f"missing. Run `python preprocess.py verify` then `{fix}`")
            clips.append(CachedClip(entry.clip_id, entry.clip_uid, entry.num_frames, frames, info))
        if short:
            log.warning("skipping %d clip(s) shorter than one %d-frame window: %s", len(short), window,
                        ", ".join(short[:5]) + (" ..." if len(short) > 5 else ""))
        if not clips:
            failed = len(manifest.entries(cf.STATUS_FAILED)) + len(manifest.entries(cf.STATUS_SKIPPED))
            raise CacheError(f"the feature cache {root} holds no clip of at least {window} frames "
                             f"({failed} failed or skipped): see `python preprocess.py status`")
        return cls(layout, manifest, preset, clips)


# --- reading windows the way the format lays them out (used by the torch loader and the checks) ----

@dataclass(frozen=True)
class FramesFile:
    """Where the rows of one frames.npy start and how wide they are (parsed once per clip)."""

    path: str
    data_offset: int
    num_rows: int
    row_bytes: int

    @classmethod
    def parse(cls, path: str | Path) -> "FramesFile":
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[version]
            shape, fortran, dtype = read_header(f)
            if fortran or dtype != cf.FRAMES.dtype or len(shape) != 2:
                raise CacheError(f"{path} is not a {cf.FRAMES.dtype} 2-D C-ordered array: "
                                 f"run `python preprocess.py verify`")
            return cls(str(path), f.tell(), shape[0], shape[1] * dtype.itemsize)

