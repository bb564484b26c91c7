"""Audio: load a clip's sound (side file, or its own track lined up with the first frame), mono,
resampled, fitted to the clip's frames and normalised per utterance, as the models take it."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import av
import numpy as np
import torch

from dali_float.config import TimingConfig
from dali_float.errors import MediaError
from dali_float.media.probe import VideoInfo, _check_readable_file, _media_errors

log = logging.getLogger(__name__)

# Audio and video starting further apart than this are taken as broken timestamps, not as an offset.
_MAX_AV_OFFSET_S = 10.0


# --------------------------------------------------------------------------------------------------
# Audio


def load_audio(source: Path, sample_rate_hz: int, *, start_s: float | None = None) -> torch.Tensor:
    """Decode the first audio stream of `source`, mix to mono (channel mean), resample: (N,) float32.

    source: a video with an audio track or an audio file (.wav, .flac, ...); any sample format, rate
        and channel count. Resampling: torchaudio.functional.resample (band-limited sinc).
    start_s: if given, sample 0 of the result is the sound at time `start_s` of the source's timeline
        (leading samples dropped, or silence prepended when the audio starts later): this lines a
        video's own track up with its first video frame. None: start at the first decoded sample.
    Raises MediaError when the file has no audio stream or cannot be decoded.
    """
    import torchaudio.functional as AF

    source = Path(source)
    _check_readable_file(source, "decoding audio")
    blocks: list[np.ndarray] = []
    first_pts_s: float | None = None
    with _media_errors(source, "decoding audio"), av.open(str(source), metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise MediaError(f"{source}: has no audio stream; add a same-name .wav/.flac next to the video "
                             f"or remove the clip")
        stream = container.streams.audio[0]
        # AAC decoders return whole 1024-sample frames; the container's duration says where the
        # sound really ends (the last packet's duration), so trim the encoder padding to it.
        declared_s = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        # Planar float keeps the channels apart whatever the source format (packed s16, s32p, ...).
        resampler = None
        rate = None
        for frame in container.decode(stream):
            if rate is None:
                rate = frame.sample_rate
                resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=rate)
                if frame.pts is not None and frame.time_base is not None:
                    first_pts_s = float(frame.pts * frame.time_base)
            for converted in resampler.resample(frame):
                blocks.append(converted.to_ndarray())
        if resampler is not None:
            for converted in resampler.resample(None):
                blocks.append(converted.to_ndarray())
    if not blocks or rate is None:
        raise MediaError(f"{source}: the audio stream holds no samples; re-encode it or remove the clip")
    wave = np.concatenate(blocks, axis=1).astype(np.float32).mean(axis=0)  # (channels, n) -> (n,)
    if declared_s is not None and declared_s > 0:
        wave = wave[:int(round(declared_s * rate))]
    if start_s is not None and first_pts_s is not None and abs(first_pts_s - start_s) > _MAX_AV_OFFSET_S:
        log.warning("%s: audio starts %.1f s away from the video; not lining them up",
                    source, first_pts_s - start_s)
    elif start_s is not None and first_pts_s is not None:
        shift = int(round((first_pts_s - start_s) * rate))
        if shift > 0:  # audio starts after the first video frame
            wave = np.concatenate([np.zeros(shift, np.float32), wave])
        elif shift < 0:
            wave = wave[-shift:]
    tensor = torch.from_numpy(np.ascontiguousarray(wave))
    if rate != sample_rate_hz:
        tensor = AF.resample(tensor, orig_freq=int(rate), new_freq=int(sample_rate_hz))
    return tensor.to(torch.float32)


def trim_to_frames(waveform: torch.Tensor, num_frames: int, samples_per_frame: int) -> torch.Tensor:
    """The first num_frames * samples_per_frame samples (all of them when the sound is shorter)."""
    if waveform.ndim != 1:
        raise ValueError(f"waveform must be 1-D, got {tuple(waveform.shape)}")
    return waveform[:int(num_frames) * int(samples_per_frame)]


def pad_to_frames(waveform: torch.Tensor, num_frames: int, samples_per_frame: int) -> torch.Tensor:
    """Replicate-pad (repeat the last sample) to exactly num_frames * samples_per_frame samples, as
    FLOAT's AudioEncoder pads (F.pad mode='replicate'); a longer waveform is trimmed."""
    waveform = trim_to_frames(waveform, num_frames, samples_per_frame)
    target = int(num_frames) * int(samples_per_frame)
    if waveform.numel() == target:
        return waveform
    if waveform.numel() == 0:
        raise ValueError("cannot pad an empty waveform")
    return torch.cat([waveform, waveform[-1:].expand(target - waveform.numel())])


