"""Media: find clips (videos or segments of them), probe them, pick 25 fps frames, frame them (one crop
per clip), decode + crop/resize them, load audio.

Preprocessing (batched, DALI) and the per-sample naive loader both go through this package, so both
see exactly the same pixels and audio samples:

    info = probe_video(path)                                   # demux (and the first frame's turn)
    idx = clip_frame_indices(info, 25, span_s)                 # T source frame indices (of a segment)
    crop = ClipFramer("face").decide(info, decoder, idx, 25, 512)   # FLOAT's square around the face
    for chunk in FrameDecoder(512).decode(info, idx, window=crop.window): ...   # (n, 3, 512, 512) in [-1, 1]
    audio = prepare_clip_audio(info, len(idx), timing, start_s)   # (T * 640,) float32, normalised

Decoding: DALI decodes VP8/VP9/MJPEG on the CPU and (NVDEC) H.264/HEVC/VP8/VP9/MPEG-4/MJPEG on a GPU;
everything else (H.264 on a machine without a GPU, AV1, ...) is decoded by PyAV and fed into the same
DALI graph through `fn.external_source`. Both sources share `process_frames` (the clip's crop window,
zero-padded past the frame, antialiased linear resize, normalisation to [-1, 1], FCHW).

Every problem with one input file raises `MediaError` with one line (what is wrong, what to do);
PyAV/FFmpeg/DALI exceptions never escape as anything else.

Submodules (every public name is re-exported here, so `media.X` works for all of them):
  files   VIDEO_EXTENSIONS, AUDIO_SIDE_EXTENSIONS, discover_clips, discover_videos (scan_videos: as strings;
          each folder read once, an unlistable one is an EnvironmentProblem), find_side_audio
  segments  ClipSpec, the --segments CSV (read_segments, segment ids); below files (files imports it, never
          the other way)
  probe   VideoInfo, probe_video (demux; one frame decoded for its display turn), the one-line MediaError
          helpers (`_media_errors`, `_check_readable_file`), codec names, 25 fps indices (num_frames_at_fps,
          frame_indices_at_fps, clip_frame_indices)
  video   decoder choice (DALI_GPU, DALI_CPU, PYAV, choose_decoder), crop windows (Window, FULL_FRAME,
          center_square_window), the DALI graph (process_frames), FrameDecoder, its key-frame pieces
          (_VideoPackets) and PyAV source (_PyavCursor: seeks to a segment), get_frame_decoder, decode_frames
  framing crop modes (CROP_MODES), one crop per clip (ClipFramer, CropDecision), the fingerprint's part
  audio   load_audio, trim_to_frames, pad_to_frames, normalize_utterance, prepare_clip_audio, clip_waveform,
          native_rate, frames_for_samples, prepare_speech (a speech file for rendering)
  writer  Mp4Writer (H.264 + AAC MP4 written chunk by chunk), check_mp4_path, to_uint8_frames
A test that replaces a function must patch it in the submodule that looks it up (e.g. `video.choose_decoder`).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Every public name, by the submodule that defines it. They are imported on first use (PEP 562): video,
# framing, audio and writer import torch, DALI and PyAV, and `preprocess.py status` needs only `files`.
_SUBMODULE = {
    **dict.fromkeys(("clip_waveform", "fit_to_frames", "frames_for_samples", "load_audio", "native_rate",
                     "normalize_utterance", "pad_to_frames", "prepare_clip_audio", "prepare_speech",
                     "TrackMemo", "trim_to_frames"), "audio"),
    **dict.fromkeys(("AUDIO_SIDE_EXTENSIONS", "VIDEO_EXTENSIONS", "discover_clips", "discover_videos",
                     "find_side_audio", "scan_videos"), "files"),
    "ClipSpec": "segments",
    **dict.fromkeys(("VideoInfo", "clip_frame_indices", "frame_indices_at_fps", "num_frames_at_fps", "probe_video"),
                    "probe"),
    **dict.fromkeys(("DALI_CPU", "DALI_CPU_CODECS", "DALI_GPU", "FULL_FRAME", "NVDEC_CODECS", "PYAV", "FrameDecoder",
                     "Window", "_VideoPackets", "center_square_window", "choose_decoder", "decode_frames",
                     "get_frame_decoder", "process_frames"), "video"),
    **dict.fromkeys(("CROP_MODES", "ClipFramer", "CropDecision", "framing_identity"), "framing"),
    **dict.fromkeys(("Mp4Writer", "check_mp4_path", "to_uint8_frames"), "writer"),
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULE:
        return getattr(importlib.import_module(f"{__name__}.{_SUBMODULE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from dali_float.media.audio import (clip_waveform, fit_to_frames, frames_for_samples, load_audio, native_rate,
                                       normalize_utterance, pad_to_frames, prepare_clip_audio, prepare_speech,
                                       TrackMemo, trim_to_frames)
    from dali_float.media.files import (AUDIO_SIDE_EXTENSIONS, VIDEO_EXTENSIONS, discover_clips, discover_videos,
                                       find_side_audio, scan_videos)
    from dali_float.media.segments import ClipSpec
    from dali_float.media.probe import VideoInfo, clip_frame_indices, frame_indices_at_fps, num_frames_at_fps, probe_video
    from dali_float.media.video import (
        DALI_CPU, DALI_CPU_CODECS, DALI_GPU, FULL_FRAME, NVDEC_CODECS, PYAV, FrameDecoder, Window, _VideoPackets,
        center_square_window, choose_decoder, decode_frames, get_frame_decoder, process_frames,
    )
    from dali_float.media.framing import CROP_MODES, ClipFramer, CropDecision, framing_identity
    from dali_float.media.writer import Mp4Writer, check_mp4_path, to_uint8_frames

__all__ = [
    # files
    "VIDEO_EXTENSIONS", "AUDIO_SIDE_EXTENSIONS", "discover_clips", "discover_videos", "find_side_audio", "scan_videos",
    # segments
    "ClipSpec",
    # probe
    "VideoInfo", "probe_video", "num_frames_at_fps", "frame_indices_at_fps", "clip_frame_indices",
    # video
    "DALI_GPU", "DALI_CPU", "PYAV", "NVDEC_CODECS", "DALI_CPU_CODECS", "choose_decoder", "process_frames",
    "FrameDecoder", "get_frame_decoder", "decode_frames", "Window", "FULL_FRAME", "center_square_window",
    # framing
    "CROP_MODES", "ClipFramer", "CropDecision", "framing_identity",
    # audio
    "load_audio", "trim_to_frames", "pad_to_frames", "normalize_utterance", "prepare_clip_audio", "fit_to_frames",
    "frames_for_samples", "prepare_speech", "clip_waveform", "native_rate", "TrackMemo",
    # writer
    "Mp4Writer", "check_mp4_path", "to_uint8_frames",
    # private, for tests (tests/test_media.py)
    "_VideoPackets",
]
