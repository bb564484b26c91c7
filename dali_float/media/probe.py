"""Probing: demux a clip (one frame decoded, for its display turn) into a VideoInfo; one-line MediaErrors;
25 fps frame indices.

Every problem with one input file raises `MediaError` with one line (what is wrong, what to do);
PyAV/FFmpeg exceptions never escape as anything else. The helpers that turn them into MediaErrors
(`_media_errors`, `_check_readable_file`) and `_video_stream` live here and serve the video and
audio modules too.
"""
from __future__ import annotations

import contextlib
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from dali_float.errors import MediaError
from dali_float.media.files import find_side_audio

# FFmpeg decoder names that differ from the codec (descriptor) name.
_CODEC_ALIASES = {"libdav1d": "av1", "libaom-av1": "av1", "libvpx-vp9": "vp9", "libvpx": "vp8",
                  "libopenh264": "h264", "h264_cuvid": "h264", "hevc_cuvid": "hevc"}

# Exceptions PyAV/FFmpeg (and the OS underneath) raise for a bad file; each becomes a MediaError.
# (av.FFmpegError subclasses also derive from OSError/ValueError/...; listed for clarity.)
_MEDIA_EXCEPTIONS = (av.FFmpegError, OSError, EOFError, ValueError, RuntimeError, IndexError,
                     StopIteration)

# A clip whose packets end this much earlier than the container says is taken as truncated.
_TRUNCATION_TOLERANCE_S = 0.5


# --------------------------------------------------------------------------------------------------
# Probing


@dataclass(frozen=True, eq=False)
class VideoInfo:
    """What probing a clip found (demuxed packets; the first frame decoded only for its display turn).

    frame_times_s: (N,) float64, presentation time (s) of every frame, in presentation order,
        relative to the first frame (so frame_times_s[0] == 0).
    duration_s: time from the first frame to the end of the last one (last pts - first pts + the last
        frame's duration), in seconds.
    source_fps: average frame rate, N / duration_s.
    audio_source: the side .wav/.flac if present, else the clip itself when it has an audio stream,
        else None.
    start_time_s: absolute presentation time (s) of the first frame in the container's timeline
        (used to line the clip's own audio track up with its first frame).
    colorspace: the YUV matrix the stream declares (FFmpeg AVColorSpace code); see choose_decoder.
    rotation_deg: the counter-clockwise turn (0, 90, 180 or 270) that shows the frames upright, from the
        stream's display matrix (a phone held upright records landscape frames and this tag), as
        players and FFmpeg apply it. `width` and `height` are the upright frame's; decoding applies the
        turn (PyAV path, see choose_decoder), so every crop window and box is in upright pixels.
    """

    path: Path
    codec: str
    width: int
    height: int
    frame_times_s: np.ndarray
    duration_s: float
    source_fps: float
    audio_source: Path | None
    start_time_s: float = 0.0
    colorspace: int = 2  # FFmpeg AVColorSpace of the YUV data: 1 BT.709, 5/6 BT.601, 2 unspecified
    rotation_deg: int = 0

    @property
    def num_frames(self) -> int:
        return int(len(self.frame_times_s))


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


@contextlib.contextmanager
def _media_errors(path: Path, action: str, advice: str = "check the file or remove it from the data set"):
    """Turn any PyAV/FFmpeg/OS failure while `action`-ing `path` into one MediaError line."""
    try:
        yield
    except MediaError:
        raise
    except PermissionError:
        raise MediaError(f"{path}: permission denied while {action}; make it readable (chmod +r)") from None
    except FileNotFoundError:
        raise MediaError(f"{path}: file not found while {action}; check the path, or re-run discovery") from None
    except IsADirectoryError:
        raise MediaError(f"{path}: is a folder, not a media file; rename or remove it") from None
    except av.InvalidDataError as err:
        raise MediaError(f"{path}: not a readable media file ({_one_line(err)}) while {action}; "
                         f"it may be corrupt, truncated or not a video: {advice}") from None
    except _MEDIA_EXCEPTIONS as err:
        raise MediaError(f"{path}: {type(err).__name__} while {action}: {_one_line(err)}; {advice}") from None


