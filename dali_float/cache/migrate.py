"""`preprocess.py migrate`: convert a format version 1 cache (one folder per clip) in place, keeping the
fingerprint, every clip's uid and every byte of its features.

Crash-safe and resumable: the records go through the ordinary writer (shards, a journal, groups), so
a kill loses at most the group in flight; until the last step cache.json still says version 1, so
nothing reads the half-converted folder as version 2, and a rerun continues where the killed one
stopped (clips already in the index are not copied again). The last steps: merge, export the
training view, write cache.json with version 2 (the commit point), delete clips/ and manifest.json.
"""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np

from dali_float.cache import format as cf
from dali_float.cache import store as cache_store, view as cache_view
from dali_float.cache.index import ClipIndex
from dali_float.config import Preset
from dali_float.errors import CacheError
from dali_float.progress import progress_bar

log = logging.getLogger(__name__)

# Version 1 file names and the clip_info record's fields (the layout being converted, defined only here).
_V1_FRAMES, _V1_COEFFICIENTS, _V1_IDENTITY, _V1_INFO = "frames.npy", "coefficients.npy", "identity.npy", "clip_info.npy"
_V1_INFO_EMOTION = 2


def _v1_header(layout: cf.CacheLayout) -> cf.CacheHeader:
    for path in (layout.info_path, layout.legacy_manifest_path):
        try:
            header = cf.CacheHeader.from_dict(json.loads(path.read_text()))
            header.format_version = cf.FORMAT_VERSION
            return header
        except (OSError, ValueError, TypeError):
            continue
    raise CacheError(f"{layout.root} has neither a readable cache.json nor manifest.json: nothing says what it "
                     f"was made of; rebuild it with `python preprocess.py --force_preprocess`")


def _v1_features(folder, preset: Preset, entry: cf.ClipEntry) -> cf.ClipFeatures:
    """The clip's arrays; ValueError when they are not what its entry says. Version 1 had no CRC and the
    record gets a fresh, valid one: held to the entry as version 1's own verify did (frames.npy's shape,
    clip_info's frames and uid), so another clip's or a damaged array is never converted or cut to fit.
    ClipFeatures.check (on writing) does the rest: the other shapes, finite values."""
    frames = np.load(folder / _V1_FRAMES, mmap_mode="r")
    info = np.load(folder / _V1_INFO)
    width = preset.motion_dim + preset.audio_feature_dim
    if frames.shape != (entry.num_frames, width):
        raise ValueError(f"{_V1_FRAMES} has shape {frames.shape}, the entry says ({entry.num_frames}, {width})")
    if info.ndim != 1 or len(info) < _V1_INFO_EMOTION or \
            (info[0], info[1]) != (entry.num_frames, entry.clip_uid):
        raise ValueError(f"{_V1_INFO} says (frames, uid) {np.ravel(info)[:_V1_INFO_EMOTION].tolist()}, the entry "
                         f"({entry.num_frames}, {entry.clip_uid})")
    return cf.ClipFeatures(motion_latents=frames[:, cf.motion_columns(preset)],
                           audio_features=frames[:, cf.audio_columns(preset)],
                           motion_coefficients=np.load(folder / _V1_COEFFICIENTS),
                           identity=np.load(folder / _V1_IDENTITY),
                           emotion=info[_V1_INFO_EMOTION:])


def migrate(layout: cf.CacheLayout, preset: Preset, progress: bool = False) -> dict[str, int]:
    """Convert `layout` from version 1 to this version; {converted, already, unreadable}. A folder that is
    already of this version only loses what a killed migration left of version 1."""
    version = layout.stored_version()
    if version == cf.FORMAT_VERSION:
        remove_v1(layout)
        log.info("%s is already in format version %d", layout.root, cf.FORMAT_VERSION)
        return {"converted": 0, "already": 0, "unreadable": 0}
    if version != cf.LEGACY_FORMAT_VERSION:
        layout.check_version()  # the error for a version this code does not know
    header = _v1_header(layout)
    for d in (layout.shards_dir, layout.journals_dir, layout.training_dir):
        d.mkdir(parents=True, exist_ok=True)
    counts = {"converted": 0, "already": 0, "unreadable": 0}
    with ClipIndex(layout) as index:
        cache_store.recover(layout, index)  # what a killed migration left
        done = index.light_rows().keys()
        entries = sorted(layout.legacy_clips_dir.glob("*/entry.json")) if layout.legacy_clips_dir.is_dir() else []
        with cache_store.ShardWriter(layout, preset, cache_store.writer_name("migrate")) as writer:
            for path in progress_bar(entries, desc="migrating", unit="clip", disable=not progress, leave=False):
                try:
                    entry = cf.ClipEntry.from_dict(json.loads(path.read_text()))
                except (OSError, ValueError, TypeError) as err:
                    log.warning("%s is unreadable (%s): left out; the next run processes its clip", path, err)
                    counts["unreadable"] += 1
                    continue
                if entry.clip_id in done:
                    counts["already"] += 1
                    continue
                if entry.status != cf.STATUS_CACHED:
                    writer.write(entry)
                else:
                    try:
                        features = _v1_features(path.parent, preset, entry)
                        writer.write(entry, features)
                    except (OSError, ValueError) as err:
                        log.warning("%s: its arrays are unreadable (%s): left out; the next run processes it",
                                    entry.clip_id, err)
                        counts["unreadable"] += 1
                        continue
                counts["converted"] += 1
        index.merge_journals()
        cache_view.export(layout, index, preset, header.fingerprint, force=True)
    layout.write_header(header)  # the commit point: from here on the folder is version 2
    remove_v1(layout)
    log.info("migrated %s: %d clip(s) converted, %d already converted, %d unreadable (left to the next run)",
             layout.root, counts["converted"], counts["already"], counts["unreadable"])
    return counts


def remove_v1(layout: cf.CacheLayout, header_too: bool = False) -> None:
    """Delete what format version 1 left in the folder: clips/, manifest.json (and, with `header_too`,
    its cache.json: for --force_preprocess, which rebuilds the folder)."""
    if layout.legacy_clips_dir.is_dir():
        shutil.rmtree(layout.legacy_clips_dir)
    if layout.legacy_manifest_path.exists():  # only then: no write at all where there is nothing to remove
        layout.legacy_manifest_path.unlink()
    if header_too and layout.stored_version() == cf.LEGACY_FORMAT_VERSION:
        layout.info_path.unlink(missing_ok=True)
