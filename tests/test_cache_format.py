"""The cache format (dali_float/cache_format.py) on its own: a tiny cache written through it and read back with
NumPy, against README's description of the layout ("The cache"), and every problem `verify` names."""
from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest

from dali_float import cache_format as cf
from dali_float.atomic import TMP_MARKER
from dali_float.config import FLOAT_PRESET, TINY_PRESET
from dali_float.errors import CacheError

P = TINY_PRESET
F, A, M, E = P.motion_dim, P.audio_feature_dim, P.motion.num_coefficients, P.emotion_dim
MODELS = {"motion": "random-init:0", "audio": "random-init:0", "emotion": "random-init:0"}


def features(t: int, seed: int = 0) -> cf.ClipFeatures:
    g = np.random.default_rng(seed)
    return cf.ClipFeatures(motion_latents=g.standard_normal((t, F)).astype(np.float32),
                           audio_features=g.standard_normal((t, A)).astype(np.float32),
                           motion_coefficients=g.standard_normal((t, M)).astype(np.float32),
                           identity=g.standard_normal(F).astype(np.float32),
                           emotion=g.dirichlet(np.ones(E)).astype(np.float32))


def entry(clip_id: str, uid: int) -> cf.ClipEntry:
    return cf.ClipEntry(clip_id=clip_id, key=cf.clip_key(clip_id), source_path=f"/data/{clip_id}", size_bytes=1,
                        mtime_ns=2, content_hash="h", status=cf.STATUS_CACHED, clip_uid=uid, fps=25.0)


def new_cache(tmp_path, lengths=(80, 130)) -> tuple[cf.CacheLayout, cf.Manifest, dict]:
    fp = cf.fingerprint(P, MODELS)
    layout = cf.CacheLayout(cf.cache_root(tmp_path, P, fp))
    manifest = cf.Manifest(fingerprint=fp, preset_name=P.name, preset=P.to_dict(), models=dict(MODELS),
                           data_root="/data")
    layout.create(manifest)
    written = {}
    for uid, t in enumerate(lengths):
        clip_id = f"actor/clip{uid}.mp4"
        written[clip_id] = features(t, seed=uid)
        manifest.clips[clip_id] = layout.write_clip(entry(clip_id, uid), written[clip_id], P)
    layout.save_manifest(manifest)
    return layout, manifest, written


def test_the_layout_readme_describes(tmp_path):
    """<cache_dir>/<preset>-<fingerprint[:12]>/ with cache.json, manifest.json and per clip frames.npy
    (T, F + A) float16 motion | audio, clip_info.npy (2 + 7,) float32 [frames, uid, emotion], coefficients.npy
    (T, 20) float32, identity.npy (F,) float32, entry.json; read here with NumPy alone."""
    layout, manifest, written = new_cache(tmp_path)
    assert layout.root == tmp_path / f"tiny-{manifest.fingerprint[:12]}"
    assert {p.name for p in layout.root.iterdir()} == {"cache.json", "manifest.json", "clips"}
    for uid, (clip_id, feats) in enumerate(written.items()):
        folder = layout.root / "clips" / cf.clip_key(clip_id)
        assert {p.name for p in folder.iterdir()} == {"frames.npy", "clip_info.npy", "coefficients.npy",
                                                       "identity.npy", "entry.json"}
        t = feats.num_frames
        frames = np.load(folder / "frames.npy")
        assert frames.dtype == np.float16 and frames.shape == (t, F + A)
        assert np.array_equal(frames[:, :F], feats.motion_latents.astype(np.float16))
        assert np.array_equal(frames[:, F:], feats.audio_features.astype(np.float16))
        info = np.load(folder / "clip_info.npy")
        assert info.dtype == np.float32 and info.shape == (2 + 7,)
        assert (info[0], info[1]) == (t, uid) and np.array_equal(info[2:], feats.emotion)
        coefficients, identity = np.load(folder / "coefficients.npy"), np.load(folder / "identity.npy")
        assert coefficients.dtype == np.float32 and np.array_equal(coefficients, feats.motion_coefficients)
        assert identity.dtype == np.float32 and np.array_equal(identity, feats.identity)
        saved = json.loads((folder / "entry.json").read_text())
        assert saved["status"] == "cached" and saved["num_frames"] == t and saved["clip_uid"] == uid
        assert saved["files"] == {"frames": "frames.npy", "clip_info": "clip_info.npy",
                                  "coefficients": "coefficients.npy", "identity": "identity.npy"}
    assert cf.verify(layout, P) == []
    info = json.loads(layout.info_path.read_text())
    assert info["fingerprint"] == manifest.fingerprint and info["models"] == MODELS and "clips" not in info
    assert info["format_version"] == cf.FORMAT_VERSION and "updated_at" not in info


