"""Reading a cache back in tests: entries from the index, a clip's arrays from its shard record (through
the format's own record layout, as the loaders read them)."""
from __future__ import annotations

import numpy as np

from dali_float.cache import format as cf
from dali_float.cache.index import ClipIndex
from dali_float.cache.store import read_record
from dali_float.config import Preset, TINY_PRESET


def entries_of(layout: cf.CacheLayout) -> dict[str, cf.ClipEntry]:
    with ClipIndex(layout) as index:
        return {e.clip_id: e for e in index.entries()}


def features_of(layout: cf.CacheLayout, entry: cf.ClipEntry, preset: Preset = TINY_PRESET) -> cf.ClipFeatures:
    """A cached clip's arrays, read from its shard through the format's record layout."""
    record = read_record(layout, entry.shard, entry.offset, entry.nbytes)
    return cf.ClipFeatures.from_record(record, preset, entry.num_frames, np.array(entry.emotion, np.float32))


def frames_of(layout: cf.CacheLayout, entry: cf.ClipEntry, preset: Preset = TINY_PRESET) -> np.ndarray:
    """(T, F + A) float16 rows of a cached clip, as the loaders read them."""
    f = features_of(layout, entry, preset)
    return np.concatenate([f.motion_latents, f.audio_features], axis=1)
