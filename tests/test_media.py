"""dali_float.media: discovery, probing (good and bad files), 25 fps indices, decoding, audio."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dali_float.config import TimingConfig
from dali_float.demo import synth_talking_head, write_audio, write_clip
from dali_float.errors import MediaError
from dali_float.media import (
    clip_frame_indices,
    DALI_CPU, DALI_GPU, PYAV, FrameDecoder, choose_decoder, decode_frames, discover_videos,
    find_side_audio, frame_indices_at_fps, pad_to_frames, trim_to_frames, load_audio, normalize_utterance,
    num_frames_at_fps, prepare_clip_audio, probe_video,
)
from dali_float.media.video import FULL_FRAME
from unprivileged import run_python

S = 64  # the tiny preset's input size
N_FRAMES = 40
HEIGHT, WIDTH = 96, 128  # landscape: the centre square crop matters
TIMING = TimingConfig()


def reference_process(frames: np.ndarray, size: int) -> torch.Tensor:
    """What process_frames should compute, in plain torch: centre square, antialiased resize, [-1, 1]."""
    _, h, w, _ = frames.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = torch.from_numpy(frames[:, top:top + side, left:left + side]).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - 127.5) / 127.5


@pytest.fixture(scope="module")
def content():
    """One synthetic talking head: drawn frames (N, H, W, 3) uint8 and 16 kHz audio."""
    frames, audio, _ = synth_talking_head(N_FRAMES, (HEIGHT, WIDTH), fps=25, audio_rate=16_000, seed=7)
    return frames, audio


@pytest.fixture(scope="module")
def clips(tmp_path_factory, content):
    """The same content as H.264 + AAC (.mp4) and VP9 + Opus (.webm)."""
    frames, audio = content
    folder = tmp_path_factory.mktemp("clips")
    return {
        "mp4": write_clip(folder / "talk.mp4", frames, 25, audio=audio, audio_rate=16_000),
        "webm": write_clip(folder / "talk.webm", frames, 25, audio=audio, audio_rate=16_000),
    }


@pytest.fixture(scope="module")
def decoder():
    return FrameDecoder(S, chunk_frames=16, batch_chunks=2, num_threads=2)


# ------------------------------------------------------------------------------------------------
# Discovery


def test_discover_videos_nested_any_case_odd_names(tmp_path):
    names = ["a/b/Clip One.MP4", "ünï çødé/x.webm", "z.mkv", "a/x.Mov", "deep/er/still/v.AVI",
             "notes.txt", "a/b/Clip One.wav", "._resource.mp4", "folder.mp4/inside.webm"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = discover_videos(tmp_path)
    ids = [clip_id for clip_id, _ in found]
    assert ids == sorted(["a/b/Clip One.MP4", "ünï çødé/x.webm", "z.mkv", "a/x.Mov", "deep/er/still/v.AVI",
                          "folder.mp4/inside.webm"])
    assert all(path == tmp_path / clip_id for clip_id, path in found)


def test_discover_videos_missing_root_is_a_usage_error(tmp_path):
    from dali_float.errors import UsageError
    with pytest.raises(UsageError, match="no such folder"):
        discover_videos(tmp_path / "nope")


def test_discover_videos_follows_symlinks_without_looping(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.mp4").write_bytes(b"x")
    (tmp_path / "real" / "loop").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    ids = [clip_id for clip_id, _ in discover_videos(tmp_path)]
    assert ids == ["alias/a.mp4"]  # one file, listed once, under its smallest id


def test_find_side_audio(tmp_path):
    video = tmp_path / "talk.mp4"
    video.write_bytes(b"x")
    assert find_side_audio(video) is None
    (tmp_path / "other.wav").write_bytes(b"x")
    assert find_side_audio(video) is None
    (tmp_path / "talk.FLAC").write_bytes(b"x")
    assert find_side_audio(video) == tmp_path / "talk.FLAC"
    (tmp_path / "talk.Wav").write_bytes(b"x")
    assert find_side_audio(video) == tmp_path / "talk.Wav"  # .wav wins over .flac


# ------------------------------------------------------------------------------------------------
# Probing


@pytest.mark.parametrize("kind, codec", [("mp4", "h264"), ("webm", "vp9")])
def test_probe_good_clip(clips, kind, codec):
    info = probe_video(clips[kind])
    assert info.codec == codec
    assert (info.width, info.height) == (WIDTH, HEIGHT)
    assert info.num_frames == N_FRAMES
    assert info.frame_times_s.dtype == np.float64 and info.frame_times_s[0] == 0
    np.testing.assert_allclose(info.frame_times_s, np.arange(N_FRAMES) / 25, atol=1e-3)
    assert info.duration_s == pytest.approx(N_FRAMES / 25, abs=1e-3)
    assert info.source_fps == pytest.approx(25, rel=1e-3)
    assert info.audio_source == clips[kind]


def test_probe_side_audio_and_no_audio(tmp_path, content):
    frames, audio = content
    silent = write_clip(tmp_path / "silent.webm", frames[:10], 25, audio=None)
    assert probe_video(silent).audio_source is None
    side = write_audio(tmp_path / "silent.WAV", audio[:6400], 16_000)
    assert probe_video(silent).audio_source == side


def _bad_inputs(folder: Path, clips: dict[str, Path], audio: np.ndarray) -> dict[str, tuple[Path, str]]:
    """name -> (path, a fragment the error message must contain)."""
    cases = {}
    empty = folder / "empty.mp4"
    empty.write_bytes(b"")
    cases["zero bytes"] = (empty, "empty (0 bytes)")
    text = folder / "notes.mp4"
    text.write_text("these are my notes, not a video\n" * 50)
    cases["text renamed .mp4"] = (text, "not a readable media file")
    data = clips["mp4"].read_bytes()  # MP4 from PyAV: the index (moov) is at the end
    cut_mp4 = folder / "cut.mp4"
    cut_mp4.write_bytes(data[: len(data) // 2])
    cases["truncated mp4"] = (cut_mp4, "truncated")
    data = clips["webm"].read_bytes()  # WebM: header intact, clusters cut
    cut_webm = folder / "cut.webm"
    cut_webm.write_bytes(data[: len(data) // 2])
    cases["truncated webm"] = (cut_webm, "truncated")
    audio_only = write_audio(folder / "voice.m4a", audio, 16_000)
    renamed = folder / "voice.mp4"
    audio_only.rename(renamed)
    cases["audio only renamed .mp4"] = (renamed, "no video stream")
    folder_named_mp4 = folder / "folder.mp4"
    folder_named_mp4.mkdir()
    cases["folder named .mp4"] = (folder_named_mp4, "is a folder")
    cases["missing file"] = (folder / "gone.mp4", "not found")
    dangling = folder / "dangling.mp4"
    dangling.symlink_to(folder / "nowhere.mp4")
    cases["dangling symlink"] = (dangling, "not found")
    fifo = folder / "pipe.mp4"
    os.mkfifo(fifo)  # FFmpeg would block on it forever
    cases["named pipe"] = (fifo, "not a regular file")
    unknown = folder / "codec.mp4"
    unknown.write_bytes(clips["mp4"].read_bytes().replace(b"avc1", b"zzzz"))  # a codec tag nobody decodes
    cases["unknown codec"] = (unknown, "codec is unknown")
    return cases


@pytest.mark.parametrize("case", ["zero bytes", "text renamed .mp4", "truncated mp4", "truncated webm",
                                  "audio only renamed .mp4", "folder named .mp4", "missing file",
                                  "dangling symlink", "named pipe", "unknown codec"])
def test_probe_bad_inputs_raise_one_line_media_error(tmp_path, clips, content, case):
    path, fragment = _bad_inputs(tmp_path, clips, content[1])[case]
    with pytest.raises(MediaError) as err:
        probe_video(path)
    message = str(err.value)
    assert "\n" not in message
    assert path.name in message
    assert fragment in message
    if case == "text renamed .mp4":  # FFmpeg's own words for the cause (AVERROR_INVALIDDATA), kept on the line
        assert "Invalid data found when processing input" in message
    # A message says what to do, not only what is wrong.
    assert any(word in message for word in ("re-", "remove", "give", "make", "check"))


def _corrupt(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One of four damages a copy or a download does to a file, at a random place."""
    data = bytearray(data)
    kind = ("bytes flipped", "cut short", "a block zeroed", "bytes inserted")[int(rng.integers(4))]
    at = int(rng.integers(len(data)))
    if kind == "bytes flipped":
        for _ in range(int(rng.integers(1, 60))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
    elif kind == "cut short":
        del data[at:]
    elif kind == "a block zeroed":
        data[at:at + 4000] = bytes(len(data[at:at + 4000]))
    else:
        data[at:at] = rng.bytes(int(rng.integers(1, 500)))
    return kind, bytes(data)


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv", ".avi"])
def test_damaged_files_decode_or_give_one_media_error_line(tmp_path, content, decoder, suffix):
    """Seeded random damage to H.264/AAC (.mp4, .mkv), VP9/Opus (.webm, DALI's path) and MJPEG (.avi, DALI's
    path) files: probing, decoding every frame and loading the audio either work (damaged pixels are still
    pixels) or raise MediaError with one line naming the file; never another exception. (A local run of 900
    such files found none; this keeps 20 per container.)"""
    frames, audio = content
    whole = write_clip(tmp_path / f"whole{suffix}", frames[:24], 25, audio=audio[:24 * 640], audio_rate=16_000,
                       video_codec="mjpeg" if suffix == ".avi" else None).read_bytes()
    rng = np.random.default_rng(["", ".mp4", ".webm", ".mkv", ".avi"].index(suffix))
    outcomes = []
    for i in range(20):
        kind, data = _corrupt(whole, rng)
        path = tmp_path / f"damaged{i}{suffix}"
        path.write_bytes(data)
        try:
            info = probe_video(path)
            idx = clip_frame_indices(info, 25)
            assert sum(len(chunk) for chunk in decoder.decode(info, idx)) == len(idx)
            assert prepare_clip_audio(info, len(idx), TIMING).shape == (len(idx) * 640,)
            outcomes.append("read")
        except MediaError as err:
            assert "\n" not in str(err) and path.name in str(err), (kind, str(err))
            outcomes.append("MediaError")
    assert "MediaError" in outcomes  # the damage is real: some files cannot be read


def test_the_native_rate_of_an_unusable_file_is_the_probes_one_line(tmp_path):
    """native_rate (a speech file's rate for `sampler render`, a clip's before resampling) checks the file
    before FFmpeg opens it, as the probe does: FFmpeg would call an empty file invalid data and block on a pipe."""
    from dali_float.media.audio import native_rate

    empty = tmp_path / "speech.wav"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="file is empty \\(0 bytes\\)"):
        native_rate(empty)
    with pytest.raises(MediaError, match="is a folder"):
        native_rate(tmp_path)