def test_stream_shapes_for_both_presets():
    for preset, f, a in ((P, 64, 64), (FLOAT_PRESET, 512, 9216)):
        assert cf.FRAMES.shape(preset, 75) == (75, f + a)
        assert cf.CLIP_INFO.shape(preset, 75) == (9,)
        assert cf.COEFFICIENTS.shape(preset, 75) == (75, 20)
        assert cf.IDENTITY.shape(preset, 75) == (f,)
        assert cf.motion_columns(preset) == slice(0, f) and cf.audio_columns(preset) == slice(f, f + a)
    with pytest.raises(KeyError):
        cf.Stream("other", np.dtype(np.float32), "").shape(P, 1)


def test_read_clip_gives_back_what_was_written(tmp_path):
    layout, manifest, written = new_cache(tmp_path)
    for clip_id, feats in written.items():
        back = layout.read_clip(manifest.clips[clip_id], P)
        assert isinstance(back.motion_latents.base, np.memmap) or isinstance(back.motion_latents, np.memmap)
        assert np.array_equal(back.motion_latents, feats.motion_latents.astype(np.float16))
        assert np.array_equal(back.audio_features, feats.audio_features.astype(np.float16))
        assert np.array_equal(back.motion_coefficients, feats.motion_coefficients)
        assert np.array_equal(back.identity, feats.identity) and np.array_equal(back.emotion, feats.emotion)
        assert back.num_frames == feats.num_frames
        loaded = layout.read_clip(manifest.clips[clip_id], P, mmap=False)
        assert not isinstance(loaded.motion_latents.base, np.memmap) and not isinstance(loaded.motion_latents, np.memmap)


def test_features_are_checked_before_anything_is_written(tmp_path):
    layout, manifest, _ = new_cache(tmp_path)
    good = features(70)
    for name, bad, words in (("motion_latents", np.zeros((70, F + 1)), "motion_latents has shape (70, 65)"),
                             ("audio_features", np.zeros((69, A)), "audio_features has shape (69, 64)"),
                             ("motion_coefficients", np.zeros((70, M - 1)), "motion_coefficients has shape"),
                             ("identity", np.zeros(F - 1), "identity has shape"), ("emotion", np.zeros(E + 1), "emotion"),
                             ("audio_features", np.full((70, A), np.nan), "audio_features holds non-finite"),
                             ("identity", np.full(F, np.inf), "identity holds non-finite"),
                             ("motion_latents", np.full((70, F), 65_520.0), "motion_latents exceeds the float16 range"),
                             ("audio_features", np.full((70, A), -70_000.0), "audio_features exceeds the float16")):
        feats = cf.ClipFeatures(**{**good.__dict__, name: bad.astype(np.float32)})
        with pytest.raises(ValueError, match=re.escape(words)):
            layout.write_clip(entry("bad.mp4", 9), feats, P)
        assert not layout.clip_dir(cf.clip_key("bad.mp4")).exists()
    edge = cf.ClipFeatures(**{**good.__dict__, "motion_latents": np.full((70, F), 65_504.0, np.float32)})
    edge.check(P)  # float16's largest finite value is fine
    for uid in (-1, 2**24):
        with pytest.raises(ValueError, match="clip_uid"):
            layout.write_clip(entry("x.mp4", uid), good, P)
    layout.write_clip(entry("x.mp4", 2**24 - 1), good, P)  # float32 holds it exactly
    assert int(np.load(layout.stream_path(cf.clip_key("x.mp4"), cf.CLIP_INFO))[1]) == 2**24 - 1


