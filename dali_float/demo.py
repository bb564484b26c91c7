"""The built-in demo corpus: small synthetic talking heads whose mouth follows their speech.

Each clip shows a drawn face (skin ellipse, hair, eyes that blink, a head that sways a little) and a
mouth whose opening follows the loudness envelope of a syllable-like signal (a voiced harmonic carrier
with a formant bump plus breath noise, syllables of random length and pauses from a seeded RNG). So
audio and motion really are related, and a model trained on the corpus has something to learn.

Clips are encoded with real codecs through PyAV (the FFmpeg bundled in the `av` wheel):
H.264 (libx264) + AAC in `.mp4`, VP9 (libvpx-vp9) + Opus (libopus) in `.webm`. They are laid out
RAVDESS-style, `Actor_AA/01-01-EE-01-01-01-AA.<ext>` (EE = emotion code 01..08, AA = actor), so
`--emotion filename` works on the demo too.

`write_clip` and `synth_talking_head` are public: tests of other modules build their own clips with them
(30 fps, variable frame rate, no audio, ...).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np
from av.codec.context import Flags

from dali_float.atomic import create_folder_once
from dali_float.media.writer import mux_audio
from dali_float.paths import DEMO_VERSION, demo_corpus_dir

log = logging.getLogger(__name__)

# Where the mouth is, as fractions of the centre square of a frame (rows y0:y1, columns x0:x1):
# the middle of the mouth, which stays dark-lipped-or-open over the whole head sway.
# Tests read pixels there (after the centre-square crop dali_float.media applies) to check lip motion.
MOUTH_BOX_REL: tuple[float, float, float, float] = (0.665, 0.735, 0.44, 0.56)

# Encoder names per codec (FFmpeg names). libx264 and libvpx-vp9 are the ones the PyAV wheel bundles.
_VIDEO_ENCODERS = {"h264": "libx264", "vp9": "libvpx-vp9", "vp8": "libvpx", "mjpeg": "mjpeg",
                   "mpeg4": "mpeg4", "av1": "libsvtav1"}
_AUDIO_ENCODERS = {"aac": "aac", "opus": "libopus", "flac": "flac", "pcm_s16le": "pcm_s16le",
                   "mp3": "libmp3lame"}
_DEFAULT_CODECS = {  # container suffix -> (video codec, audio codec)
    ".mp4": ("h264", "aac"), ".mov": ("h264", "aac"), ".mkv": ("h264", "opus"),
    ".webm": ("vp9", "opus"), ".avi": ("mjpeg", "mp3"),
}
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
_AVCOL_SPC_BT709 = 1  # FFmpeg AVColorSpace
# libx264 of the PyAV wheel with its SIMD code gave different bytes for identical input in 2-15% of
# encodes (one thread, same process; it looks like a read of uninitialised memory; overriding the
# B-frame count made it worse). Its plain C code: 300 of 300 identical, ~2x slower on these tiny clips.
_X264_PARAMS = "asm=0"


# --------------------------------------------------------------------------------------------------
# Writing clips


def write_clip(
    path: Path,
    frames: np.ndarray,
    fps: float = 25.0,
    *,
    timestamps_s: Sequence[float] | np.ndarray | None = None,
    audio: np.ndarray | None = None,
    audio_rate: int = 16_000,
    video_codec: str | None = None,
    audio_codec: str | None = None,
    quality: int | None = None,
    gop_frames: int = 50,
    colorspace: str | None = None,
    x264_preset: str = "medium",
    display_rotation_deg: int = 0,
) -> Path:
    """Encode `frames` (N, H, W, 3) uint8 RGB (and optional mono `audio`) into a media file.

    fps: nominal frame rate (frames/s); frame k is shown at k / fps unless `timestamps_s` is given.
    timestamps_s: N presentation times in seconds, strictly increasing (variable frame rate); they are
        rounded to the container's time base (1 ms for .webm/.mkv, 1/90000 s otherwise).
    audio: (M,) float32 in [-1, 1] at `audio_rate` Hz, or None for a clip without an audio stream.
    video_codec / audio_codec: FFmpeg codec names ("h264", "vp9", "vp8", "mjpeg", "mpeg4"; "aac", "opus",
        "flac", "pcm_s16le", "mp3"); defaults follow the suffix (.mp4 -> h264 + aac, .webm -> vp9 + opus).
    quality: CRF for h264 (default 18) and vp9/vp8 (default 24); ignored by other encoders.
    gop_frames: key frame interval in frames (short, so seeking decoders get exercised).
    colorspace: None (untagged, BT.601 matrix, what FFmpeg assumes) or "bt709" (converted with the
        BT.709 matrix and tagged so).
    x264_preset: libx264's speed preset (e.g. "veryfast" for large test frames: still B-frames).
    display_rotation_deg: a display matrix turning the frames this many degrees counter-clockwise when
        shown (what a phone records); the frames are stored as given.

    Single-threaded encoders, FFmpeg's bitexact flags and libx264 without its SIMD code make the bytes
    reproducible for a given PyAV/FFmpeg build. H.264 and (4:2:0) VP9 need even widths and heights.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (N, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    n, height, width, _ = frames.shape
    suffix = path.suffix.lower()
    default_video, default_audio = _DEFAULT_CODECS.get(suffix, ("h264", "aac"))
    video_codec = video_codec or default_video
    audio_codec = audio_codec or default_audio
    if timestamps_s is not None:
        timestamps_s = np.asarray(timestamps_s, dtype=np.float64)
        if timestamps_s.shape != (n,) or np.any(np.diff(timestamps_s) <= 0):
            raise ValueError("timestamps_s must hold one strictly increasing time per frame")
    if colorspace not in (None, "bt709"):
        raise ValueError(f"colorspace must be None or 'bt709', got {colorspace!r}")
    if audio is not None and audio_codec == "opus" and audio_rate not in _OPUS_RATES:
        raise ValueError(f"Opus encodes {_OPUS_RATES} Hz only, not {audio_rate}; resample or pick aac")

    # Matroska stores milliseconds; MP4/MOV a finer clock; AVI counts frames (constant rate only).
    if suffix == ".avi":
        if timestamps_s is not None:
            raise ValueError("AVI has no per-frame timestamps; write a variable frame rate clip as .mp4/.mkv")
        tick = 1 / Fraction(fps).limit_denominator(1001)
    else:
        tick = Fraction(1, 1000) if suffix in (".webm", ".mkv") else Fraction(1, 90_000)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as container:
        vstream = container.add_stream(_VIDEO_ENCODERS.get(video_codec, video_codec),
                                       rate=Fraction(fps).limit_denominator(1001))
        vstream.width, vstream.height = width, height
        vstream.pix_fmt = "yuvj420p" if video_codec == "mjpeg" else "yuv420p"
        vstream.gop_size = gop_frames
        vstream.thread_count = 1  # reproducible bytes: multi-threaded encoders depend on the core count
        vstream.codec_context.flags |= Flags.bitexact
        vstream.time_base = tick
        vstream.codec_context.time_base = tick
        if colorspace == "bt709":
            vstream.codec_context.colorspace = _AVCOL_SPC_BT709
        if display_rotation_deg:
            vstream.set_display_rotation(display_rotation_deg)
        if video_codec == "h264":
            vstream.options = {"crf": str(quality or 18), "preset": x264_preset, "x264-params": _X264_PARAMS}
        elif video_codec in ("vp9", "vp8"):
            vstream.bit_rate = 0  # constant quality mode
            vstream.options = {"crf": str(quality or 24), "deadline": "good", "cpu-used": "4",
                               "row-mt": "0", "auto-alt-ref": "1" if video_codec == "vp9" else "0"}
        astream = None
        if audio is not None:
            astream = container.add_stream(_AUDIO_ENCODERS.get(audio_codec, audio_codec), rate=audio_rate)
            astream.layout = "mono"
            astream.codec_context.flags |= Flags.bitexact
            if audio_codec in ("aac", "opus", "mp3"):
                astream.bit_rate = 96_000

        for k in range(n):
            # RGB -> YUV here (one swscale thread; BT.709 matrix when asked), not inside the encoder.
            frame = av.VideoFrame.from_ndarray(frames[k], format="rgb24").reformat(
                format=vstream.pix_fmt, dst_colorspace="ITU709" if colorspace == "bt709" else None, threads=1)
            if colorspace == "bt709":
                frame.colorspace = _AVCOL_SPC_BT709
            seconds = timestamps_s[k] if timestamps_s is not None else k / fps
            frame.pts = int(round(seconds / tick))
            frame.time_base = tick
            container.mux(vstream.encode(frame))
        container.mux(vstream.encode(None))

        if astream is not None:
            audio = np.asarray(audio, dtype=np.float32)
            if audio.ndim != 1:
                raise ValueError(f"audio must be mono (M,), got {audio.shape}")
            mux_audio(container, astream, audio, audio_rate)
    return path


def write_audio(path: Path, audio: np.ndarray, rate: int, codec: str | None = None,
                channels: int = 1) -> Path:
    """Write an audio-only file (.wav -> pcm_s16le, .flac -> flac, .m4a/.mp4 -> aac, .webm/.opus -> opus).

    audio: (M,) float32 in [-1, 1], copied to every channel when `channels` > 1 (with a slight
    per-channel gain so stereo is not trivially identical).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    codec = codec or {".wav": "pcm_s16le", ".flac": "flac", ".webm": "opus", ".opus": "opus",
                      ".ogg": "opus"}.get(suffix, "aac")
    layout = {1: "mono", 2: "stereo"}[channels]
    audio = np.asarray(audio, dtype=np.float32)
    data = np.stack([audio * (1.0 - 0.1 * c) for c in range(channels)])
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(_AUDIO_ENCODERS.get(codec, codec), rate=rate)
        stream.layout = layout
        stream.codec_context.flags |= Flags.bitexact
        mux_audio(container, stream, data, rate)
    return path


# --------------------------------------------------------------------------------------------------
# Synthesis


def _syllable_envelope(num_samples: int, rate: int, rng: np.random.Generator, tempo: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Loudness envelope in [0, 1] (num_samples,) and a per-sample formant frequency (Hz).

    Syllables last 120-280 ms with 30-150 ms gaps (about 3-6 syllables/s), and now and then a
    pause of 250-600 ms; `tempo` > 1 speeds everything up.
    """
    env = np.zeros(num_samples, np.float64)
    formant = np.full(num_samples, 500.0)
    t = rng.uniform(0.08, 0.25)
    duration = num_samples / rate
    while t < duration:
        length = rng.uniform(0.12, 0.28) / tempo
        start, stop = int(t * rate), min(int((t + length) * rate), num_samples)
        if stop > start:
            u = np.linspace(0.0, 1.0, stop - start, endpoint=False)
            env[start:stop] = rng.uniform(0.55, 1.0) * np.sin(np.pi * u) ** 1.5
            formant[start:stop] = rng.uniform(300.0, 900.0)
        t += length + rng.uniform(0.03, 0.15) / tempo
        if rng.random() < 0.15:
            t += rng.uniform(0.25, 0.6)
    return env, formant


def synth_talking_head(
    num_frames: int,
    size: int | tuple[int, int],
    fps: float = 25.0,
    audio_rate: int = 16_000,
    seed: int = 0,
    *,
    speaker: int | None = None,
    tempo: float = 1.0,
    pitch: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic talking head whose mouth opening follows its speech loudness.

    size: S for S x S, or (height, width).
    speaker: seed of the appearance and voice (skin, hair, background, face size, base pitch);
        defaults to `seed`. `seed` draws the syllables, blinks and head sway.
    tempo, pitch: speech rate and pitch factors (the corpus varies them with the emotion).
    Returns:
        frames (num_frames, H, W, 3) uint8 RGB,
        audio (round(num_frames * audio_rate / fps),) float32 mono in [-1, 1] at `audio_rate` Hz,
        mouth_openness (num_frames,) float32 in [0, 1]: the mean loudness envelope over each frame's
        1/fps interval, which is exactly what the drawn mouth height follows.
    The face geometry is relative to the centre square of the frame (see MOUTH_BOX_REL).
    """
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    look = np.random.default_rng(10_000 + (seed if speaker is None else speaker))

    # --- audio: harmonic carrier with a moving formant, shaped by the syllable envelope ---
    num_samples = int(round(num_frames * audio_rate / fps))
    env, formant = _syllable_envelope(num_samples, audio_rate, rng, tempo)
    t = np.arange(num_samples) / audio_rate
    f0 = look.uniform(100.0, 210.0) * pitch * (1.0 + 0.04 * np.sin(2 * np.pi * rng.uniform(2, 5) * t))
    phase = 2 * np.pi * np.cumsum(f0) / audio_rate
    carrier = np.zeros(num_samples)
    for k in range(1, 13):
        fk = k * f0
        gain = (1.0 / k) * (1.0 + 2.5 * np.exp(-(((fk - formant) / 180.0) ** 2)))
        carrier += np.where(fk < audio_rate / 2 - 200, gain, 0.0) * np.sin(k * phase)
    carrier /= np.max(np.abs(carrier)) + 1e-9
    noise = rng.standard_normal(num_samples)
    audio = env * (0.85 * carrier + 0.12 * noise) + 0.004 * noise  # breath + a faint noise floor
    audio = (0.6 * audio / (np.max(np.abs(audio)) + 1e-9)).astype(np.float32)

    # --- per-frame motion ---
    frame_edges = np.round(np.arange(num_frames + 1) * audio_rate / fps).astype(np.int64)
    openness = np.array([env[a:b].mean() if b > a else 0.0
                         for a, b in zip(frame_edges[:-1], frame_edges[1:], strict=True)])
    openness = np.clip(openness / max(openness.max(), 1e-6), 0.0, 1.0).astype(np.float32)
    times = np.arange(num_frames) / fps
    sway_x = 0.02 * np.sin(2 * np.pi * rng.uniform(0.15, 0.35) * times + rng.uniform(0, 2 * np.pi))
    sway_y = 0.012 * np.sin(2 * np.pi * rng.uniform(0.15, 0.35) * times + rng.uniform(0, 2 * np.pi))
    eyes_open = np.ones(num_frames)
    blink_at = rng.uniform(0.5, 2.0)
    while blink_at < times[-1] + 1:  # a blink every 1.5-4 s: 5 frames closing and opening
        k = int(blink_at * fps)
        for j, v in enumerate((0.5, 0.1, 0.0, 0.3, 0.7)):
            if 0 <= k + j < num_frames:
                eyes_open[k + j] = v
        blink_at += rng.uniform(1.5, 4.0)

    # --- appearance (per speaker) ---
    skin = look.uniform([170, 110, 80], [245, 200, 170])
    hair = look.uniform([20, 10, 5], [120, 80, 50])
    bg_top, bg_bottom = look.uniform(40, 220, 3), look.uniform(20, 160, 3)
    shirt = look.uniform(30, 200, 3)
    face_rx, face_ry = look.uniform(0.26, 0.31), look.uniform(0.36, 0.41)

    side = min(height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Coordinates in units of the centre square, origin at the frame centre.
    v = (yy + 0.5 - height / 2) / side
    u = (xx + 0.5 - width / 2) / side
    px = 1.0 / side  # one pixel, for soft (anti-aliased) edges
    grad = ((yy + 0.5) / height)[..., None]
    background = (bg_top * (1 - grad) + bg_bottom * grad).astype(np.float32)

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        """Soft mask (H, W) float32 of an ellipse, ~1 px anti-aliased edge."""
        d = np.sqrt(((u - cx) / max(rx, 1e-6)) ** 2 + ((v - cy) / max(ry, 1e-6)) ** 2)
        edge = px / max(min(rx, ry), 1e-6)
        return np.clip((1.0 - d) / edge + 0.5, 0.0, 1.0)

    def paint(img: np.ndarray, mask: np.ndarray, colour) -> None:
        img += mask[..., None] * (np.asarray(colour, np.float32) - img)

    out = np.empty((num_frames, height, width, 3), np.uint8)
    for k in range(num_frames):
        cx, cy = sway_x[k], sway_y[k]
        img = background.copy()
        paint(img, ellipse(cx * 0.5, 0.62, 0.42, 0.2), shirt)  # shoulders
        paint(img, ellipse(cx, cy - 0.06, face_rx + 0.03, face_ry), hair)
        paint(img, ellipse(cx, cy + 0.02, face_rx, face_ry - 0.02), skin)
        for ex in (-0.11, 0.11):
            paint(img, ellipse(cx + ex, cy - 0.07, 0.055, 0.032), (245, 245, 240))
            lid = max(eyes_open[k], 0.0)
            paint(img, ellipse(cx + ex, cy - 0.07, 0.025, 0.026 * lid + 1e-4), (30, 25, 20))
            paint(img, ellipse(cx + ex, cy - 0.07, 0.058, 0.035 * (1 - lid) + 1e-4), skin * 0.92)
        paint(img, ellipse(cx, cy + 0.04, 0.02, 0.04), skin * 0.85)  # nose
        open_ry = 0.012 + 0.06 * float(openness[k])
        paint(img, ellipse(cx, cy + 0.20, 0.105, open_ry + 0.012), (150, 50, 60))  # lips
        paint(img, ellipse(cx, cy + 0.20, 0.085, open_ry), (45, 10, 15))  # open mouth
        out[k] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return out, audio, openness


# --------------------------------------------------------------------------------------------------
# The corpus


@dataclass(frozen=True)
class DemoClip:
    """One clip of the demo corpus (its name follows RAVDESS: 01-01-EE-01-01-01-AA)."""

    actor: int
    emotion: int  # RAVDESS code 01..08
    seconds: float
    width: int
    height: int
    fps: float
    audio_rate: int
    container: str  # ".mp4" (h264 + aac) or ".webm" (vp9 + opus)

    @property
    def relative_path(self) -> str:
        return f"Actor_{self.actor:02d}/01-01-{self.emotion:02d}-01-01-01-{self.actor:02d}{self.container}"

    @property
    def num_frames(self) -> int:
        return int(round(self.seconds * self.fps))


# Emotion -> (tempo, pitch): angry and happy fast and high, sad slow and low; purely cosmetic.
_EMOTION_PROSODY = {1: (1.0, 1.0), 2: (0.95, 0.97), 3: (1.1, 1.05), 4: (1.15, 1.1),
                    5: (1.25, 1.15), 6: (0.8, 0.9), 7: (1.2, 1.2), 8: (1.3, 1.25)}


def demo_clip_specs() -> list[DemoClip]:
    """The 12 clips: 4 actors x 3, emotions 01..08 all present, 64 s in total (2.6-8 s each).

    Even clips are .mp4 (H.264 + AAC), odd ones .webm (VP9 + Opus); sizes 96..192 px incl. a portrait
    and a landscape frame; audio at 16, 24, 44.1 and 48 kHz (Opus only takes 16/24/48 kHz);
    one clip at 30 fps so the 25 fps conversion has something to do.
    """
    seconds = (2.6, 4.0, 5.2, 6.8, 8.0, 3.2, 5.6, 7.2, 4.4, 6.0, 3.6, 7.6)
    sizes = ((128, 128), (96, 96), (112, 144), (160, 160), (192, 192), (144, 112),
             (128, 128), (160, 160), (96, 96), (128, 160), (192, 192), (112, 112))  # (width, height)
    mp4_rates, webm_rates = (16_000, 44_100, 24_000, 48_000, 44_100, 16_000), (48_000, 16_000, 24_000)
    specs = []
    for i in range(12):
        is_mp4 = i % 2 == 0
        width, height = sizes[i]
        specs.append(DemoClip(
            actor=i // 3 + 1, emotion=i % 8 + 1, seconds=seconds[i], width=width, height=height,
            fps=30.0 if i == 4 else 25.0,
            audio_rate=mp4_rates[i // 2] if is_mp4 else webm_rates[(i // 2) % 3],
            container=".mp4" if is_mp4 else ".webm",
        ))
    return specs


def generate_demo_corpus(out_dir: Path, seed: int = 0) -> list[Path]:
    """Write the demo clips under `out_dir` (created) and a `demo.json` describing them.

    Deterministic: the same seed gives the same pixels and samples; with the same PyAV/FFmpeg build
    also the same bytes. Returns the clip paths in corpus order. About 64 s of video; ~10 s on 2 cores.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, spec in enumerate(demo_clip_specs()):
        tempo, pitch = _EMOTION_PROSODY[spec.emotion]
        frames, audio, _ = synth_talking_head(
            spec.num_frames, (spec.height, spec.width), fps=spec.fps, audio_rate=spec.audio_rate,
            seed=seed * 1000 + i, speaker=seed * 1000 + spec.actor, tempo=tempo, pitch=pitch,
        )
        path = out_dir / spec.relative_path
        write_clip(path, frames, spec.fps, audio=audio, audio_rate=spec.audio_rate)
        log.debug("demo clip %s: %d frames %dx%d @ %g fps, audio %d Hz",
                  spec.relative_path, spec.num_frames, spec.width, spec.height, spec.fps, spec.audio_rate)
        paths.append(path)
    meta = {"demo_version": DEMO_VERSION, "seed": seed, "pyav": av.__version__,
            "clips": [dict(asdict(s), path=s.relative_path) for s in demo_clip_specs()]}
    (out_dir / "demo.json").write_text(json.dumps(meta, indent=1) + "\n")
    return paths


def ensure_demo_corpus() -> Path:
    """The demo corpus folder, generated on first use (into a temporary sibling, then renamed).

    The rename is atomic, so a half-written corpus is never seen under the final name, and two
    processes racing to create it both end up with one complete copy.
    """
    return create_folder_once(demo_corpus_dir(), "demo.json", generate_demo_corpus, f"the demo corpus (v{DEMO_VERSION})")


def generate_large_corpus(out_dir: Path, total_seconds: float = 120.0, size: int = 512, clip_seconds: float = 10.0,
                          video_codec: str = "h264", seed: int = 1) -> list[Path]:
    """Talking heads at `size` x `size` (H.264 + AAC by default) for decode and preprocessing
    throughput checks: ceil(total_seconds / clip_seconds) clips. Not part of the demo corpus."""
    out_dir = Path(out_dir)
    count = int(np.ceil(total_seconds / clip_seconds))
    ext = ".webm" if video_codec in ("vp8", "vp9") else ".mp4"
    paths = []
    for i in range(count):
        frames, audio, _ = synth_talking_head(int(round(clip_seconds * 25)), size, fps=25.0, seed=seed * 1000 + i)
        paths.append(write_clip(out_dir / f"speaker_{i % 4:02d}" / f"clip_{i:03d}{ext}", frames, 25.0, audio=audio,
                                audio_rate=16_000, video_codec=video_codec))
    return paths


def _parser():
    from dali_float.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m dali_float.demo", description="write a larger synthetic corpus for "
                                                                          "throughput checks")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the folder to write the clips to")
    parser.add_argument("--seconds", type=float, default=120.0, help="total video seconds")
    parser.add_argument("--size", type=int, default=512, help="frame side in pixels")
    parser.add_argument("--codec", default="h264", help="h264 | vp9 | mjpeg | ...")
    return parser


def main(argv: list[str] | None = None) -> int:
    """python -m dali_float.demo OUT_DIR [--seconds 120] [--size 512] [--codec h264]"""
    from dali_float.cli import setup_logging

    args = _parser().parse_args(argv)
    setup_logging()
    written = generate_large_corpus(args.out_dir, args.seconds, args.size, video_codec=args.codec)
    log.info("%d clips in %s", len(written), args.out_dir)
    return 0


if __name__ == "__main__":
    from dali_float.cli import run_main

    run_main(main)