def test_probe_unreadable_file(tmp_path, clips):
    # Root reads a chmod-000 file anyway: the probe runs without that privilege (tests/unprivileged.py).
    path = tmp_path / "locked.webm"
    shutil.copy(clips["webm"], path)
    path.chmod(0)
    try:
        done = run_python("import sys\nfrom dali_float.errors import MediaError\nfrom dali_float.media import probe_video\n"
                          "try:\n    probe_video(sys.argv[1])\nexcept MediaError as err:\n    print(err)\n",
                          str(path))
        assert done.returncode == 0, done.stderr
        assert "permission denied" in done.stdout and "chmod" in done.stdout
    finally:
        path.chmod(0o644)


def test_permission_errors_become_media_errors(tmp_path, clips, monkeypatch):
    """Root reads any file, so the OS refusal is simulated where PyAV opens the file."""
    from dali_float.media import audio, probe

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # probe_video (media.probe) and load_audio (media.audio) both call `av.open`: one module object.
    assert probe.av is audio.av
    monkeypatch.setattr(probe.av, "open", refuse)
    with pytest.raises(MediaError, match="permission denied.*chmod"):
        probe_video(clips["webm"])
    with pytest.raises(MediaError, match="permission denied"):
        load_audio(clips["webm"], 16_000)


@pytest.mark.parametrize("kind", ["mp4", "webm"])
@pytest.mark.parametrize("keep", [0.9, 0.97, 0.995])
def test_slightly_truncated_file_never_hangs_or_crashes(tmp_path, clips, kind, keep):
    """Cut a little off the end: either probe refuses it, or the probed frames all decode."""
    data = clips[kind].read_bytes()
    path = tmp_path / f"cut.{kind}"
    path.write_bytes(data[: int(len(data) * keep)])
    try:
        info = probe_video(path)
    except MediaError:
        return
    decoder = FrameDecoder(S, chunk_frames=16)
    for kind in (None, PYAV):
        try:
            frames = torch.cat(list(decoder.decode(info, np.arange(info.num_frames), kind=kind)))
        except MediaError as err:
            assert "\n" not in str(err)
            continue
        assert frames.shape == (info.num_frames, 3, S, S)


