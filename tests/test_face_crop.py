"""`--crop face` on raw video: real faces (tests/faces.py) pasted at known places into 720p/1080p frames,
encoded as H.264 by FFmpeg (PyAV's libx264), preprocessed; the crop is FLOAT's square around the face,
one per clip; clips that cannot be framed are skipped with their reason; the naive loader frames the
same way; a moving head still moves inside the crop.

Tiny preset (64 x 64 input) with random-init encoders on the CPU. The known face boxes were read off the
photographs by eye: they are a rough, independent reference (the calibration against human-annotated
boxes is in docs/FACE_FRAMING.md), hence the IoU tolerance.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_float.cache import format as cf
from dali_float import demo, media
from dali_float.config import TINY_PRESET
from dali_float.face import float_crop_box
from dali_float.face.blazeface import box_iou
from dali_float.loaders import LoaderOptions, TrainingCache, open_loader
from dali_float.models import ModelSources, build_encoders, encode_motion
from dali_float.preprocess import PreprocessOptions, cache_fingerprint, run_preprocessing
from dali_float.preprocess.manage import format_clip
from cached import entries_of, features_of
from faces import ASTRONAUT, ASTRONAUT_FACE, HOPPER, HOPPER_FACE, background, paste, rgb

P = TINY_PRESET
REPO = Path(__file__).resolve().parents[1]
FRAMES = 64  # one 60-frame window and a little more


def iou(a, b) -> float:
    return float(box_iou(np.asarray(a, np.float32), np.asarray([b], np.float32))[0])


def assert_floats_square(crop_box, face_box, what: str) -> None:
    """crop_box is FLOAT's square around face_box (marked by eye). The calibrated detector box (WIDER-style,
    hairline to chin) is taller than the eye's: the size may differ by 25 %, the centre by under a tenth
    of the side."""
    expected = float_crop_box(face_box)
    side, expected_side = crop_box[2] - crop_box[0], expected[2] - expected[0]
    centre_error = np.hypot((crop_box[0] + crop_box[2] - expected[0] - expected[2]) / 2,
                            (crop_box[1] + crop_box[3] - expected[1] - expected[3]) / 2)
    assert iou(crop_box, expected) > 0.6 and 0.8 < side / expected_side < 1.3, (what, crop_box, expected)
    assert centre_error < 0.1 * side, (what, centre_error, side)


def face_clip(path: Path, size: tuple[int, int], *people, frames: int = FRAMES, display_rotation_deg: int = 0
              ) -> list[tuple]:
    """An H.264 + AAC clip of `size` (width, height) on a real background; people: (photo, face box, scale,
    top-left at frame 0, pixels per frame along x). Returns the face boxes of frame 0 (source pixels).
    display_rotation_deg: the frames are stored turned back by it, with a display matrix that turns them
    upright (a phone video); `size` and the boxes are the upright frame's."""
    width, height = size
    base = background(width, height)
    photos = [(rgb(photo), face, scale, at, speed) for photo, face, scale, at, speed in people]
    video, first = [], []
    for f in range(frames):
        frame = base
        for image, face, scale, (x, y), speed in photos:
            frame, box = paste(frame, image, face, scale, (round(x + speed * f), y))
            if f == 0:
                first.append(box)
        video.append(frame)
    _, audio, _ = demo.synth_talking_head(frames, 32, seed=len(people))
    stored = np.rot90(np.stack(video), k=-(display_rotation_deg // 90), axes=(1, 2))
    demo.write_clip(path, np.ascontiguousarray(stored), 25.0, audio=audio, x264_preset="veryfast",
                    display_rotation_deg=display_rotation_deg)
    return first


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Clips with known faces, preprocessed once with --crop face."""
    root = tmp_path_factory.mktemp("faces")
    data, cache_dir = root / "data", root / "cache"
    boxes = {
        "still_720p.mp4": face_clip(data / "still_720p.mp4", (1280, 720), (HOPPER, HOPPER_FACE, 0.8, (820, 150), 0)),
        "still_1080p.mp4": face_clip(data / "still_1080p.mp4", (1920, 1080), (ASTRONAUT, ASTRONAUT_FACE, 2.4, (300, 80), 0)),
        # The framing logic on 960 x 540 (cheaper to encode and decode; the detector sees 192 px either way)
        "two_faces.mp4": face_clip(data / "two_faces.mp4", (960, 540), (ASTRONAUT, ASTRONAUT_FACE, 1.0, (20, 120), 0),
                                   (HOPPER, HOPPER_FACE, 0.6, (520, 90), 0)),
        "moving.mp4": face_clip(data / "moving.mp4", (960, 540), (HOPPER, HOPPER_FACE, 0.6, (340, 110), 0.75)),
        "leaves.mp4": face_clip(data / "leaves.mp4", (960, 540), (HOPPER, HOPPER_FACE, 0.6, (40, 110), 9.0)),
        "tiny_face.mp4": face_clip(data / "tiny_face.mp4", (960, 540), (ASTRONAUT, ASTRONAUT_FACE, 0.09, (450, 220), 0)),
        "nobody.mp4": face_clip(data / "nobody.mp4", (960, 540)),
        # Held upright: stored 960 x 540, shown 540 x 960 (turned 90 degrees clockwise, as phones tag it).
        "phone.mp4": face_clip(data / "phone.mp4", (540, 960), (HOPPER, HOPPER_FACE, 0.6, (60, 300), 0),
                               display_rotation_deg=270),
    }
    options = PreprocessOptions(data_root=data, cache_dir=cache_dir, preset=P, sources=ModelSources(), crop="face",
                                progress=False, frame_batch=16)
    result = run_preprocessing(options)
    return data, cache_dir, boxes, entries_of(cf.CacheLayout(result.cache_root)), result


@pytest.mark.slow
def test_the_crop_is_floats_square_around_the_face_at_720p_and_1080p(corpus):
    _, _, boxes, entries, _ = corpus
    for clip in ("still_720p.mp4", "still_1080p.mp4"):
        e = entries[clip]
        assert e.status == cf.STATUS_CACHED and e.crop == "face" and e.faces_seen == 1, (clip, e.reason)
        assert_floats_square(e.crop_box, boxes[clip][0], clip)
        assert e.detect_frames == e.face_frames >= 8
    assert (entries["still_1080p.mp4"].source_width, entries["still_1080p.mp4"].source_height) == (1920, 1080)


def test_a_phone_video_is_framed_upright(corpus):
    """A face in a video stored sideways with a display rotation: found and framed in the upright frame,
    whose size and turn the entry records (the detector would find no face, or a sideways one, otherwise)."""
    _, _, boxes, entries, _ = corpus
    e = entries["phone.mp4"]
    assert e.status == cf.STATUS_CACHED and e.faces_seen == 1, e.reason
    assert (e.source_width, e.source_height, e.source_rotation_deg) == (540, 960, 270)
    assert_floats_square(e.crop_box, boxes["phone.mp4"][0], "phone.mp4")
    video_line = format_clip({**e.to_dict(), "files": {}})[2]
    assert "540x960 (upright after a 270 deg counter-clockwise turn)" in video_line and "decoder pyav" in video_line


def test_two_faces_frame_the_larger(corpus):
    _, _, boxes, entries, _ = corpus
    e = entries["two_faces.mp4"]
    astronaut, hopper = boxes["two_faces.mp4"]
    assert e.status == cf.STATUS_CACHED and e.faces_seen == 2
    assert_floats_square(e.crop_box, hopper, "two_faces.mp4")
    assert iou(e.crop_box, float_crop_box(astronaut)) < 0.1


def test_clips_that_cannot_be_framed_are_skipped_with_their_reason(corpus):
    _, _, _, entries, result = corpus
    reasons = dict(result.skipped)
    assert entries["nobody.mp4"].status == cf.STATUS_SKIPPED and "no face found" in reasons["nobody.mp4"]
    assert entries["leaves.mp4"].status == cf.STATUS_SKIPPED and "leaves FLOAT's crop" in reasons["leaves.mp4"]
    # A 12 px face: too small to be found, or found and too small to frame: skipped either way.
    assert entries["tiny_face.mp4"].status == cf.STATUS_SKIPPED
    assert "no face found" in reasons["tiny_face.mp4"] or "face too small" in reasons["tiny_face.mp4"]
    assert result.exit_code == 0  # skipped, not failed


def test_show_gives_the_crop_box(corpus):
    data, cache_dir, _, entries, _ = corpus
    out = subprocess.run([sys.executable, str(REPO / "preprocess.py"), "show", "still_720p.mp4", "--json", "--preset",
                          P.name, "--data_root", str(data), "--cache_dir", str(cache_dir)],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["crop_box"] == entries["still_720p.mp4"].crop_box and len(shown["crop_box"]) == 4
    assert shown["faces_seen"] == 1 and shown["files"]["frames"]["shape"] == [FRAMES, P.motion_dim + P.audio_feature_dim]
    assert set(shown["stage_seconds"]) >= {"framing", "decode", "motion"}


def test_the_naive_loader_frames_the_same_and_equals_the_cache(corpus):
    data, cache_dir, _, entries, _ = corpus
    cache = TrainingCache.open(cache_dir, P, cache_fingerprint(P, ModelSources(), "face"))
    options = LoaderOptions(batch_size=3, num_workers=0)
    cached = open_loader("torch", P, options, cache=cache)
    naive = open_loader("naive", P, options, data_root=data, crop="face",
                        encoders=build_encoders(P, ModelSources(), "cpu"))
    items = [("still_720p.mp4", 4, 0), ("moving.mp4", 0, 63), ("still_1080p.mp4", 2, 30)]
    a, b = cached.load_windows(items), naive.load_windows(items)
    torch.testing.assert_close(a.motion.float(), b.motion.float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(a.ref_motion.float(), b.ref_motion.float(), rtol=2e-3, atol=2e-3)
    assert torch.equal(a.audio, b.audio)
    index = naive.index_of("moving.mp4")
    e = entries["moving.mp4"]
    expected = (e.crop_box[0] / 960, e.crop_box[1] / 540, e.crop_box[2] / 960, e.crop_box[3] / 540)
    assert naive.dataset.window(index) == pytest.approx(expected, abs=1e-3)


def test_one_crop_per_clip_keeps_the_head_motion(corpus):
    """The head moves 1 px per frame: with one crop for the clip the motion latents change across frames as
    much as with a fixed crop placed by hand; a crop that followed the face on every frame would not."""
    data, _, boxes, entries, _ = corpus
    info = media.probe_video(data / "moving.mp4")
    frames = np.arange(FRAMES)
    encoders = build_encoders(P, ModelSources(), "cpu")
    decoder = media.FrameDecoder(P.motion.input_size)

    def latents(window) -> torch.Tensor:
        pixels = torch.cat(list(decoder.decode(info, frames, window=window)))
        return encode_motion(encoders.motion, pixels).motion_latents.float()

    def change(z: torch.Tensor) -> float:  # mean distance of each frame's latent from frame 0's
        return float((z[1:] - z[:1]).norm(dim=1).mean())

    def window(box) -> tuple:
        return (box[0] / 960, box[1] / 540, box[2] / 960, box[3] / 540)

    cached = torch.from_numpy(features_of(cf.CacheLayout(corpus[4].cache_root), entries["moving.mp4"]).motion_latents
                              ).float()
    middle = np.array(boxes["moving.mp4"][0]) + np.array([FRAMES / 2, 0, FRAMES / 2, 0])
    by_hand = latents(window(float_crop_box(middle)))
    follow = torch.cat([latents(window(float_crop_box(np.array(boxes["moving.mp4"][0]) + [f, 0, f, 0])))[f:f + 1]
                        for f in range(0, FRAMES, 8)])
    assert 0.7 < change(cached) / change(by_hand) < 1.4, (change(cached), change(by_hand))
    assert change(follow) < 0.5 * change(cached[::8]), (change(follow), change(cached[::8]))


@pytest.mark.gpu
def test_on_the_gpu_the_face_crop_matches_the_cpus(corpus, tmp_path):
    """NVDEC frames, the detector in fp16 and the crop in the DALI graph on the device: the same crop box
    as on the CPU within a few pixels, and features within fp16 rounding of the CPU's."""
    data, _, _, entries, _ = corpus
    options = PreprocessOptions(data_root=data, cache_dir=tmp_path / "gpu", preset=P, sources=ModelSources(),
                                crop="face", device="cuda", progress=False)
    gpu = entries_of(cf.CacheLayout(run_preprocessing(options).cache_root))
    for clip in ("still_720p.mp4", "still_1080p.mp4", "two_faces.mp4"):
        assert gpu[clip].decoder == media.DALI_GPU and gpu[clip].status == cf.STATUS_CACHED
        side = entries[clip].crop_box[2] - entries[clip].crop_box[0]
        np.testing.assert_allclose(gpu[clip].crop_box, entries[clip].crop_box, atol=0.03 * side)
