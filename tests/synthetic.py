"""A feature cache written through the real cache format with random features (no models needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dali_float import cache_format as cf
from dali_float.config import Preset

SYNTHETIC_MODELS = {"motion": "synthetic", "audio": "synthetic", "emotion": "synthetic"}


def write_synthetic_cache(cache_dir: Path, preset: Preset, lengths: Sequence[int], seed: int = 0,
                          prefix: str = "speaker/clip") -> str:
    """Write one cached clip per length; returns the cache's fingerprint."""
    fp = cf.fingerprint(preset, SYNTHETIC_MODELS, "center")
    layout = cf.CacheLayout(cf.cache_root(cache_dir, preset, fp))
    manifest = cf.Manifest(fingerprint=fp, preset_name=preset.name, preset=preset.to_dict(),
                           models=dict(SYNTHETIC_MODELS))
    layout.create(manifest)
    rng = np.random.default_rng(seed)
    for uid, t in enumerate(lengths):
        feats = cf.ClipFeatures(
            motion_latents=rng.standard_normal((t, preset.motion_dim), dtype=np.float32),
            audio_features=rng.standard_normal((t, preset.audio_feature_dim), dtype=np.float32),
            motion_coefficients=rng.standard_normal((t, preset.motion.num_coefficients), dtype=np.float32),
            identity=rng.standard_normal(preset.motion_dim, dtype=np.float32),
            emotion=rng.dirichlet(np.ones(preset.emotion_dim)).astype(np.float32),
        )
        clip_id = f"{prefix}{uid:03d}.mp4"
        entry = cf.ClipEntry(clip_id=clip_id, key=cf.clip_key(clip_id), source_path=f"/synthetic/{clip_id}",
                             size_bytes=0, mtime_ns=0, content_hash="", status=cf.STATUS_CACHED,
                             clip_uid=uid, fps=preset.timing.fps, decoder="synthetic")
        manifest.clips[clip_id] = layout.write_clip(entry, feats, preset)
    layout.save_manifest(manifest)
    return fp