# ------------------------------------------------------------------------------------------------
# 25 fps


def test_frame_indices_identity_at_25_fps():
    times = np.arange(50) / 25
    np.testing.assert_array_equal(frame_indices_at_fps(times, 2.0, 25), np.arange(50))
    assert num_frames_at_fps(2.0, 25) == 50
    assert num_frames_at_fps(1.999, 25) == 50  # a millisecond of timestamp rounding loses no frame
    assert num_frames_at_fps(1.99, 25) == 49  # a quarter frame short does


def test_frame_indices_30_fps_for_3_s():
    times = np.arange(90) / 30
    idx = frame_indices_at_fps(times, 3.0, 25)
    assert idx.dtype == np.int64 and len(idx) == 75
    # tick k at k/25 s: nearest 30 fps frame is round(k * 30 / 25), ties (k*1.2 = x.5 never here) earlier
    np.testing.assert_array_equal(idx, np.round(np.arange(75) * 1.2).astype(np.int64))


def test_frame_indices_tie_goes_to_earlier_frame():
    times = np.array([0.0, 0.02, 0.06, 0.1])  # tick 0.04 is 0.02 from frames 1 and 2
    assert frame_indices_at_fps(times, 0.12, 25)[1] == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.005, 0.2), min_size=1, max_size=80), st.sampled_from([25, 30, 12.5]))
def test_frame_indices_properties_on_variable_frame_rate(gaps, fps):
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    duration = float(times[-1] + 0.04)
    idx = frame_indices_at_fps(times, duration, fps)
    assert len(idx) == num_frames_at_fps(duration, fps)
    assert np.all(np.diff(idx) >= 0)
    assert np.all((idx >= 0) & (idx < len(times)))
    ticks = np.arange(len(idx)) / fps
    chosen = np.abs(times[idx] - ticks)
    best = np.abs(times[None, :] - ticks[:, None]).min(axis=1)
    np.testing.assert_allclose(chosen, best, atol=1e-9)  # nearest frame


def test_variable_frame_rate_clip_round_trip(tmp_path, content):
    frames, _ = content
    rng = np.random.default_rng(3)
    stamps = np.concatenate([[0.0], np.cumsum(rng.uniform(0.02, 0.07, N_FRAMES - 1))])
    for suffix in (".mp4", ".webm"):
        info = probe_video(write_clip(tmp_path / f"vfr{suffix}", frames, timestamps_s=stamps))
        np.testing.assert_allclose(info.frame_times_s, stamps, atol=1e-3)  # .webm stores ms
        idx = frame_indices_at_fps(info.frame_times_s, info.duration_s, 25)
        ticks = np.arange(len(idx)) / 25
        assert np.all(np.abs(info.frame_times_s[idx] - ticks) <= 0.035 + 1e-3)


def test_30_fps_clip_gives_75_frames_for_3_s(tmp_path, content):
    frames = np.concatenate([content[0]] * 3)[:90]
    info = probe_video(write_clip(tmp_path / "f30.mp4", frames, fps=30))
    assert info.num_frames == 90 and info.source_fps == pytest.approx(30, rel=1e-3)
    assert len(frame_indices_at_fps(info.frame_times_s, info.duration_s, 25)) == 75


# ------------------------------------------------------------------------------------------------
# Rotated (phone) videos

# ISO/IEC 14496-12 track header matrix [a b u; c d v; x y w] (a-d, x, y in 16.16; u, v, w in 2.30), as
# stored big-endian in a 'tkhd' box: the identity, and a phone held upright (a=0, b=1, c=-1, d=0, x=width
# shown): a stored pixel (x, y) is shown at (-y + tx, x), the stored frame turned 90 degrees clockwise.
_IDENTITY_MATRIX = np.array([0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000], ">u4").tobytes()


def _portrait_matrix(stored_height: int) -> bytes:
    return np.array([0, 0x10000, 0, 0xFFFF0000, 0, 0, stored_height << 16, 0, 0x40000000], ">u4").tobytes()


def _decoded(decoder, info, indices, **options) -> torch.Tensor:
    return torch.cat(list(decoder.decode(info, indices, **options)))