def test_replacing_a_clip_uncommits_it_first_and_failures_keep_no_arrays(tmp_path, monkeypatch):
    layout, manifest, _ = new_cache(tmp_path, lengths=(80,))
    e = manifest.entries()[0]

    def crash(path, array):
        raise OSError("disk full")

    monkeypatch.setattr(cf, "write_array_atomic", crash)
    with pytest.raises(OSError):
        layout.write_clip(e, features(90), P)
    monkeypatch.undo()
    assert not layout.entry_path(e.key).exists()  # the old entry no longer vouches for the half-written arrays
    assert e.clip_id not in layout.read_entries()
    failed = cf.ClipEntry(**{**e.to_dict(), "status": cf.STATUS_FAILED, "reason": "broken"})
    layout.write_uncached(failed)
    assert sorted(p.name for p in layout.clip_dir(e.key).iterdir()) == ["entry.json"]
    assert layout.read_entries()[e.clip_id].status == cf.STATUS_FAILED and failed.files == {}
    layout.remove_clip(e.key)
    assert not layout.clip_dir(e.key).exists() and layout.read_entries() == {}
    layout.remove_clip(e.key)  # nothing left: nothing to do


def test_unreadable_entries_are_skipped_with_a_warning(tmp_path, caplog):
    layout, manifest, _ = new_cache(tmp_path)
    broken = next(iter(manifest.clips.values()))
    layout.entry_path(broken.key).write_text("{ half")
    with caplog.at_level(logging.WARNING):
        entries = layout.read_entries()
    assert broken.clip_id not in entries and len(entries) == 1
    assert "ignoring unreadable entry" in caplog.text
    assert cf.CacheLayout(tmp_path / "nothing").read_entries() == {}


def test_verify_names_every_problem(tmp_path):
    layout, manifest, _ = new_cache(tmp_path, lengths=(80, 130, 70, 90, 100, 110, 65))
    e = manifest.entries()
    (layout.root / f"manifest.json{TMP_MARKER}123").write_text("")
    layout.entry_path(e[0].key).unlink()
    extra = layout.write_clip(entry("extra.mp4", 50), features(66), P)
    layout.stream_path(e[1].key, cf.IDENTITY).unlink()
    layout.stream_path(e[2].key, cf.COEFFICIENTS).write_bytes(b"\x93NUMPY junk")
    np.save(layout.stream_path(e[3].key, cf.COEFFICIENTS), np.zeros((90, M), np.float64))
    frames = np.load(layout.stream_path(e[4].key, cf.FRAMES))
    frames[3, 5] = np.inf
    np.save(layout.stream_path(e[4].key, cf.FRAMES), frames)
    info = np.load(layout.stream_path(e[5].key, cf.CLIP_INFO))
    info[0], info[1] = 111, 77
    np.save(layout.stream_path(e[5].key, cf.CLIP_INFO), info)
    e[6].num_frames = 59
    manifest.clips[e[6].clip_id] = e[6]
    layout.save_manifest(manifest)
    problems = {(p["clip"], p["problem"]) for p in cf.verify(layout, P)}
    expected = {
        ("", f"temporary file left behind: {layout.root / f'manifest.json{TMP_MARKER}123'}"),
        (e[0].clip_id, "in manifest.json but its entry.json is missing"),
        (extra.clip_id, "entry.json on disk but not in manifest.json"),
        (e[1].clip_id, "identity.npy is missing"),
        (e[3].clip_id, f"coefficients.npy: float64[90, {M}], expected float32[90, {M}]"),
        (e[4].clip_id, "frames.npy holds non-finite values"),
        (e[5].clip_id, "clip_info says 111 frames, the entry 110"),
        (e[5].clip_id, "clip_info says uid 77, the entry 5"),
        (e[6].clip_id, "59 frames, fewer than one window (60)"),
    }
    assert expected <= problems
    unreadable = problems - expected
    assert [c for c, _ in unreadable].count(e[2].clip_id) == 1 and "coefficients.npy is unreadable" in \
        next(p for c, p in unreadable if c == e[2].clip_id)
    # e[6]'s arrays hold 65 rows, its entry now says 59: its streams disagree with it too
    assert all(c in (e[2].clip_id, e[6].clip_id) for c, _ in unreadable), unreadable


