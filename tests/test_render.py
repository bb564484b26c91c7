"""Rendering pieces: a reference framed as preprocessing frames it (a clip, a photo, a cached clip), speech
files counted in frames as FLOAT counts them, the MP4 writer (checked by decoding what it wrote), and the
renderer's frames independent of how many go through the decoder at once.

The command from a trained demo run, and sample videos during training: tests/test_training.py.
"""
from __future__ import annotations

import math

import av
import numpy as np
import pytest
import torch
from PIL import Image

from dali_float import demo, media, render, sampler
from dali_float.config import TINY_PRESET
from dali_float.errors import MediaError, UsageError
from dali_float.face import float_crop_box
from dali_float.face.blazeface import box_iou
from dali_float.loaders import TrainingCache
from dali_float.models import FloatMotionModel, ModelSources, build_decoder, build_motion_encoder
from dali_float.preprocess import PreprocessOptions, run_preprocessing
from faces import ASTRONAUT, ASTRONAUT_FACE, DATA, background, paste, rgb

P = TINY_PRESET
FRAMES = 64


def iou(a, b) -> float:
    return float(box_iou(np.asarray(a, np.float32), np.asarray([b], np.float32))[0])


def decoded(path) -> tuple[np.ndarray, float, np.ndarray, int]:
    """(video frames (n, H, W, 3) uint8, the audio stream's declared duration in s, its samples, its rate)."""
    with av.open(str(path)) as container:
        video = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        stream = container.streams.audio[0]
        duration, rate = float(stream.duration * stream.time_base), stream.rate
    return video, duration, media.load_audio(path, rate).numpy(), rate


@pytest.fixture(scope="module")
def portrait(tmp_path_factory):
    """A still portrait off-centre in a 960x540 frame: as an H.264 + AAC clip (preprocessed with --crop
    face into a cache) and as a PNG photo; the face box where it was pasted."""
    root = tmp_path_factory.mktemp("portrait")
    frame, face = paste(background(960, 540), rgb(ASTRONAUT), ASTRONAUT_FACE, 1.2, (500, 60))
    _, audio, _ = demo.synth_talking_head(FRAMES, 32, seed=3)
    clip = demo.write_clip(root / "data" / "portrait.mp4", np.stack([frame] * FRAMES), 25.0, audio=audio,
                           x264_preset="veryfast")
    photo = root / "portrait.png"
    Image.fromarray(frame).save(photo)
    result = run_preprocessing(PreprocessOptions(data_root=root / "data", cache_dir=root / "cache", preset=P,
                                                 sources=ModelSources(), crop="face", progress=False))
    cache = TrainingCache.open(root / "cache", P, result.fingerprint)
    return {"clip": clip, "photo": photo, "face": face, "cache": cache, "encoder": build_motion_encoder(P, None, "cpu")}


# ---------------------------------------------------------------------------------------------- the reference

def test_a_clip_reference_gets_the_crop_preprocessing_gave_it(portrait):
    entry = portrait["cache"].entry("portrait.mp4")
    image, decision = render.frame_first_frame(portrait["clip"], "face", P, "cpu")
    assert image.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(decision.crop_box, entry.crop_box, atol=0.01)  # the entry rounds to 0.01 px
    clip = sampler.read_clip(portrait["cache"], "portrait.mp4")
    ref = render.reference_from_file(portrait["clip"], "face", portrait["encoder"], P, "cpu")
    # Preprocessing's identity of the first frame, from the same pixels (there in a batch of 16 frames).
    np.testing.assert_allclose(ref.identity.numpy(), clip.identity, rtol=1e-4, atol=1e-4 * np.abs(clip.identity).max())
    np.testing.assert_allclose(ref.motion.numpy(), clip.motion[0], rtol=1e-2, atol=1e-2)  # cached as float16
    assert iou(decision.crop_box, float_crop_box(portrait["face"])) > 0.6  # FLOAT's square around the face


def test_a_photo_is_framed_as_a_clip_of_one_frame(portrait):
    _, from_clip = render.frame_first_frame(portrait["clip"], "face", P, "cpu")
    image, decision = render.frame_first_frame(portrait["photo"], "face", P, "cpu")
    assert decision.sampled_frames == 1 and decision.face_frames == 1
    assert iou(decision.crop_box, from_clip.crop_box) > 0.9  # the same picture, once through H.264
    assert iou(decision.crop_box, float_crop_box(portrait["face"])) > 0.6


def test_a_cached_clip_reference_reuses_its_identity_and_first_frame(portrait):
    clip = sampler.read_clip(portrait["cache"], "portrait.mp4")
    ref = render.reference_from_clip(clip, portrait["encoder"], P, "cpu")
    assert torch.equal(ref.identity, torch.from_numpy(clip.identity))
    assert torch.equal(ref.motion, torch.from_numpy(clip.motion[0]))
    image, _ = render.frame_first_frame(portrait["clip"], "face", P, "cpu")
    torch.testing.assert_close(ref.image, image, atol=0.02, rtol=0)  # the cached crop box is rounded to 0.01 px
    assert [tuple(f.shape) for f in ref.features] == [(1, 64, 8, 8), (1, 64, 16, 16), (1, 64, 32, 32), (1, 32, 64, 64)]


def test_center_and_none_crops_of_a_photo():
    _, center = render.frame_first_frame(DATA / "coffee.jpg", "center", P, "cpu")  # 600 x 400
    np.testing.assert_allclose(center.crop_box, (100, 0, 500, 400))
    with pytest.raises(MediaError, match="not square"):
        render.frame_first_frame(DATA / "coffee.jpg", "none", P, "cpu")
    with pytest.raises(MediaError, match="no face found"):
        render.frame_first_frame(DATA / "coffee.jpg", "face", P, "cpu")