def test_a_phone_video_is_decoded_upright_as_its_mp4_matrix_says(tmp_path, content, decoder):
    """The direction comes from the MP4 spec, not from FFmpeg or the code: the video track's matrix is
    written into the file by hand, and the reference is the stored frames turned clockwise."""
    frames = content[0]  # stored landscape, 96 x 128
    plain = write_clip(tmp_path / "plain.mp4", frames, 25, audio=None)
    data = plain.read_bytes()
    video_tkhd = data.index(b"tkhd")  # the first track is the video
    at = data.index(_IDENTITY_MATRIX, video_tkhd)
    assert at - video_tkhd < 60  # the matrix of that same box
    phone = tmp_path / "phone.mp4"
    phone.write_bytes(data[:at] + _portrait_matrix(HEIGHT) + data[at + len(_IDENTITY_MATRIX):])

    info = probe_video(phone)
    assert (info.width, info.height, info.rotation_deg) == (HEIGHT, WIDTH, 270)  # 270 counter-clockwise
    stored = _decoded(decoder, probe_video(plain), np.arange(N_FRAMES), window=FULL_FRAME, out_size=(HEIGHT, WIDTH),
                      kind=PYAV)
    upright = _decoded(decoder, info, np.arange(N_FRAMES), window=FULL_FRAME, out_size=(WIDTH, HEIGHT))
    assert decoder.last_decoder == PYAV
    assert torch.equal(upright, torch.rot90(stored, k=-1, dims=(2, 3)))  # clockwise in (H, W)
    # The default crop is the centred square of the upright frame.
    square = _decoded(decoder, info, np.arange(N_FRAMES))
    upright_frames = np.rot90(frames, k=-1, axes=(1, 2))
    assert (square - reference_process(np.ascontiguousarray(upright_frames), S)).abs().mean() < 0.03


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".webm", ".mkv", ".avi"])
def test_the_probe_decodes_a_frame_only_where_the_container_may_turn_it(tmp_path, content, monkeypatch, suffix):
    """Reading the display turn costs a frame decode (~20 ms at 1080p, in a planning pass that probes every
    clip): a file whose container holds no display transform is probed without one; a tagged one is decoded."""
    from dali_float.media import probe

    decoded = []
    real = probe._first_frame_rotation
    monkeypatch.setattr(probe, "_first_frame_rotation", lambda *a: decoded.append(1) or real(*a))
    frames = content[0][:6]
    codec = "mjpeg" if suffix == ".avi" else None
    assert probe_video(write_clip(tmp_path / f"plain{suffix}", frames, 25, video_codec=codec)).rotation_deg == 0
    assert decoded == []
    if suffix != ".avi":  # AVI has no display matrix
        info = probe_video(write_clip(tmp_path / f"turned{suffix}", frames, 25, display_rotation_deg=180))
        assert decoded and info.rotation_deg == 180


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv"])
@pytest.mark.parametrize("turn_deg", [90, 180, 270])
def test_display_rotation_is_applied_on_every_decoder_path(tmp_path, content, decoder, suffix, turn_deg):
    """A display matrix written by FFmpeg (PyAV) in each container: the probe reports the upright size, the
    frames come out turned as the matrix says (the same file without it, turned), also where DALI would
    decode the codec (VP9), and a DALI decoder asked for by name is refused rather than given sideways frames."""
    frames = content[0][:12]
    tagged = probe_video(write_clip(tmp_path / f"t{suffix}", frames, 25, audio=None, display_rotation_deg=turn_deg))
    plain = probe_video(write_clip(tmp_path / f"p{suffix}", frames, 25, audio=None))
    quarter = turn_deg in (90, 270)
    assert tagged.rotation_deg == turn_deg and plain.rotation_deg == 0
    assert (tagged.width, tagged.height) == ((HEIGHT, WIDTH) if quarter else (WIDTH, HEIGHT))
    idx = np.arange(12)
    stored = _decoded(decoder, plain, idx, window=FULL_FRAME, out_size=(HEIGHT, WIDTH), kind=PYAV)
    shown = _decoded(decoder, tagged, idx, window=FULL_FRAME, out_size=(tagged.height, tagged.width))
    assert decoder.last_decoder == PYAV
    assert torch.equal(shown, torch.rot90(stored, k=turn_deg // 90, dims=(2, 3)))
    if suffix == ".webm":
        assert choose_decoder(tagged.codec, "cpu", tagged.colorspace) == DALI_CPU  # the codec alone: DALI
        with pytest.raises(ValueError, match="only pyav turns its frames upright"):
            _decoded(decoder, tagged, idx, kind=DALI_CPU)


# ------------------------------------------------------------------------------------------------
# Decoding


def test_choose_decoder():
    assert choose_decoder("h264", "cpu") == PYAV
    assert choose_decoder("hevc", "cpu") == PYAV
    assert choose_decoder("av1", "cpu") == PYAV
    assert choose_decoder("vp9", "cpu") == DALI_CPU
    assert choose_decoder("vp8", "cpu") == DALI_CPU
    assert choose_decoder("mjpeg", "cpu") == DALI_CPU
    assert choose_decoder("h264", "cuda:0") == DALI_GPU
    assert choose_decoder("vp9", "cuda") == DALI_GPU
    assert choose_decoder("mpeg4", "cuda") == DALI_GPU
    assert choose_decoder("av1", "cuda") == PYAV  # Hopper's NVDEC has no AV1
    assert choose_decoder("vp9", "cpu", colorspace=1) == PYAV  # BT.709: DALI's CPU decoder would use BT.601
    assert choose_decoder("vp9", "cpu", colorspace=2) == DALI_CPU
    assert choose_decoder("h264", "cuda", rotation_deg=270) == PYAV  # NVDEC ignores the display matrix


def reference_window(rgb: np.ndarray, box_px: tuple[int, int, int, int], out: int) -> tuple[torch.Tensor, tuple]:
    """FLOAT's framing of decoded frames (N, H, W, 3) in plain torch: the square box (pixels, may reach past
    the frame), zero outside the frame, the inside part resized (antialiased bilinear) to its share of the
    out x out output; [-1, 1]. Also the (top, bottom, left, right) rows/columns the frame lands on."""
    x0, y0, x1, y1 = box_px
    t = torch.from_numpy(rgb).permute(0, 3, 1, 2).float()
    h, w = t.shape[2:]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    scale = out / (x1 - x0)
    top, bottom = round((cy0 - y0) * scale), round((cy1 - y0) * scale)
    left, right = round((cx0 - x0) * scale), round((cx1 - x0) * scale)
    part = F.interpolate(t[:, :, cy0:cy1, cx0:cx1], size=(bottom - top, right - left), mode="bilinear",
                         antialias=True, align_corners=False)
    canvas = torch.zeros(t.shape[0], 3, out, out)
    canvas[:, :, top:bottom, left:right] = part
    return (canvas - 127.5) / 127.5, (top, bottom, left, right)


@pytest.mark.parametrize("kind", [DALI_CPU, PYAV])
def test_a_crop_window_past_the_frame_is_zero_padded_like_floats_framing(clips, decoder, kind):
    """A face near the edge: FLOAT pads the frame with black (copyMakeBorder) before cutting its square.
    Both decode sources feed the same graph; compared with the frames PyAV decodes, framed in plain torch."""
    from dali_float.media.video import _pyav_decode_chunks

    info = probe_video(clips["webm"])
    rgb = next(_pyav_decode_chunks(info, [np.arange(N_FRAMES)]))
    box = (-32, -16, 96, 112)  # 128 px square reaching 32 px past the left, 16 past the top and bottom
    expected, (top, bottom, left, right) = reference_window(rgb, box, S)
    window = (box[0] / WIDTH, box[1] / HEIGHT, box[2] / WIDTH, box[3] / HEIGHT)
    got = torch.cat(list(decoder.decode(info, np.arange(N_FRAMES), kind=kind, window=window)))
    assert got.shape == (N_FRAMES, 3, S, S)
    inside = torch.zeros(S, S, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    assert (got[:, :, ~inside] == -1).all()  # black padding, exactly
    diff = (got - expected).abs()
    assert diff.mean() < 0.005 and diff.max() < 0.1, (float(diff.mean()), float(diff.max()))
    # Against the centred square the picture moved: the window was honoured, not ignored.
    assert (got - torch.cat(list(decoder.decode(info, np.arange(N_FRAMES), kind=kind)))).abs().mean() > 0.1


def test_frames_for_samples_is_the_ceiling_of_the_speech_in_frames():
    """FLOAT's sampler counts ceil(duration x fps) frames for a speech of N samples: a part frame counts."""
    from dali_float.media.audio import frames_for_samples

    for n in (1, 639, 640, 641, 15_999, 16_000, 16_001, 1_234_567):
        got = frames_for_samples(n, TIMING)
        assert isinstance(got, int) and got == math.ceil(n * TIMING.fps / TIMING.sample_rate_hz), n


@pytest.mark.parametrize("kind", ["mp4", "webm"])
def test_a_whole_frame_at_another_aspect_comes_out_at_the_size_asked(clips, content, decoder, kind):
    """What the face detector's pass asks for (media.framing): the whole frame, not the centre square,
    resized to (height, width) as given, here 48 x 64 of the 96 x 128 source."""
    frames, _ = content
    got = torch.cat(list(decoder.decode(probe_video(clips[kind]), np.arange(4), window=FULL_FRAME, out_size=(48, 64))))
    assert got.shape == (4, 3, 48, 64)
    x = torch.from_numpy(frames[:4]).permute(0, 3, 1, 2).float()
    want = (F.interpolate(x, size=(48, 64), mode="bilinear", antialias=True, align_corners=False) - 127.5) / 127.5
    assert (got.cpu().float() - want).abs().mean() < 0.03  # codec loss, as in the centre-square tests


def test_pyav_starts_a_late_segment_at_the_key_frame_before_it(tmp_path, decoder, monkeypatch):
    """Frames of a segment deep in a video decode the same with the seek as from the start of the file."""
    from dali_float.media import video

    frames, _, _ = synth_talking_head(150, (HEIGHT, WIDTH), fps=25, seed=3)
    info = probe_video(write_clip(tmp_path / "long.mp4", frames, 25, gop_frames=25))
    wanted = np.arange(100, 140)
    opened = []
    original_open = video._PyavCursor._open

    def spy(self, index, seek):
        opened.append((index, seek and index >= video._SEEK_AFTER_FRAMES))
        return original_open(self, index, seek)

    monkeypatch.setattr(video._PyavCursor, "_open", spy)
    seeking = torch.cat(list(decoder.decode(info, wanted, kind=PYAV)))
    assert opened == [(100, True)]  # one open, at the segment, seeking
    monkeypatch.setattr(video, "_SEEK_AFTER_FRAMES", 10**9)
    from_start = torch.cat(list(decoder.decode(info, wanted, kind=PYAV)))
    assert torch.equal(seeking, from_start)
    assert (seeking - reference_process(frames[wanted], S)).abs().mean() < 0.03


def _decode_all(decoder, info, kind=None):
    chunks = list(decoder.decode(info, np.arange(info.num_frames), kind=kind))
    return torch.cat(chunks), decoder.last_decoder


def test_dali_vp9_and_pyav_h264_agree_with_the_drawn_frames(clips, content, decoder):
    frames, _ = content
    reference = reference_process(frames, S)
    vp9, kind_vp9 = _decode_all(decoder, probe_video(clips["webm"]))
    h264, kind_h264 = _decode_all(decoder, probe_video(clips["mp4"]))
    assert (kind_vp9, kind_h264) == (DALI_CPU, PYAV)
    for x in (vp9, h264):
        assert x.shape == (N_FRAMES, 3, S, S) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        assert (x - reference).abs().mean() < 0.03
    assert (vp9 - h264).abs().mean() < 0.03


def test_dali_and_pyav_decode_the_same_vp9_file_alike(clips, decoder, capsys):
    info = probe_video(clips["webm"])
    dali, _ = _decode_all(decoder, info)
    pyav, kind = _decode_all(decoder, info, kind=PYAV)
    assert kind == PYAV
    diff = (dali - pyav).abs()
    with capsys.disabled():
        print(f"\nDALI-VP9 vs PyAV-VP9 (same file, same process_frames): mean |diff| {diff.mean():.5f}, "
              f"max {diff.max():.4f} (in [-1, 1] units; 1/127.5 = {1 / 127.5:.4f})")
    # PyAV converts YUV with the swscale flags DALI uses: bit-identical on the pinned versions.
    assert diff.max() <= 1 / 127.5 + 1e-6


@pytest.mark.parametrize("name, codec", [("mjpeg.avi", "mjpeg"), ("mjpeg.mkv", "mjpeg"), ("vp8.webm", "vp8")])
def test_other_dali_cpu_codecs_match_pyav(tmp_path, content, decoder, name, codec):
    frames = content[0][:12]
    info = probe_video(write_clip(tmp_path / name, frames, 25, video_codec=codec))
    assert info.codec == codec and info.num_frames == 12
    dali, kind = _decode_all(decoder, info)
    pyav, _ = _decode_all(decoder, info, kind=PYAV)
    assert kind == DALI_CPU
    assert (dali - pyav).abs().max() <= 1 / 127.5 + 1e-6
    assert (dali - reference_process(frames, S)).abs().mean() < 0.05  # MJPEG's default quality is low


def test_av1_is_decoded_by_pyav(tmp_path, content, decoder):
    frames = content[0][:12]
    info = probe_video(write_clip(tmp_path / "av1.mkv", frames, 25, video_codec="av1"))
    assert info.codec == "av1"  # FFmpeg's decoder is libdav1d; the codec name is what counts
    x, kind = _decode_all(decoder, info)
    assert kind == PYAV and x.shape == (12, 3, S, S)
    assert (x - reference_process(frames, S)).abs().mean() < 0.05


def test_bt709_clip_goes_to_pyav(tmp_path, content, decoder):
    """DALI's CPU decoder ignores the BT.709 tag (uses BT.601): such clips are decoded by PyAV."""
    frames = content[0][:12]
    info = probe_video(write_clip(tmp_path / "hd.webm", frames, 25, colorspace="bt709"))
    assert info.colorspace == 1
    right, kind = _decode_all(decoder, info)
    assert kind == PYAV
    wrong, _ = _decode_all(decoder, info, kind=DALI_CPU)
    reference = reference_process(frames, S)
    assert (right - reference).abs().mean() < 0.03
    assert (wrong - reference).abs().mean() > (right - reference).abs().mean() + 0.01


@pytest.mark.parametrize("kind", [None, PYAV])
def test_chunked_decode_equals_one_chunk(clips, kind):
    info = probe_video(clips["webm"])
    whole, _ = _decode_all(FrameDecoder(S, chunk_frames=1000, batch_chunks=1), info, kind)
    chunked = FrameDecoder(S, chunk_frames=7, batch_chunks=2)
    chunks = list(chunked.decode(info, np.arange(N_FRAMES), kind=kind))
    assert [len(c) for c in chunks] == [7] * 5 + [5]
    assert torch.equal(torch.cat(chunks), whole)


@pytest.mark.parametrize("clip, kind", [("webm", None), ("webm", PYAV), ("mp4", None)])
def test_repeated_and_unordered_indices(clips, decoder, clip, kind):
    info = probe_video(clips[clip])
    whole, _ = _decode_all(decoder, info, kind)
    idx = np.array([5, 5, 0, 39, 12, 12, 12, 3, 38, 20, 21, 0])
    got = torch.cat(list(decoder.decode(info, idx, kind=kind)))
    assert torch.equal(got, whole[idx])


def test_25_fps_indices_of_a_30_fps_clip(tmp_path, content, decoder):
    frames = np.concatenate([content[0]] * 3)[:90]
    info = probe_video(write_clip(tmp_path / "f30.webm", frames, fps=30))
    idx = frame_indices_at_fps(info.frame_times_s, info.duration_s, 25)
    got = decode_frames(info, idx, decoder)
    assert got.shape == (75, 3, S, S)
    assert (got - reference_process(frames[idx], S)).abs().mean() < 0.03


def test_decode_frames_convenience_and_out_of_range(clips):
    info = probe_video(clips["mp4"])
    x = decode_frames(info, np.array([0, 1, 2]), input_size=S)
    assert x.shape == (3, 3, S, S)
    assert decode_frames(info, np.array([], dtype=np.int64), input_size=S).shape == (0, 3, S, S)
    with pytest.raises(ValueError, match="frame indices"):
        decode_frames(info, np.array([N_FRAMES]), input_size=S)


def test_dali_failure_becomes_media_error_and_pipeline_recovers(tmp_path, clips, decoder):
    info = probe_video(clips["mp4"])
    with pytest.raises(MediaError, match="dali-cpu decoding failed") as err:
        list(decoder.decode(info, np.arange(4), kind=DALI_CPU))  # DALI's CPU decoder has no H.264
    assert "\n" not in str(err.value)
    x, kind = _decode_all(decoder, probe_video(clips["webm"]))  # the decoder still works afterwards
    assert kind == DALI_CPU and x.shape[0] == N_FRAMES


def test_dali_failure_on_the_first_batch_falls_back_to_pyav(clips, decoder, monkeypatch, caplog):
    """An automatically chosen DALI decoder that cannot decode the clip (say NVDEC and an H.264 4:4:4
    profile) hands the clip to PyAV; simulated with H.264 sent to DALI's CPU decoder."""
    from dali_float.media import video

    info = probe_video(clips["mp4"])
    expected, _ = _decode_all(decoder, info, kind=PYAV)
    # FrameDecoder.decode looks choose_decoder up in dali_float.media.video, not in the package.
    monkeypatch.setattr(video, "choose_decoder", lambda codec, device, colorspace=None, rotation_deg=0: DALI_CPU)
    with caplog.at_level("WARNING", logger="dali_float.media.video"):
        got, kind = _decode_all(decoder, info)
    assert kind == PYAV and torch.equal(got, expected)
    assert "decoding it with PyAV instead" in caplog.text


@pytest.mark.parametrize("replacement", ["garbage", "audio only"])
@pytest.mark.parametrize("clip", ["webm", "mp4"])
def test_file_replaced_after_probe_is_a_media_error(tmp_path, clips, content, decoder, clip, replacement):
    """webm goes through DALI's packet path, mp4 through PyAV's; both reopen the file.

    An audio-only file opens fine and has no video stream (so may random bytes: FFmpeg reads ~1 in 200
    as an .lrc subtitle file).
    """
    path = tmp_path / f"swap.{clip}"
    shutil.copy(clips[clip], path)
    info = probe_video(path)
    if replacement == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(20_000))
    else:
        write_audio(tmp_path / "voice.m4a", content[1], 16_000).replace(path)
    with pytest.raises(MediaError) as err:
        list(decoder.decode(info, np.arange(N_FRAMES)))
    assert path.name in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("suffix, codec", [(".mp4", "h264"), (".mkv", "h264"), (".webm", "vp9"),
                                           (".avi", "mjpeg")])
def test_key_frame_pieces_decode_like_the_whole_file(tmp_path, content, suffix, codec):
    """DALI gets each chunk as a small container remuxed between two key frames (DALI does not seek).

    Checked with PyAV, so also for H.264 with B-frames, which only NVDEC would get from DALI.
    """
    import io

    import av

    from dali_float.media import _VideoPackets

    frames = content[0]
    info = probe_video(write_clip(tmp_path / f"gop10{suffix}", frames, 25, video_codec=codec, gop_frames=10))
    with av.open(str(info.path)) as container:
        whole = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    packets = _VideoPackets.demux(info)
    try:
        assert packets.cuts[0] == 0 and len(packets.cuts) >= N_FRAMES // 10
        requested = np.array([3, 4, 5, 17, 18, 30, 31, 32, 33, 34, 35, 36, 37, 39, 12])
        pieces = packets.plan(requested, chunk_frames=4)
        assert np.array_equal(np.concatenate([part for _, _, part in pieces]), requested)
        for start, end, part in pieces:
            assert start <= part.min() and part.min() - start < 10  # starts at the key frame before
            blob, local = packets.remux((start, end, part))
            assert end - start < N_FRAMES  # a piece, not the whole clip
            with av.open(io.BytesIO(blob.tobytes())) as container:
                piece = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            for g, loc in zip(part, local, strict=True):
                assert np.array_equal(piece[loc], whole[g])
    finally:
        packets.close()


def test_cuda_device_without_cuda_is_a_usage_error():
    from dali_float.errors import UsageError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match="CUDA is not available"):
        FrameDecoder(S, device="cuda")


@pytest.mark.gpu
def test_gpu_decoders_match_cpu(clips):
    """On a GPU: NVDEC (dali-gpu) for H.264 and VP9, float16 CUDA tensors, close to the CPU paths."""
    gpu = FrameDecoder(S, device="cuda", chunk_frames=16, batch_chunks=2)
    cpu = FrameDecoder(S, chunk_frames=16, batch_chunks=2)
    for clip in ("mp4", "webm"):
        info = probe_video(clips[clip])
        x, kind = _decode_all(gpu, info)
        assert kind == DALI_GPU and x.is_cuda and x.dtype == torch.float16
        ref, _ = _decode_all(cpu, info, PYAV)
        assert (x.float().cpu() - ref).abs().mean() < 0.02
        idx = np.array([7, 3, 3, 39, 0])
        assert torch.equal(torch.cat(list(gpu.decode(info, idx))), x[idx])


@pytest.mark.gpu
def test_gpu_pyav_source_goes_through_the_gpu_graph(tmp_path, content):
    """AV1 (no NVDEC on Hopper): PyAV decodes on the CPU, the frames are processed on the GPU."""
    frames = content[0][:12]
    info = probe_video(write_clip(tmp_path / "av1.mkv", frames, 25, video_codec="av1"))
    gpu = FrameDecoder(S, device="cuda")
    x, kind = _decode_all(gpu, info)
    assert kind == PYAV and x.is_cuda and x.dtype == torch.float16
    ref, _ = _decode_all(FrameDecoder(S), info)
    assert (x.float().cpu() - ref).abs().max() < 0.01  # the same pixels, float16 rounding apart


# ------------------------------------------------------------------------------------------------
# Audio


def _tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x: torch.Tensor, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x.numpy()))
    return float(np.argmax(spectrum) * rate / len(x))


