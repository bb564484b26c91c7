"""`--loader naive`: what the community training code did, kept as the baseline for parity and speed.

Every sample decodes its frames, loads and resamples the clip's audio, runs wav2vec2 over the whole
clip, runs the emotion classifier and the motion encoder on the window's frames, all again for every
sample. It needs no cache. The clip's crop (media.framing: face detection on sampled frames, or the
centred square) is decided on its first sample and remembered: a few numbers per clip, as a
community loader would keep its crop boxes. It uses the same media functions as preprocessing (same pixels, same
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
from dali_float.media.video import decoder_lock
from dali_float.config import Preset
from dali_float.contract import FEATURE_DTYPE
from dali_float.errors import ClipSkipped, MediaError, UsageError
from dali_float.loaders.base import ClipList, LoaderOptions
from dali_float.loaders.sampling import WindowRequest
from dali_float.loaders.torch_loader import RequestLoader
from dali_float.models import Encoders, build_encoders, emotion_vector, encode_motion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NaiveClip:
    clip_id: str
    info: media.VideoInfo
    num_frames: int  # at the preset's fps
    source_frames: np.ndarray  # (num_frames,) source frame index of each 25 fps frame
    start_s: float = 0.0  # where the clip starts in the video (a segment)


def discover_clips(data_root: Path, preset: Preset, segments: Path | None = None) -> list[NaiveClip]:
    """Every clip of data_root (its videos, or the rows of `segments`) usable for training (probed; the
    unusable ones logged and left out)."""
    if not Path(data_root).exists():  # a folder, or one video (media.scan_videos: a corpus of one clip)
        raise UsageError(f"--data_root {data_root} does not exist")
    fps, window = preset.timing.fps, preset.timing.window_frames
    clips, left_out = [], []
    infos: dict[Path, media.VideoInfo] = {}
    for spec in media.discover_clips(Path(data_root), segments):
        try:
            info = infos.get(spec.path) or infos.setdefault(spec.path, media.probe_video(spec.path))
            source_frames = media.clip_frame_indices(info, fps, spec.span_s)
        except MediaError as err:
            left_out.append(f"{spec.clip_id} ({err})")
            continue
        t = len(source_frames)
        if t < window or info.audio_source is None:
            left_out.append(f"{spec.clip_id} ({'no audio' if info.audio_source is None else f'{t} frames'})")
            continue
        clips.append(NaiveClip(spec.clip_id, info, t, source_frames, spec.span_s[0] if spec.span_s else 0.0))
    if left_out:
        log.warning("naive loader: %d clip(s) left out: %s", len(left_out), "; ".join(left_out[:3]))
    if not clips:
        raise UsageError(f"no usable video (at least {window} frames at {fps} fps, with audio) under {data_root}")
    return clips


class NaiveWindowDataset(Dataset):
    """Windows computed from the source videos on every call (the original per-sample inference)."""

    def __init__(self, clips: list[NaiveClip], preset: Preset, encoders: Encoders, device: torch.device,
                 crop: str = "face"):
        self.clips, self.preset, self.encoders, self.device = clips, preset, encoders, device
        self.framer = media.ClipFramer(crop, device)
        self._windows: dict[int, media.Window] = {}  # clip index -> its crop window, decided on first use

    def __getstate__(self) -> dict[str, Any]:
        """What a worker process needs (it is pickled there: dali_float.forkserver): the clips, the crops
        decided so far, the encoders' sources and weights (tensors in shared memory, not copies: the
        modules themselves cannot be pickled, wav2vec2's weight norm refuses). The frame decoder (DALI
        pipelines cannot be pickled: media.get_frame_decoder) and the face detector are built there on
        first use."""
        state = self.__dict__.copy()
        modules = {name: module for name in ("motion", "audio", "emotion")
                   if (module := getattr(self.encoders, name)) is not None}
        state["encoders"] = (self.encoders.sources, {name: m.state_dict() for name, m in modules.items()})
        state["framer"] = media.ClipFramer(self.framer.crop, self.framer.device)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        sources, weights = state.pop("encoders")
        self.__dict__.update(state)
        models_log = logging.getLogger("dali_float.models")
        level = models_log.level
        models_log.setLevel(logging.ERROR)  # the caller has warned about random weights already
        try:
            self.encoders = build_encoders(self.preset, sources, self.device)  # the same modules...
        finally:
            models_log.setLevel(level)
        for name, state_dict in weights.items():  # ...with the caller's weights: its shared tensors, no copy
            getattr(self.encoders, name).load_state_dict(state_dict, assign=True)

    def window(self, clip_index: int) -> media.Window:
        """The clip's crop window, decided as preprocessing decides it (ClipSkipped: not framable)."""
        if clip_index not in self._windows:
            clip = self.clips[clip_index]
            decoder = media.get_frame_decoder(self.preset.motion.input_size, self.device)
            try:
                with decoder_lock():
                    crop = self.framer.decide(clip.info, decoder, clip.source_frames, self.preset.timing.fps,
                                              self.preset.motion.input_size)
            except ClipSkipped as err:
                raise UsageError(f"naive loader: clip {clip.clip_id} cannot be framed with --crop "
                                 f"{self.framer.crop} ({err}); remove it from the data") from None
            self._windows[clip_index] = crop.window
        return self._windows[clip_index]

    def __len__(self) -> int:
        return len(self.clips)

    @torch.inference_mode()
    def sample(self, request: WindowRequest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(window rows (60, F + A), reference motion (F,), emotion (E,)), float16."""
        clip, timing = self.clips[request.clip_index], self.preset.timing
        s, w = request.window_start, timing.window_frames
        wanted = np.append(clip.source_frames[s:s + w], clip.source_frames[request.ref_frame])
        frames = media.decode_frames(clip.info, wanted, input_size=self.preset.motion.input_size,
                                     device=self.device, window=self.window(request.clip_index))
        motion = encode_motion(self.encoders.motion, frames).motion_latents  # (61, F)
        waveform = media.prepare_clip_audio(clip.info, clip.num_frames, timing, clip.start_s)
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

    def __init__(self, data_root: Path, preset: Preset, encoders: Encoders, options: LoaderOptions,
                 crop: str = "face", segments: Path | None = None):
        clips = discover_clips(data_root, preset, segments)
        super().__init__(preset, options, ClipList([c.clip_id for c in clips]), [c.num_frames for c in clips],
                         NaiveWindowDataset(clips, preset, encoders, options.torch_device, crop))

    @property
    def num_workers(self) -> int:
        # The encoders run where the samples are made: on a GPU in this process (each worker would need its
        # own CUDA context and its own copy of the encoders there).
        return 0 if self.options.torch_device.type == "cuda" else self.options.num_workers

    @property
    def pin_memory(self) -> bool:
        return False  # the samples are made on the device already
