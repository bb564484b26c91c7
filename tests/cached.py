"""Reading a cache back in tests: entries from the index, a clip's arrays from its shard record (through
the format's own record layout, as the loaders read them), a window's rows read with NumPy."""
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


def expected_rows(cache, clip_id: str, start: int, ref: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the format says a window of a TrainingCache is, read independently: the clip's frames rows from
    its shard with NumPy. (rows [start, start + 60) (60, F + A) float16, the reference row's motion (F,),
    the emotion (E,) float32)."""
    i = cache.index_of(clip_id)
    row = cache.view.rows[i]
    t = int(row["num_frames"])
    width = cache.preset.motion_dim + cache.preset.audio_feature_dim
    frames = np.fromfile(cache.view.shards[row["shard"]], dtype=np.float16, count=t * width,
                         offset=int(row["offset"])).reshape(t, width)
    f = cache.preset.motion_dim
    return frames[start:start + cache.preset.timing.window_frames], frames[ref, :f], np.array(row["emotion"])
