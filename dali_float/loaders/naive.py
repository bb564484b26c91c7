"""`--loader naive`: what the community training code did, kept as the baseline for parity and speed.

Every sample decodes its frames, loads and resamples the clip's audio, runs wav2vec2 over the whole
clip, runs the emotion classifier and the motion encoder on the window's frames, all again for every
sample. It needs no cache. It uses the same media functions as preprocessing (same pixels, same
samples) and the same sampling rules and batch assembly as the cached loaders, so for one
(clip, window start, reference frame) all three loaders return the same tensors.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dali_float import media
from dali_float.config import Preset
from dali_float.contract import FEATURE_DTYPE
from dali_float.errors import MediaError, UsageError
from dali_float.loaders.base import LoaderOptions
from dali_float.loaders.sampling import WindowRequest
from dali_float.loaders.torch_loader import RequestLoader
from dali_float.models import Encoders, emotion_vector, encode_motion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NaiveClip:
    clip_id: str
    info: media.VideoInfo
    num_frames: int  # at the preset's fps
    source_frames: np.ndarray  # (num_frames,) source frame index of each 25 fps frame


def discover_clips(data_root: Path, preset: Preset) -> list[NaiveClip]:
    """Every video under data_root usable for training (probed; the unusable ones logged and left out)."""
    if not Path(data_root).is_dir():
        raise UsageError(f"--data_root {data_root} is not a folder")
    fps, window = preset.timing.fps, preset.timing.window_frames
    clips, left_out = [], []
    for clip_id, path in media.discover_videos(Path(data_root)):
        try:
            info = media.probe_video(path)
        except MediaError as err:
            left_out.append(f"{clip_id} ({err})")
            continue
        t = media.num_frames_at_fps(info.duration_s, fps)
        if t < window or info.audio_source is None:
            left_out.append(f"{clip_id} ({'no audio' if info.audio_source is None else f'{t} frames'})")
            continue
        clips.append(NaiveClip(clip_id, info, t, media.frame_indices_at_fps(info.frame_times_s, info.duration_s, fps)))
    if left_out:
        log.warning("naive loader: %d clip(s) left out: %s", len(left_out), "; ".join(left_out[:3]))
    if not clips:
        raise UsageError(f"no usable video (at least {window} frames at {fps} fps, with audio) under {data_root}")
    return clips


class NaiveWindowDataset(Dataset):
    """Windows computed from the source videos on every call (the original per-sample inference)."""

    def __init__(self, clips: list[NaiveClip], preset: Preset, encoders: Encoders, device: torch.device):
        self.clips, self.preset, self.encoders, self.device = clips, preset, encoders, device

    def __len__(self) -> int:
        return len(self.clips)

    @torch.inference_mode()
    def sample(self, request: WindowRequest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(window rows (60, F + A), reference motion (F,), emotion (E,)), float16."""
        clip, timing = self.clips[request.clip_index], self.preset.timing
        s, w = request.window_start, timing.window_frames
        wanted = np.append(clip.source_frames[s:s + w], clip.source_frames[request.ref_frame])
        frames = media.decode_frames(clip.info, wanted, input_size=self.preset.motion.input_size,
                                     device=self.device)
        motion = encode_motion(self.encoders.motion, frames).motion_latents  # (61, F)
        waveform = media.prepare_clip_audio(clip.info, clip.num_frames, timing)
        audio = self.encoders.audio.encode(waveform[None].to(self.device), clip.num_frames)[0]  # whole clip
        emotion = emotion_vector(self.encoders, waveform[None], clip.info.path)
        rows = torch.cat([motion[:w].float(), audio[s:s + w].float()], dim=1).to(FEATURE_DTYPE)
        return rows, motion[w].to(FEATURE_DTYPE), torch.from_numpy(emotion).to(self.device, FEATURE_DTYPE)

    def __getitems__(self, requests: Sequence[WindowRequest]) -> dict[str, Any]:
        rows, refs, emotions = zip(*(self.sample(r) for r in requests))
        return {
            "windows": torch.stack(rows), "ref_motion": torch.stack(refs), "emotion": torch.stack(emotions),
            "window_start": torch.tensor([r.window_start for r in requests], dtype=torch.int64),
            "ref_frame": torch.tensor([r.ref_frame for r in requests], dtype=torch.int64),
            "clip_index": [r.clip_index for r in requests],
        }

    def __getitem__(self, request: WindowRequest) -> dict[str, Any]:
        return self.__getitems__([request])


class NaiveWindowLoader(RequestLoader):
    """The per-sample baseline; the same sampling stream as the torch loader for the same seed."""

    kind = "naive"

    def __init__(self, data_root: Path, preset: Preset, encoders: Encoders, options: LoaderOptions):
        clips = discover_clips(data_root, preset)
        super().__init__(preset, options, [c.clip_id for c in clips], [c.num_frames for c in clips],
                         NaiveWindowDataset(clips, preset, encoders, options.torch_device))

    @property
    def num_workers(self) -> int:
        # The encoders run where the samples are made: forked workers cannot use CUDA.
        return 0 if self.options.torch_device.type == "cuda" else self.options.num_workers

    @property
    def pin_memory(self) -> bool:
        return False  # the samples are made on the device already
