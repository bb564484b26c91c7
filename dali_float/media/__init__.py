"""Media: find clips, probe them, pick 25 fps frames, decode + crop/resize them, load audio.

Preprocessing (batched, DALI) and the per-sample naive loader both go through this package, so both
see exactly the same pixels and audio samples:

    info = probe_video(path)                                   # demux only, no decoding
    idx = frame_indices_at_fps(info.frame_times_s, info.duration_s, 25)   # T source frame indices
    for chunk in FrameDecoder(512).decode(info, idx): ...      # (n, 3, 512, 512) in [-1, 1]
    audio = prepare_clip_audio(info, len(idx), timing)         # (T * 640,) float32, normalised

Decoding: DALI decodes VP8/VP9/MJPEG on the CPU and (NVDEC) H.264/HEVC/VP8/VP9/MPEG-4/MJPEG on a GPU;
everything else (H.264 on a machine without a GPU, AV1, ...) is decoded by PyAV and fed into the same
DALI graph through `fn.external_source`. Both sources share `process_frames` (centre square crop,
antialiased linear resize, normalisation to [-1, 1], FCHW).

Every problem with one input file raises `MediaError` with one line (what is wrong, what to do);
PyAV/FFmpeg/DALI exceptions never escape as anything else.

Submodules (every public name is re-exported here, so `media.X` works for all of them):
  files   VIDEO_EXTENSIONS, AUDIO_SIDE_EXTENSIONS, discover_videos (scan_videos: as strings), find_side_audio
  probe   VideoInfo, probe_video (demux only), the one-line MediaError helpers (`_media_errors`,
          `_check_readable_file`), codec names, 25 fps indices (num_frames_at_fps, frame_indices_at_fps)
  video   decoder choice (DALI_GPU, DALI_CPU, PYAV, choose_decoder), the DALI graph (process_frames),
          FrameDecoder, its key-frame pieces (_VideoPackets) and PyAV source, get_frame_decoder,
          decode_frames
  audio   load_audio, trim_to_frames, pad_to_frames, normalize_utterance, prepare_clip_audio
A test that replaces a function must patch it in the submodule that looks it up (e.g. `video.choose_decoder`).
"""
from __future__ import annotations

from dali_float.media.audio import load_audio, normalize_utterance, pad_to_frames, prepare_clip_audio, trim_to_frames
from dali_float.media.files import (AUDIO_SIDE_EXTENSIONS, VIDEO_EXTENSIONS, ClipSpec, discover_clips, discover_videos,
                                   find_side_audio, scan_videos)
from dali_float.media.probe import VideoInfo, clip_frame_indices, frame_indices_at_fps, num_frames_at_fps, probe_video
from dali_float.media.video import (
    DALI_CPU, DALI_CPU_CODECS, DALI_GPU, FULL_FRAME, NVDEC_CODECS, PYAV, FrameDecoder, Window, _VideoPackets,
    center_square_window, choose_decoder, decode_frames, get_frame_decoder, process_frames,
)
from dali_float.media.framing import CROP_MODES, ClipFramer, CropDecision, framing_identity

__all__ = [
    # files
    "VIDEO_EXTENSIONS", "AUDIO_SIDE_EXTENSIONS", "ClipSpec", "discover_clips", "discover_videos", "find_side_audio",
    "scan_videos",
    # probe
    "VideoInfo", "probe_video", "num_frames_at_fps", "frame_indices_at_fps", "clip_frame_indices",
    # video
    "DALI_GPU", "DALI_CPU", "PYAV", "NVDEC_CODECS", "DALI_CPU_CODECS", "choose_decoder", "process_frames",
    "FrameDecoder", "get_frame_decoder", "decode_frames", "Window", "FULL_FRAME", "center_square_window",
    # framing
    "CROP_MODES", "ClipFramer", "CropDecision", "framing_identity",
    # audio
    "load_audio", "trim_to_frames", "pad_to_frames", "normalize_utterance", "prepare_clip_audio",
    # private, for tests (tests/test_media.py)
    "_VideoPackets",
]