@pytest.mark.parametrize("rate", [16_000, 44_100, 48_000])
@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_load_audio_resamples_to_16k(tmp_path, rate, suffix):
    path = write_audio(tmp_path / f"tone{suffix}", _tone(440, 1.5, rate), rate)
    x = load_audio(path, 16_000)
    assert x.dtype == torch.float32 and x.ndim == 1
    assert abs(len(x) - 24_000) <= 1
    assert _peak_hz(x, 16_000) == pytest.approx(440, abs=2)
    assert x.abs().max() == pytest.approx(0.5, abs=0.02)


def test_load_audio_stereo_is_mixed_to_mono(tmp_path):
    tone = _tone(300, 1.0, 16_000)
    path = write_audio(tmp_path / "stereo.wav", tone, 16_000, channels=2)  # right = 0.9 x left
    x = load_audio(path, 16_000)
    np.testing.assert_allclose(x.numpy(), 0.95 * tone, atol=2e-4)


def test_trim_pad_to_frames_and_normalize():
    x = torch.arange(10, dtype=torch.float32)
    assert torch.equal(trim_to_frames(x, 2, 4), x[:8]) and torch.equal(trim_to_frames(x, 3, 4), x)
    assert torch.equal(pad_to_frames(x, 2, 4), x[:8])
    padded = pad_to_frames(x, 3, 4)
    assert len(padded) == 12 and torch.equal(padded[10:], torch.tensor([9.0, 9.0]))
    y = normalize_utterance(torch.randn(16_000) * 3 + 2)
    assert y.dtype == torch.float32
    assert abs(float(y.mean())) < 1e-5 and float(y.std(unbiased=False)) == pytest.approx(1, abs=1e-4)


