"""A feature cache written through the real cache format with random features (no models needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dali_float.cache import format as cf
from dali_float.cache import view as cache_view
from dali_float.cache.index import ClipIndex
from dali_float.cache.store import ShardWriter, writer_name
from dali_float.config import Preset

SYNTHETIC_MODELS = {"motion": "synthetic", "audio": "synthetic", "emotion": "synthetic"}


def random_features(preset: Preset, t: int, rng: np.random.Generator) -> cf.ClipFeatures:
    return cf.ClipFeatures(
        motion_latents=rng.standard_normal((t, preset.motion_dim), dtype=np.float32),
        audio_features=rng.standard_normal((t, preset.audio_feature_dim), dtype=np.float32),
        motion_coefficients=rng.standard_normal((t, preset.motion.num_coefficients), dtype=np.float32),
        identity=rng.standard_normal(preset.motion_dim, dtype=np.float32),
        emotion=rng.dirichlet(np.ones(preset.emotion_dim)).astype(np.float32),
    )


def synthetic_entry(clip_id: str, uid: int, preset: Preset) -> cf.ClipEntry:
    return cf.ClipEntry(clip_id=clip_id, source_path=f"/synthetic/{clip_id}", size_bytes=0, mtime_ns=0,
                        content_hash="", status=cf.STATUS_CACHED, clip_uid=uid, fps=preset.timing.fps,
                        decoder="synthetic")


def write_synthetic_cache(cache_dir: Path, preset: Preset, lengths: Sequence[int], seed: int = 0,
                          prefix: str = "speaker/clip", shard_bytes: int = cf.SHARD_BYTES) -> str:
    """Write one cached clip per length (clip ids `<prefix>000.mp4`, ...) through the real writer, merge
    and export like a preprocessing run; returns the cache's fingerprint."""
    fp = cf.fingerprint(preset, SYNTHETIC_MODELS, "center")
    layout = cf.CacheLayout(cf.cache_root(cache_dir, preset, fp))
    layout.create(cf.CacheHeader(fingerprint=fp, preset_name=preset.name, preset=preset.to_dict(),
                                 models=dict(SYNTHETIC_MODELS), framing="center"))
    rng = np.random.default_rng(seed)
    with ShardWriter(layout, preset, writer_name("synthetic"), shard_bytes=shard_bytes) as writer:
        for uid, t in enumerate(lengths):
            writer.write(synthetic_entry(f"{prefix}{uid:03d}.mp4", uid, preset), random_features(preset, t, rng))
    with ClipIndex(layout) as index:
        index.merge_journals()
        cache_view.export(layout, index, preset, fp)
    return fp