def _video_stream(container):
    """The clip's video stream: the first one that is not a cover picture (attached_pic); or None."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


# ISO/IEC 14496-12 'mvhd'/'tkhd' matrix [a b u; c d v; x y w] of no transformation, as stored (big-endian).
_MP4_IDENTITY_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
_MP4_MATRIX_AT = {b"mvhd": (36, 48), b"tkhd": (40, 52)}  # matrix offset in the payload: version 0, version 1
_MP4_MAX_MOOV_BYTES = 64 << 20
_MATROSKA_HEADER_BYTES = 1 << 20


def _may_be_turned(path: Path, format_name: str) -> bool:
    """False when the container surely holds no display transform, so the probe need not decode a frame
    to read one (it costs ~20 ms a 1080p clip; the index holds nothing else that needs decoding).

    MP4/MOV: FFmpeg builds the display matrix from the 'mvhd' and video 'tkhd' matrices; when every one of
    them is the identity there is none. Matroska/WebM: it comes from a Projection element (ID 0x7670, with
    ProjectionPoseRoll 0x7675) in the Tracks, which precede the first Cluster. Other containers carry none.
    Anything unexpected (damaged boxes, a huge index) answers True: the decode then decides.
    """
    try:
        if "mp4" in format_name:
            return _mp4_matrices(path) != {_MP4_IDENTITY_MATRIX}
        if "matroska" in format_name:
            with open(path, "rb") as f:
                head = f.read(_MATROSKA_HEADER_BYTES)
            cluster = head.find(b"\x1f\x43\xb6\x75")
            head = head if cluster < 0 else head[:cluster]
            return b"\x76\x70" in head and b"\x76\x75" in head
    except (OSError, ValueError, IndexError, struct.error):
        return True
    return False


def _mp4_box(header: bytes, room: int) -> tuple[bytes, int, int]:
    """(type, length, header length) of the box starting with `header` (its first 8-16 bytes), with `room`
    bytes from its start to the end of its parent (a length of 0 means all of them)."""
    length, kind = struct.unpack_from(">I4s", header)
    head = 8
    if length == 1:
        length, head = struct.unpack_from(">Q", header, 8)[0], 16
    elif length == 0:
        length = room
    if length < head or length > room:
        raise ValueError("a box shorter than its header or past its parent")
    return kind, length, head


def _mp4_matrices(path: Path) -> set[bytes]:
    """The matrices of the movie header and of every track header of an MP4/MOV file, as stored."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        at = 0
        while at + 8 <= size:  # top-level boxes: find 'moov' without reading the media data
            f.seek(at)
            kind, length, head = _mp4_box(f.read(16), size - at)
            if kind == b"moov":
                if length > _MP4_MAX_MOOV_BYTES:
                    raise ValueError("an index too large to read here")
                f.seek(at + head)
                moov = f.read(length - head)
                break
            at += length
        else:
            raise ValueError("no 'moov' box")
    found: set[bytes] = set()
    _mp4_walk(moov, found)
    if not found:
        raise ValueError("no movie or track header")
    return found


def _mp4_walk(data: bytes, found: set[bytes]) -> None:
    at = 0
    while at + 8 <= len(data):
        kind, length, head = _mp4_box(data[at:at + 16], len(data) - at)
        payload = data[at + head:at + length]
        if kind == b"trak":
            _mp4_walk(payload, found)
        elif kind in _MP4_MATRIX_AT:
            offset = _MP4_MATRIX_AT[kind][payload[0] == 1]
            found.add(payload[offset:offset + 36])
        at += length


def _first_frame_rotation(stream, packet: av.Packet | None) -> int | None:
    """The display rotation of the first frame `packet` (None: flush) gives: 0, 90, 180 or 270 degrees
    counter-clockwise (FFmpeg's av_display_rotation_get, rounded to a quarter turn as FFmpeg's own
    autorotation does; mirroring is not applied), or None while the decoder has given no frame yet.
    A packet the decoder refuses counts as no rotation: decoding reports the damage with its own line."""
    try:
        frames = stream.codec_context.decode(packet)
    except (av.FFmpegError, ValueError):
        return 0
    if not frames:
        return None if packet is not None else 0
    return int(round(frames[0].rotation / 90.0)) % 4 * 90


def _codec_name(stream: av.video.stream.VideoStream) -> str:
    context = stream.codec_context
    if context is None or context.codec is None:  # FFmpeg has no decoder for this stream's codec tag
        raise MediaError(f"{stream.container.name}: unsupported video codec (tag {stream.codec_tag!r}); "
                         f"re-encode it (e.g. ffmpeg -i in -c:v libx264 out.mp4) or remove it")
    name = context.codec.name
    return _CODEC_ALIASES.get(name, name)