def test_normalize_matches_wav2vec2_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    x = (np.random.default_rng(0).standard_normal(8000) * 0.3 + 0.1).astype(np.float32)
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, sampling_rate=16_000, return_attention_mask=False)
    expected = extractor(x, sampling_rate=16_000, return_tensors="np").input_values[0]
    np.testing.assert_allclose(normalize_utterance(torch.from_numpy(x)).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("clip", ["mp4", "webm"])
def test_prepare_clip_audio_length_and_sync(tmp_path, content, clip):
    """Exactly T * 640 samples, and a click written at frame 20 is found at sample 20 * 640."""
    frames, _ = content
    for rate in (16_000, 48_000):
        audio = np.zeros(int(N_FRAMES / 25 * rate), np.float32)
        at = int(20 / 25 * rate)
        audio[at:at + rate // 200] = 0.8  # a 5 ms click
        info = probe_video(write_clip(tmp_path / f"click{rate}.{clip}", frames, 25, audio=audio, audio_rate=rate))
        idx = frame_indices_at_fps(info.frame_times_s, info.duration_s, 25)
        x = prepare_clip_audio(info, len(idx), TIMING)
        assert x.shape == (len(idx) * 640,) and x.dtype == torch.float32
        onset = int(np.argmax(np.abs(x.numpy()) > 0.5 * float(x.abs().max())))
        assert abs(onset - 20 * 640) <= 48  # within 3 ms


def test_clip_audio_is_normalised_then_padded_in_floats_order(tmp_path, content):
    """FLOAT's order: Wav2Vec2FeatureExtractor normalises the waveform, then AudioEncoder replicate-pads it
    to T x 640 samples. A clip whose sound stops early (a short side file) shows the order: padding first
    would put the padded samples into the mean and variance."""
    from transformers import Wav2Vec2FeatureExtractor

    frames, _ = content
    video = write_clip(tmp_path / "talk.webm", frames, 25)
    short = (_tone(220, 1.0, 16_000) * np.linspace(0.2, 1.0, 16_000) + 0.1).astype(np.float32)  # 1 s of N_FRAMES/25
    write_audio(tmp_path / "talk.wav", short, 16_000)
    info = probe_video(video)
    ours = prepare_clip_audio(info, N_FRAMES, TIMING)
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, sampling_rate=16_000, return_attention_mask=False)
    normalised = torch.from_numpy(extractor(load_audio(tmp_path / "talk.wav", 16_000).numpy(), sampling_rate=16_000,
                                            return_tensors="np").input_values[0])
    expected = torch.nn.functional.pad(normalised[None, None], (0, N_FRAMES * 640 - len(normalised)),
                                       mode="replicate")[0, 0]
    assert len(normalised) < N_FRAMES * 640  # the clip really is padded
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def _float_audio_order(wave: np.ndarray, num_samples: int) -> np.ndarray:
    """FLOAT's audio order (generate.py, models/float/FLOAT.py): Wav2Vec2FeatureExtractor normalises the raw
    waveform (zero mean, unit variance), then AudioEncoder.inference replicate-pads it to T x 640 samples."""
    x = wave.astype(np.float64)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    return np.concatenate([x, np.full(num_samples - len(x), x[-1])]).astype(np.float32)


@pytest.mark.parametrize("seconds", [N_FRAMES / 25, 1.0])
def test_clip_audio_is_normalised_then_padded_as_float_does(tmp_path, content, seconds):
    """A side .wav as long as the video (nothing to pad), and one 1.0 s long under a 1.6 s video."""
    frames, _ = content
    video = write_clip(tmp_path / "talk.webm", frames, 25, audio=None)
    wave = _tone(440, seconds, 16_000) + 0.2  # an offset and a scale for the normalisation to remove
    write_audio(tmp_path / "talk.wav", wave, 16_000)
    got = prepare_clip_audio(probe_video(video), N_FRAMES, TIMING).numpy()
    raw = load_audio(tmp_path / "talk.wav", 16_000).numpy()  # the decoded samples (the .wav's 16-bit rounding)
    np.testing.assert_allclose(got, _float_audio_order(raw, N_FRAMES * 640), atol=1e-5)


def test_side_file_preferred_over_the_track(tmp_path, content):
    frames, _ = content
    video = write_clip(tmp_path / "talk.mp4", frames, 25, audio=_tone(440, 1.6, 16_000), audio_rate=16_000)
    write_audio(tmp_path / "talk.wav", _tone(1000, 1.6, 44_100), 44_100)
    info = probe_video(video)
    assert info.audio_source == tmp_path / "talk.wav"
    x = prepare_clip_audio(info, N_FRAMES, TIMING)
    assert len(x) == N_FRAMES * 640
    assert _peak_hz(x, 16_000) == pytest.approx(1000, abs=3)


def test_no_audio_anywhere_is_a_media_error(tmp_path, content):
    video = write_clip(tmp_path / "mute.webm", content[0][:30], 25, audio=None)
    info = probe_video(video)
    with pytest.raises(MediaError, match="no audio"):
        prepare_clip_audio(info, 30, TIMING)
    with pytest.raises(MediaError, match="no audio stream"):
        load_audio(video, 16_000)
    fifo = tmp_path / "voice.wav"
    os.mkfifo(fifo)
    with pytest.raises(MediaError, match="not a regular file"):  # and no hang
        load_audio(fifo, 16_000)


# ------------------------------------------------------------------------------------------------
# Segments


def test_segments_csv_rows_become_clips(tmp_path):
    from dali_float.media.segments import read_segments

    csv = tmp_path / "clips.csv"
    csv.write_text("video,start_s,end_s,clip_name\n"
                   "talks/a.mp4,0,2.5\n"
                   "# a comment line\n"
                   "\n"
                   "talks/a.mp4, 12.50 ,20,\n"
                   "b.webm,3,4.25,b_intro\n")
    clips = read_segments(csv, tmp_path)
    assert [(c.clip_id, c.path, c.span_s) for c in clips] == [
        ("b_intro", tmp_path / "b.webm", (3.0, 4.25)),
        ("talks/a.mp4#0-2.5", tmp_path / "talks/a.mp4", (0.0, 2.5)),
        ("talks/a.mp4#12.5-20", tmp_path / "talks/a.mp4", (12.5, 20.0)),  # "12.50" and "12.5" are one id
    ]


@pytest.mark.parametrize("row, words", [
    ("a.mp4,1", "found 2 column"),
    ("a.mp4,x,2", "must be seconds"),
    ("a.mp4,3,2", "0 <= start_s < end_s"),
    ("a.mp4,-1,2", "0 <= start_s < end_s"),
    ("/abs/a.mp4,0,2", "relative to --data_root"),
    ("../a.mp4,0,2", "relative to --data_root"),
    ("a.mp4,0,2\na.mp4,0.0,2.0", "already defined on line 2"),
])
def test_a_bad_segments_row_is_one_usage_error_naming_the_line(tmp_path, row, words):
    from dali_float.errors import UsageError
    from dali_float.media.segments import read_segments

    csv = tmp_path / "clips.csv"
    csv.write_text("video,start_s,end_s\n" + row + "\n")
    with pytest.raises(UsageError) as err:
        read_segments(csv, tmp_path)
    assert words in str(err.value) and f"{csv}:" in str(err.value) and "\n" not in str(err.value)


def test_a_segment_takes_its_frames_and_its_audio_from_its_span(tmp_path):
    """A 6 s clip with a click at 3.0 s; the segment [2, 4.5) s has 62 frames at 25 fps (its 63rd tick
    would lie at 4.52 s) whose frame 25 is the video's frame 75, and its click is at sample 25 x 640."""
    frames, _, _ = synth_talking_head(150, (HEIGHT, WIDTH), fps=25, seed=1)
    audio = np.zeros(6 * 16_000, np.float32)
    audio[3 * 16_000:3 * 16_000 + 80] = 0.8
    info = probe_video(write_clip(tmp_path / "long.webm", frames, 25, audio=audio, audio_rate=16_000))
    idx = clip_frame_indices(info, 25, (2.0, 4.5))
    assert len(idx) == num_frames_at_fps(2.5, 25) == 62 and idx[0] == 50 and idx[25] == 75
    np.testing.assert_array_equal(idx, np.arange(50, 112))
    wave = prepare_clip_audio(info, len(idx), TIMING, start_s=2.0)
    assert wave.shape == (62 * 640,)
    onset = int(np.argmax(np.abs(wave.numpy()) > 0.5 * float(wave.abs().max())))
    assert abs(onset - 25 * 640) <= 48  # within 3 ms
    with pytest.raises(MediaError, match="starts after the video ends"):
        clip_frame_indices(info, 25, (7.0, 8.0))
    with pytest.raises(MediaError, match="ends after the video"):
        clip_frame_indices(info, 25, (5.0, 9.0))


def test_a_segments_row_naming_a_missing_video_is_one_usage_error_naming_its_line(tmp_path):
    """Found with the rows (one stat per video), before anything is planned: the file and line, not a failed clip."""
    import re
    import subprocess
    import sys

    from dali_float import media
    from dali_float.errors import UsageError

    (tmp_path / "a.mp4").write_bytes(b"")  # there (what it holds is the run's business)
    csv = tmp_path / "clips.csv"
    csv.write_text("video,start_s,end_s\na.mp4,0,2\nsub/missing.mp4,0,2\na.mp4,2,4\n")
    line = (f"{csv}:3: the video {tmp_path / 'sub' / 'missing.mp4'} does not exist; fix that row (videos are relative "
            f"to --data_root {tmp_path}) or --data_root")
    with pytest.raises(UsageError, match=f"^{re.escape(line)}$"):
        media.discover_clips(tmp_path, csv)
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(repo / "preprocess.py"), "--data_root", str(tmp_path), "--segments",
                           str(csv), "--cache_dir", str(tmp_path / "cache"), "--crop", "center", "--no_progress"],
                          cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == f"error: {line}", done.stderr
    assert not (tmp_path / "cache").exists()
