"""The demo corpus: decodable, deterministic, in sync, and its mouths really follow the sound."""
from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch

from dali_float.config import TimingConfig
from dali_float.demo import (
    MOUTH_BOX_REL, demo_clip_specs, ensure_demo_corpus, generate_demo_corpus, synth_talking_head,
)
from dali_float.media import (
    DALI_CPU, PYAV, FrameDecoder, decode_frames, discover_videos, frame_indices_at_fps, load_audio,
    prepare_clip_audio, probe_video,
)
from dali_float.paths import DEMO_VERSION, demo_corpus_dir, home

TIMING = TimingConfig()
S = 64
RAVDESS_NAME = re.compile(r"^Actor_(\d\d)/01-01-(0[1-8])-01-01-01-(\d\d)\.(mp4|webm)$")


@pytest.fixture(scope="module")
def corpus():
    root = ensure_demo_corpus()
    return root, discover_videos(root)


@pytest.fixture(scope="module")
def decoded(corpus):
    """clip id -> (VideoInfo, 25 fps indices, frames (T, 3, S, S), decoder name) for every clip."""
    decoder = FrameDecoder(S, chunk_frames=32, batch_chunks=4)
    out = {}
    for clip_id, path in corpus[1]:
        info = probe_video(path)
        idx = frame_indices_at_fps(info.frame_times_s, info.duration_s, TIMING.fps)
        frames = decode_frames(info, idx, decoder)
        out[clip_id] = (info, idx, frames, decoder.last_decoder)
    return out


def test_corpus_location_and_reuse(corpus, caplog):
    root, clips = corpus
    assert root == demo_corpus_dir() == home() / "demo" / f"v{DEMO_VERSION}"
    before = {p: p.stat().st_mtime_ns for _, p in clips}
    with caplog.at_level("INFO", logger="dali_float"):
        assert ensure_demo_corpus() == root
    assert "writing" not in caplog.text  # reused, not regenerated
    assert {p: p.stat().st_mtime_ns for _, p in clips} == before
    assert not [p for p in root.parent.iterdir() if ".tmp-" in p.name]  # no half-written leftovers


def test_corpus_layout(corpus):
    _, clips = corpus
    specs = demo_clip_specs()
    assert len(clips) == len(specs) == 12
    assert sorted(clip_id for clip_id, _ in clips) == sorted(s.relative_path for s in specs)
    emotions = set()
    for clip_id, _ in clips:
        match = RAVDESS_NAME.match(clip_id)
        assert match, clip_id
        assert match.group(1) == match.group(3)  # folder actor == file actor
        emotions.add(match.group(2))
    assert emotions == {f"{e:02d}" for e in range(1, 9)}
    assert 60 <= sum(s.seconds for s in specs) <= 80
    assert any(s.width != s.height for s in specs) and any(s.height > s.width for s in specs)
    assert {16_000, 24_000, 44_100, 48_000} <= {s.audio_rate for s in specs}


def test_every_clip_probes_and_decodes(decoded):
    codecs, decoders = set(), set()
    for clip_id, (info, idx, frames, kind) in decoded.items():
        assert len(idx) >= 60, clip_id
        assert frames.shape == (len(idx), 3, S, S)
        assert frames.min() >= -1 and frames.max() <= 1
        assert frames.std() > 0.1  # a picture, not a flat frame
        assert info.audio_source == info.path
        codecs.add(info.codec)
        decoders.add(kind)
    assert codecs == {"h264", "vp9"}
    assert decoders == {PYAV, DALI_CPU}


def test_audio_length_matches_video_length(decoded):
    for clip_id, (info, _, _, _) in decoded.items():
        audio = load_audio(info.audio_source, TIMING.sample_rate_hz, start_s=info.start_time_s)
        video_samples = info.duration_s * TIMING.sample_rate_hz
        assert abs(len(audio) - video_samples) <= TIMING.audio_samples_per_frame, clip_id


def test_mouth_opening_follows_loudness(decoded):
    """Darkness of the mouth region in the decoded pixels correlates with the audio RMS per frame."""
    y0, y1, x0, x1 = (int(round(v * S)) for v in MOUTH_BOX_REL)
    correlations = []
    for clip_id, (info, idx, frames, _) in decoded.items():
        audio = prepare_clip_audio(info, len(idx), TIMING).view(len(idx), TIMING.audio_samples_per_frame)
        rms = audio.pow(2).mean(dim=1).sqrt().numpy()
        darkness = -frames[:, :, y0:y1, x0:x1].mean(dim=(1, 2, 3)).numpy()
        r = float(np.corrcoef(darkness, rms)[0, 1])
        shifted = float(np.corrcoef(darkness[5:], rms[:-5])[0, 1])  # 200 ms off: no longer related
        assert r > 0.7, (clip_id, r)
        assert shifted < r - 0.3, (clip_id, r, shifted)
        correlations.append(r)
    assert np.mean(correlations) > 0.8


