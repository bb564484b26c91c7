"""Writing rendered video: an H.264 MP4 with the speech muxed in as AAC (PyAV), frames streamed in chunks.

    with Mp4Writer(out, size=512, fps=25, audio=wave, audio_rate=44_100) as writer:
        for frames in batches:          # (n, 3, S, S) float in [-1, 1], any device
            writer.write(frames)

The file appears under its name only when it is complete (written to a temporary sibling, renamed on
close); a failure leaves no half-written MP4. The audio track holds exactly the samples given (the
container's edit list hides the AAC encoder's priming), so its duration is the input's.
"""
from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np
import torch

from dali_float.atomic import TMP_MARKER
from dali_float.errors import UsageError

log = logging.getLogger(__name__)

VIDEO_CODEC = "libx264"
PIXEL_FORMAT = "yuv420p"  # what every player decodes (needs even sides)
CRF = 18  # libx264 constant quality: visually lossless for these frames
AUDIO_CODEC = "aac"
AUDIO_BIT_RATE = 128_000  # bits/s, mono or stereo speech
_AUDIO_BLOCK = 1024  # samples per frame handed to the encoder (AAC's frame size)


def to_uint8_frames(images: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) float in [-1, 1] (clamped) -> (n, H, W, 3) uint8 RGB on the host (one copy)."""
    pixels = ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def check_mp4_path(path: Path) -> Path:
    """The output path, which must end in .mp4 (UsageError otherwise: checked before any work is done)."""
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise UsageError(f"--out {path}: the video is written as MP4; name it *.mp4")
    return path


def mux_audio(container: av.container.OutputContainer, stream: av.audio.stream.AudioStream, audio: np.ndarray,
              rate: int) -> None:
    """Encode a whole track into `stream` and mux it, encoder flushed: (M,) mono or (channels, M) float32
    in [-1, 1] at `rate` Hz. PyAV re-blocks to the encoder's frame size; pts count samples."""
    planes = np.atleast_2d(np.asarray(audio, dtype=np.float32))
    layout = {1: "mono", 2: "stereo"}[len(planes)]
    for start in range(0, planes.shape[1], _AUDIO_BLOCK):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes[:, start:start + _AUDIO_BLOCK]),
                                           format="fltp", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


class Mp4Writer:
    """An MP4 being written: H.264 video of `size` x `size` at `fps`, optional mono AAC audio.

    audio: (M,) float32 in [-1, 1] at `audio_rate` Hz (the whole track, written first), or None.
    crf, preset: libx264's quality and speed. Use as a context manager, or call close().
    """

    def __init__(self, path: Path, size: int, fps: int, audio: np.ndarray | None = None, audio_rate: int = 16_000,
                 crf: int = CRF, preset: str = "medium") -> None:
        self.path = check_mp4_path(path)
        if size % 2:
            raise UsageError(f"H.264 ({PIXEL_FORMAT}) needs even frame sides, got {size}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.size, self.fps, self.frames = size, fps, 0
        self._tmp = self.path.with_name(f"{self.path.stem}{TMP_MARKER}{os.getpid()}.mp4")
        self._container = av.open(str(self._tmp), "w")
        try:
            self._video = self._container.add_stream(VIDEO_CODEC, rate=fps)
            self._video.width = self._video.height = size
            self._video.pix_fmt = PIXEL_FORMAT
            self._video.options = {"crf": str(crf), "preset": preset}
            self._video.codec_context.time_base = Fraction(1, fps)
            if audio is not None:
                self._write_audio(np.asarray(audio, dtype=np.float32).reshape(-1), int(audio_rate))
        except BaseException:
            self._abort()
            raise

    def _write_audio(self, audio: np.ndarray, rate: int) -> None:
        stream = self._container.add_stream(AUDIO_CODEC, rate=rate)
        stream.layout = "mono"
        stream.bit_rate = AUDIO_BIT_RATE
        mux_audio(self._container, stream, audio, rate)

    def write(self, images: torch.Tensor | np.ndarray) -> None:
        """Append frames: (n, 3, S, S) float in [-1, 1] (a tensor, any device) or (n, S, S, 3) uint8 RGB."""
        pixels = to_uint8_frames(images) if isinstance(images, torch.Tensor) else np.asarray(images)
        if pixels.ndim != 4 or pixels.shape[1:] != (self.size, self.size, 3) or pixels.dtype != np.uint8:
            raise ValueError(f"frames must be (n, {self.size}, {self.size}, 3) uint8 or (n, 3, {self.size}, "
                             f"{self.size}) float, got {pixels.shape} {pixels.dtype}")
        for rgb in pixels:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = self.frames
            self.frames += 1
            self._container.mux(self._video.encode(frame))

    def close(self) -> Path:
        """Flush the encoders, finish the file and move it to `path`; returns the path."""
        try:
            self._container.mux(self._video.encode(None))
            self._container.close()
        except BaseException:
            self._abort()
            raise
        os.replace(self._tmp, self.path)
        log.debug("wrote %s: %d frames", self.path, self.frames)
        return self.path

    def _abort(self) -> None:
        try:
            self._container.close()
        except Exception:  # noqa: BLE001 - already failing: the first error is the one to show
            pass
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self._abort()