def normalize_utterance(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-7) over the whole clip, as Wav2Vec2FeatureExtractor does. float32.

    Computed in float64 (population variance) for a long clip's sake, returned as float32.
    """
    x64 = x.to(torch.float64)
    return ((x64 - x64.mean()) / torch.sqrt(x64.var(unbiased=False) + 1e-7)).to(torch.float32)


class TrackMemo:
    """The last audio file loaded whole (mono, resampled, lined up with the video): the segments of one
    video slice it instead of decoding and resampling the whole track once each. Holds one track (a
    60-min track at 16 kHz is 230 MB of float32, what loading it for one segment takes anyway); the
    owner clears it when it moves on to another video. A changed file (size, modification time) is
    loaded again."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._wave: torch.Tensor | None = None
        self.loads = 0  # tracks decoded (a count the tests read)

    def load(self, source: Path, rate: int, start_s: float | None) -> torch.Tensor:
        """load_audio(source, rate, start_s=start_s), from memory when it is the last one asked for."""
        try:
            st = os.stat(source)
            key: tuple | None = (str(source), st.st_size, st.st_mtime_ns, int(rate), start_s)
        except OSError:
            key = None  # load_audio says why in one line
        if key is None or key != self._key:
            self.clear()
            wave = load_audio(source, rate, start_s=start_s)
            self.loads += 1
            self._key, self._wave = key, wave
        return self._wave

    def clear(self) -> None:
        self._key, self._wave = None, None


def prepare_clip_audio(info: VideoInfo, num_frames: int, timing: TimingConfig, start_s: float = 0.0,
                       track: TrackMemo | None = None) -> torch.Tensor:
    """The clip's audio as the models take it: (num_frames * samples_per_frame,) float32.

    start_s: where the clip starts in the video (a segment): its audio starts there too.
    track: where the whole track is kept for the video's next segment (None: loaded for this clip only).

    Order (FLOAT's official one): load (side file if any, else the clip's track lined up with its
    first frame), mix to mono, resample to timing.sample_rate_hz, keep the clip's span (trim to
    num_frames frames), normalise that utterance (zero mean, unit variance, as
    Wav2Vec2FeatureExtractor does before anything else), THEN replicate-pad to num_frames frames (as
    FLOAT's AudioEncoder pads the normalised input): the padding is not part of the statistics.
    Both preprocessing and the naive loader call this.
    """
    return fit_to_frames(clip_waveform(info, timing.sample_rate_hz, start_s, track), num_frames, timing)


def clip_waveform(info: VideoInfo, rate: int, start_s: float = 0.0, track: TrackMemo | None = None) -> torch.Tensor:
    """The clip's sound from its first frame (plus start_s) on: (N,) float32 mono at `rate` Hz.

    From the side .wav/.flac if there is one, else from the video's own track lined up with its first
    frame. MediaError (one line) when the clip has no audio or none after start_s.
    """
    if info.audio_source is None:
        raise MediaError(f"{info.path}: no audio (no audio stream and no same-name .wav/.flac beside it); "
                         f"add one or remove the clip")
    start = info.start_time_s if info.audio_source == info.path else None
    wave = (track.load if track is not None else load_audio)(info.audio_source, rate, start_s=start)
    wave = wave[int(round(start_s * rate)):]  # sample 0 is the video's first frame
    if wave.numel() == 0:
        where = f" after {start_s:g} s" if start_s else ""
        raise MediaError(f"{info.audio_source}: the audio is empty{where}; re-encode it or remove the clip")
    return wave


def native_rate(source: Path) -> int:
    """Sample rate (Hz) of the first audio stream of `source` (MediaError when it has none)."""
    source = Path(source)
    _check_readable_file(source, "reading audio")
    with _media_errors(source, "reading audio"), av.open(str(source), metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise MediaError(f"{source}: has no audio stream; pass a file with speech in it")
        return int(container.streams.audio[0].rate)


def fit_to_frames(wave: torch.Tensor, num_frames: int, timing: TimingConfig) -> torch.Tensor:
    """(N,) float32 at timing.sample_rate_hz -> (num_frames * samples_per_frame,) float32 in FLOAT's
    order: keep the first num_frames frames' samples, normalise that utterance, then replicate-pad."""
    spf = timing.audio_samples_per_frame
    return pad_to_frames(normalize_utterance(trim_to_frames(wave, num_frames, spf)), num_frames, spf)


def frames_for_samples(num_samples: int, timing: TimingConfig) -> int:
    """Video frames that cover `num_samples` audio samples: ceil(duration x fps), as FLOAT's sampler counts."""
    return -(-int(num_samples) * timing.fps // timing.sample_rate_hz)


def prepare_speech(path: Path, timing: TimingConfig) -> tuple[torch.Tensor, int]:
    """A speech file (any audio, or a video's track) as the models take it, and its length in frames.

    Returns (waveform (T * samples_per_frame,) float32, T) with T = frames_for_samples of the sound
    (a 2.3 s file gives 58 frames): the same load, resample, normalise-then-pad path as a clip's audio.
    """
    wave = load_audio(path, timing.sample_rate_hz)
    if wave.numel() == 0:
        raise MediaError(f"{path}: the audio is empty; pass a file with speech in it")
    frames = frames_for_samples(wave.numel(), timing)
    return fit_to_frames(wave, frames, timing), frames