def _check_readable_file(path: Path, action: str) -> None:
    """MediaError unless `path` is a non-empty regular file we may read (checked before FFmpeg opens it)."""
    with _media_errors(path, action):
        st = path.stat()
    if stat.S_ISDIR(st.st_mode):
        raise MediaError(f"{path}: is a folder, not a media file; rename or remove it")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or stream forever
        raise MediaError(f"{path}: not a regular file (a pipe, socket or device); remove it from the data set")
    if st.st_size == 0:
        raise MediaError(f"{path}: file is empty (0 bytes); re-copy or re-encode it, or remove it")
    if not os.access(path, os.R_OK):
        raise MediaError(f"{path}: permission denied while {action}; make it readable (chmod +r)")


def probe_video(path: Path) -> VideoInfo:
    """Demux `path` (decoding only the first frame, for its display turn) and describe its video stream;
    MediaError for anything unusable.

    Detected: missing/unreadable file, zero bytes, not a media container (e.g. text renamed .mp4),
    no video stream, no frames, an MP4 whose index is cut off, a file whose packets stop well before
    the duration its header declares or whose last packet is cut (truncated download).
    """
    path = Path(path)
    _check_readable_file(path, "probing")

    with _media_errors(path, "probing"), av.open(str(path), metadata_errors="ignore") as container:
        stream = _video_stream(container)
        if stream is None:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
            raise MediaError(f"{path}: has no video stream (found: {kinds}); remove it or give the video file")
        if stream.codec_context is None:  # FFmpeg knows no decoder for this codec (tag)
            raise MediaError(f"{path}: its video codec is unknown to FFmpeg (no decoder); re-encode it "
                             f"(e.g. ffmpeg -i in -c:v libx264 out.mp4) or remove it")
        codec = _codec_name(stream)
        width, height = stream.codec_context.width, stream.codec_context.height
        colorspace = int(stream.codec_context.colorspace)
        tb = stream.time_base
        pts: list[int] = []
        last_duration = 0
        corrupt = 0
        end_s = -math.inf  # end of the latest packet over all streams (s)
        demuxed = 0  # video packets including empty ones (AVI marks dropped frames with those)
        # The display turn, read from the first decoded frame's display matrix where there may be one.
        rotation: int | None = None if _may_be_turned(path, container.format.name) else 0
        for packet in container.demux():
            if packet.stream.index == stream.index and (packet.size or packet.dts is not None):
                demuxed += 1
            if packet.size == 0 or packet.is_discard:
                continue
            t = packet.pts if packet.pts is not None else packet.dts
            if t is not None and packet.time_base is not None:
                end_s = max(end_s, float((t + (packet.duration or 0)) * packet.time_base))
            if packet.stream.index != stream.index:
                continue
            corrupt += bool(packet.is_corrupt)
            if rotation is None:
                rotation = _first_frame_rotation(stream, packet)
            if t is None:
                raise MediaError(f"{path}: video packets carry no timestamps; remux it "
                                 f"(ffmpeg -i in -c copy out.mkv) or re-encode it")
            pts.append(t)
            last_duration = packet.duration or 0
        declared_frames = stream.frames
        declared_s = container.duration / av.time_base if container.duration else None
        start_s = float(container.start_time / av.time_base) if container.start_time is not None else 0.0
        has_audio = bool(container.streams.audio)
        if rotation is None:  # the decoder held every frame back until the end (or decoded none)
            rotation = _first_frame_rotation(stream, None)

    if not pts:
        raise MediaError(f"{path}: the video stream has no frames; re-encode or remove it")
    if width <= 0 or height <= 0:
        raise MediaError(f"{path}: video stream has no frame size ({width}x{height}); re-encode it")
    truncated_hint = "the file looks truncated (incomplete copy or download); re-copy or re-encode it"
    if corrupt:
        raise MediaError(f"{path}: {corrupt} corrupt video packet(s): {truncated_hint}")
    if declared_frames and demuxed < declared_frames:
        raise MediaError(f"{path}: header declares {declared_frames} frames but only {len(pts)} are "
                         f"present: {truncated_hint}")
    # Without a frame count (Matroska/WebM), compare the declared duration with where the data ends.
    if (not declared_frames and declared_s is not None and end_s > -math.inf
            and end_s - start_s < declared_s - _TRUNCATION_TOLERANCE_S):
        raise MediaError(f"{path}: header declares {declared_s:.2f} s but the data ends at "
                         f"{end_s - start_s:.2f} s: {truncated_hint}")

    ticks = np.sort(np.asarray(pts, dtype=np.int64))  # decode order -> presentation order (B-frames)
    if np.any(np.diff(ticks) == 0):
        raise MediaError(f"{path}: two video frames share a timestamp; remux or re-encode it")
    frame_times = (ticks - ticks[0]).astype(np.float64) * float(tb)
    if last_duration <= 0 and len(ticks) > 1:  # no packet duration: assume the median frame interval
        last_duration = int(np.median(np.diff(ticks)))
    duration_s = float(frame_times[-1] + last_duration * float(tb))
    if duration_s <= 0:
        duration_s = 1.0 / float(stream.guessed_rate or stream.average_rate or 25)
    side = find_side_audio(path)
    if rotation in (90, 270):
        width, height = height, width
    return VideoInfo(
        path=path, codec=codec, width=int(width), height=int(height), frame_times_s=frame_times,
        duration_s=duration_s, source_fps=len(frame_times) / duration_s,
        audio_source=side if side is not None else (path if has_audio else None),
        start_time_s=float(ticks[0] * tb), colorspace=colorspace, rotation_deg=rotation or 0,
    )