def test_the_manifest_round_trips_and_refuses_what_it_cannot_read(tmp_path):
    layout, manifest, _ = new_cache(tmp_path)
    loaded = layout.load_manifest()
    assert loaded.to_dict() == json.loads(json.dumps(manifest.to_dict())) and loaded.updated_at > 0
    assert [x.clip_id for x in loaded.entries(cf.STATUS_CACHED)] == sorted(manifest.clips)
    assert loaded.entries(cf.STATUS_FAILED) == [] and loaded.next_uid() == 2
    assert cf.Manifest(fingerprint="f", preset_name="tiny", preset={}, models={}).next_uid() == 0
    data = json.loads(layout.manifest_path.read_text())
    data["written_by_a_newer_version"] = 1
    data["clips"]["actor/clip0.mp4"]["new_field"] = "ignored"
    layout.manifest_path.write_text(json.dumps(data))
    assert layout.load_manifest().clips["actor/clip0.mp4"].clip_uid == 0
    layout.manifest_path.write_text("{ not json")
    with pytest.raises(CacheError, match="unreadable.*--force_preprocess"):
        layout.load_manifest()
    data["format_version"] = cf.FORMAT_VERSION + 1
    layout.manifest_path.write_text(json.dumps(data))
    with pytest.raises(CacheError, match=f"format version {cf.FORMAT_VERSION + 1}, this dali-float reads version "
                                         f"{cf.FORMAT_VERSION}"):
        layout.load_manifest()
    layout.manifest_path.unlink()
    with pytest.raises(CacheError, match="no manifest.json"):
        layout.load_manifest()


def test_fingerprints_and_folder_names(tmp_path):
    fp = cf.fingerprint(P, MODELS)
    assert len(fp) == 64 and fp == cf.fingerprint(P, dict(reversed(list(MODELS.items()))))  # order-free, stable
    others = {cf.fingerprint(FLOAT_PRESET, MODELS), cf.fingerprint(P, {**MODELS, "motion": "sha256:ab"}),
              cf.fingerprint(P, {**MODELS, "emotion": "none"})}
    assert fp not in others and len(others) == 3
    assert cf.cache_root(tmp_path, P, fp) == tmp_path / f"tiny-{fp[:12]}"
    # A cache written before the format version changed gets another fingerprint: another folder.
    import dali_float.cache_format as module
    original = module.FORMAT_VERSION
    try:
        module.FORMAT_VERSION = original + 1
        assert cf.fingerprint(P, MODELS) != fp
    finally:
        module.FORMAT_VERSION = original


def test_clip_keys_are_safe_unique_and_stable():
    ids = ["Actor_01/01-01-01.mp4", "Actor_01/01 01 01.mp4", "Actor_01/01_01_01.mp4", "ü/ß.WEBM", "../../etc/passwd.mp4",
           "a" * 300 + ".mkv", ".hidden.mp4", "noext"]
    keys = [cf.clip_key(i) for i in ids]
    assert len(set(keys)) == len(ids) and keys == [cf.clip_key(i) for i in ids]
    for key in keys:
        stem, digest = key.rsplit("-", 1)
        assert len(digest) == 10 and all(c.isalnum() or c in "._-" for c in key)
        assert 1 <= len(stem) <= 48 and not stem.startswith((".", "_")) and not stem.endswith((".", "_"))
    assert keys[0].startswith("Actor_01_01-01-01-") and cf.clip_key("ü/ß.WEBM").startswith("clip-")