# ---------------------------------------------------------------------------------------------- the speech

@pytest.mark.parametrize("seconds,frames", [(2.3, 58), (2.0, 50), (0.01, 1)])
def test_speech_lasts_ceil_duration_x_25_frames(tmp_path, seconds, frames):
    rate = 44_100
    t = np.arange(round(seconds * rate)) / rate
    demo.write_audio(tmp_path / "speech.wav", (0.2 * np.sin(2 * np.pi * 180 * t) + 0.1).astype(np.float32), rate)
    wave, count = media.prepare_speech(tmp_path / "speech.wav", P.timing)
    assert count == frames == math.ceil(seconds * 25 - 1e-9)
    assert wave.shape == (frames * 640,)
    sound = wave[:round(seconds * 16_000)].double()  # normalised over the speech, not the padding
    assert abs(float(sound.mean())) < 1e-3 and abs(float(sound.std(unbiased=False)) - 1) < 1e-3
    assert torch.equal(wave[round(seconds * 16_000):], wave[-1].expand(frames * 640 - round(seconds * 16_000)))


# ---------------------------------------------------------------------------------------------- the MP4

def test_mp4_writer_frames_and_the_audio_track_of_the_input(tmp_path):
    rate, seconds, n = 44_100, 2.3, 58
    t = np.arange(round(seconds * rate)) / rate
    sound = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    ramp = torch.linspace(-1, 1, n)[:, None, None, None].expand(n, 3, 64, 64)
    with media.Mp4Writer(tmp_path / "out.mp4", 64, 25, sound, rate) as writer:
        writer.write(ramp[:20])
        writer.write(ramp[20:])
    video, duration, audio, found_rate = decoded(tmp_path / "out.mp4")
    assert video.shape == (n, 64, 64, 3) and found_rate == rate
    np.testing.assert_allclose(video.mean(axis=(1, 2, 3)), (ramp[:, 0, 0, 0].numpy() + 1) * 127.5, atol=3)
    assert abs(duration - seconds) < 1e-3 and abs(len(audio) / rate - seconds) < 1e-3
    assert np.corrcoef(audio[2048:-2048], sound[2048:len(audio) - 2048])[0, 1] > 0.99  # AAC: the same sine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temporary file left


def test_mp4_writer_leaves_nothing_when_it_fails(tmp_path):
    with pytest.raises(ValueError, match="frames must be"):
        with media.Mp4Writer(tmp_path / "out.mp4", 64, 25) as writer:
            writer.write(torch.zeros(2, 3, 32, 32))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match=r"\*\.mp4"):
        media.Mp4Writer(tmp_path / "out.avi", 64, 25)


# ---------------------------------------------------------------------------------------------- the renderer

def test_the_video_does_not_depend_on_the_decoder_batch(portrait, tmp_path):
    model = FloatMotionModel(P).eval()
    decoder = build_decoder(P, None, "cpu")
    ref = render.reference_from_file(portrait["clip"], "face", portrait["encoder"], P, "cpu")
    g = torch.Generator().manual_seed(0)
    speech = render.Speech(torch.randn(73, P.audio_feature_dim, generator=g), torch.full((7,), 1 / 7),
                           np.zeros(73 * 640, np.float32), 16_000, "noise")
    one_call_per_chunk = torch.cat(list(render.Renderer(model, decoder, 50).frames(ref, speech, seed=1)))
    sevens = list(render.Renderer(model, decoder, 7).frames(ref, speech, seed=1))
    assert one_call_per_chunk.shape == (73, 3, 64, 64) and [len(b) for b in sevens] == [7] * 7 + [1] + [7] * 3 + [2]
    # The same video: float32 rounding (amplified by the random decoder up to ~5e-4) moves a pixel by at most one level.
    pixels = media.to_uint8_frames(torch.cat(sevens)).astype(int) - media.to_uint8_frames(one_call_per_chunk)
    assert np.abs(pixels).max() <= 1 and np.mean(pixels != 0) < 1e-3
    other_noise = torch.cat(list(render.Renderer(model, decoder, 50).frames(ref, speech, seed=2)))
    assert float((other_noise - one_call_per_chunk).abs().mean()) > 1e-3
    assert render.Renderer(model, decoder).frame_batch == 50  # tiny on the CPU: a whole chunk fits
    with pytest.raises(UsageError, match="--frame_batch must be at least 1"):
        render.Renderer(model, decoder, 0)


@pytest.mark.gpu
def test_render_on_cuda_in_float16(portrait, tmp_path):
    """On a GPU: the reference, motion and a whole chunk per decoder call in float16, into an MP4."""
    model = FloatMotionModel(P).cuda().eval()
    renderer = render.Renderer(model, build_decoder(P, None, "cuda"))
    assert renderer.frame_batch == 50
    encoder = build_motion_encoder(P, None, "cuda")
    ref = render.reference_from_file(portrait["clip"], "face", encoder, P, "cuda")
    speech = render.Speech(torch.randn(60, P.audio_feature_dim, device="cuda"), torch.full((7,), 1 / 7, device="cuda"),
                           np.zeros(38_400, np.float32), 16_000, "noise")
    batches = list(renderer.frames(ref, speech))
    assert [len(b) for b in batches] == [50, 10] and batches[0].dtype == torch.float16
    result = renderer.render(ref, speech, tmp_path / "gpu.mp4", progress=False)
    assert result.frames == 60 and decoded(tmp_path / "gpu.mp4")[0].shape == (60, 64, 64, 3)