# --------------------------------------------------------------------------------------------------
# 25 fps


def num_frames_at_fps(duration_s: float, fps: float) -> int:
    """T = floor(duration_s * fps + 0.05): the whole 1/fps ticks that fit in the clip.

    The 0.05 frame (2 ms at 25 fps) absorbs timestamps rounded to the container's clock (Matroska/WebM
    store milliseconds, so a 30 fps clip can end 1 ms early), so a clip of exactly N frames at `fps`
    gives T = N; a clip a quarter frame short of N frames gives N - 1.
    """
    return max(int(math.floor(duration_s * fps + 0.05)), 0)


def frame_indices_at_fps(frame_times_s: np.ndarray, duration_s: float, fps: float, start_s: float = 0.0,
                         end_s: float | None = None) -> np.ndarray:
    """For each tick start_s + k / fps (k = 0..T-1), the index of the nearest source frame.

    frame_times_s: (N,) presentation times (s), non-decreasing, first at 0 (VideoInfo.frame_times_s).
    start_s, end_s: the span of the clip in the video (a segment); default the whole video. T =
    num_frames_at_fps(min(end_s, duration_s) - start_s, fps).
    Ties go to the earlier frame. Returns (T,) int64, non-decreasing, each in [0, N).
    A 25 fps source maps to 0..N-1; 30 fps for 3 s gives 75 indices; variable frame rate works the same.
    """
    times = np.asarray(frame_times_s, dtype=np.float64)
    if times.ndim != 1 or len(times) == 0:
        raise ValueError("frame_times_s must be a non-empty 1-D array")
    end = duration_s if end_s is None else min(end_s, duration_s)
    count = num_frames_at_fps(end - start_s, fps)
    ticks = start_s + np.arange(count, dtype=np.float64) / fps
    after = np.searchsorted(times, ticks, side="left")  # first frame at or after the tick
    after = np.clip(after, 0, len(times) - 1)
    before = np.clip(after - 1, 0, len(times) - 1)
    # Earlier frame wins ties; 1e-9 s tolerance so float noise in k/fps does not break ties.
    take_before = (ticks - times[before]) <= (times[after] - ticks) + 1e-9
    return np.where(take_before, before, after).astype(np.int64)


def clip_frame_indices(info: VideoInfo, fps: float, span_s: tuple[float, float] | None = None) -> np.ndarray:
    """The source frame of each of a clip's frames at `fps`: the whole video, or the segment
    [start, end) seconds of it. MediaError for a segment that does not fit the video (one line)."""
    if span_s is None:
        return frame_indices_at_fps(info.frame_times_s, info.duration_s, fps)
    start, end = span_s
    if start >= info.duration_s:
        raise MediaError(f"{info.path}: the segment {start:g}-{end:g} s starts after the video ends "
                         f"({info.duration_s:.2f} s); fix its row in the --segments file")
    if end > info.duration_s + _TRUNCATION_TOLERANCE_S:
        raise MediaError(f"{info.path}: the segment {start:g}-{end:g} s ends after the video "
                         f"({info.duration_s:.2f} s); fix its row in the --segments file")
    return frame_indices_at_fps(info.frame_times_s, info.duration_s, fps, start, end)
