"""A cache in the per-clip layout of format version 1 (what dali-float wrote before the shards), for the
migration tests: clips/<key>/{frames,clip_info,coefficients,identity}.npy, entry.json, manifest.json."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from dali_float.cache import format as cf
from dali_float.config import Preset
from synthetic import SYNTHETIC_MODELS, random_features, synthetic_entry


def write_v1_cache(cache_dir: Path, preset: Preset, lengths: list[int], seed: int = 0,
                   models: dict[str, str] = SYNTHETIC_MODELS) -> tuple[str, dict]:
    """One cached clip per length and one failed entry; returns (fingerprint, {clip id: ClipFeatures})."""
    fp = cf.fingerprint(preset, models, "center")  # version 1 fingerprints are the same
    root = cf.cache_root(cache_dir, preset, fp)
    header = {"fingerprint": fp, "preset_name": preset.name, "preset": preset.to_dict(),
              "models": dict(models), "data_root": "", "framing": "center", "format_version": 1}
    rng = np.random.default_rng(seed)
    clips, features = {}, {}
    for uid, t in enumerate([*lengths, 0]):
        clip_id = f"speaker/clip{uid:03d}.mp4"
        key = f"clip{uid:03d}-{hashlib.sha1(clip_id.encode()).hexdigest()[:10]}"
        folder = root / "clips" / key
        folder.mkdir(parents=True)
        entry = synthetic_entry(clip_id, uid, preset).to_dict()
        entry.update(key=key, num_frames=t, files={})
        if t == 0:
            entry.update(status=cf.STATUS_FAILED, reason="not a readable media file")
        else:
            f = features[clip_id] = random_features(preset, t, rng)
            frames = np.concatenate([f.motion_latents, f.audio_features], axis=1).astype(np.float16)
            info = np.concatenate([[t, uid], f.emotion]).astype(np.float32)
            for name, array in (("frames", frames), ("clip_info", info),
                                ("coefficients", f.motion_coefficients), ("identity", f.identity)):
                np.save(folder / f"{name}.npy", array)
                entry["files"][name] = f"{name}.npy"
        for k in ("shard", "offset", "nbytes", "checksum", "emotion"):  # fields version 1 did not have
            entry.pop(k)
        (folder / "entry.json").write_text(json.dumps(entry))
        clips[clip_id] = entry
    (root / "cache.json").write_text(json.dumps(header))
    (root / "manifest.json").write_text(json.dumps({**header, "updated_at": 0.0, "clips": clips}))
    return fp, features