def test_synth_talking_head_shapes_and_relation():
    frames, audio, mouth = synth_talking_head(50, (80, 64), fps=25, audio_rate=24_000, seed=3)
    assert frames.shape == (50, 80, 64, 3) and frames.dtype == np.uint8
    assert audio.shape == (48_000,) and audio.dtype == np.float32 and np.abs(audio).max() <= 1
    assert mouth.shape == (50,) and mouth.min() >= 0 and mouth.max() == pytest.approx(1)
    rms = np.sqrt((audio.reshape(50, -1) ** 2).mean(axis=1))
    assert np.corrcoef(mouth, rms)[0, 1] > 0.9
    again = synth_talking_head(50, (80, 64), fps=25, audio_rate=24_000, seed=3)
    assert np.array_equal(again[0], frames) and np.array_equal(again[1], audio)
    other = synth_talking_head(50, (80, 64), fps=25, audio_rate=24_000, seed=4)
    assert not np.array_equal(other[1], audio)


def test_generation_is_deterministic(tmp_path, corpus, decoded):
    """The same seed gives byte-identical files (same PyAV build), hence identical frames and samples."""
    root, clips = corpus
    again = generate_demo_corpus(tmp_path / "again", seed=0)
    assert [p.relative_to(tmp_path / "again").as_posix() for p in again] == [s.relative_path for s in demo_clip_specs()]
    for path in again:
        original = root / path.relative_to(tmp_path / "again")
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(original.read_bytes()).digest(), path
    # And decoding agrees, for one clip of each codec (the bytes already prove it for all).
    decoder = FrameDecoder(S)
    for suffix in (".mp4", ".webm"):
        path = next(p for p in again if p.suffix == suffix)
        clip_id = path.relative_to(tmp_path / "again").as_posix()
        info, idx, frames, _ = decoded[clip_id]
        info2 = probe_video(path)
        assert torch.equal(decode_frames(info2, idx, decoder), frames)
        assert torch.equal(prepare_clip_audio(info2, len(idx), TIMING), prepare_clip_audio(info, len(idx), TIMING))


def test_a_folder_written_once_appears_whole_or_not_at_all(tmp_path):
    """create_folder_once (the demo and faces corpora): the folder appears complete under its name, once;
    a racing writer's copy is dropped; a failed fill leaves nothing; a foreign folder is one UsageError."""
    from dali_float.atomic import create_folder_once
    from dali_float.errors import UsageError

    final, fills = tmp_path / "corpus" / "v1", []

    def write(folder, marker):
        folder.mkdir()
        (folder / "clip.bin").write_bytes(b"x" * 10)
        (folder / "done.json").write_text(marker)

    def fill(folder):
        fills.append(folder)
        assert not final.exists()  # filled aside, never under the final name
        write(folder, "{}")

    assert create_folder_once(final, "done.json", fill, "a corpus") == final
    assert sorted(p.name for p in final.iterdir()) == ["clip.bin", "done.json"]
    assert create_folder_once(final, "done.json", fill, "a corpus") == final and len(fills) == 1  # reused

    raced = tmp_path / "raced"

    def racing_fill(folder):  # another process renames its complete copy in while this one fills
        write(tmp_path / "other", '"theirs"')
        (tmp_path / "other").rename(raced)
        write(folder, '"mine"')

    assert create_folder_once(raced, "done.json", racing_fill, "a corpus") == raced
    assert (raced / "done.json").read_text() == '"theirs"'

    def failing_fill(folder):
        folder.mkdir()
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        create_folder_once(tmp_path / "failed", "done.json", failing_fill, "a corpus")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "raced"]  # no leftovers, no final folder

    foreign = tmp_path / "foreign"
    (foreign / "mine").mkdir(parents=True)
    with pytest.raises(UsageError, match="foreign exists but is not complete .*remove it and run again"):
        create_folder_once(foreign, "done.json", lambda folder: write(folder, "{}"), "a corpus")
    assert (foreign / "mine").is_dir()  # nothing of the user's removed
