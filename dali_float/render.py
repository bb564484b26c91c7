"""Rendering: a trained motion model and FLOAT's motion decoder turn a reference portrait and speech into an MP4.

    reference   a photo or a clip's first frame, framed by preprocessing's crop (`--crop`), or a cached
                clip (its cached identity and motion, its first frame with its cached crop)
                -> motion encoder: identity s, motion latent r (the FMT's reference), skip features
    speech      any audio file -> 16 kHz mono, normalised, padded -> wav2vec2 at 25 fps (T, A), emotion
    motion      the sampler (generation.iter_motion_chunks): chunks of 50 frames, FLOAT's Euler and guidance
    frames      the decoder, `frame_batch` frames per call: s + r_t and the reference's features
    video       Mp4Writer: H.264, the speech muxed in as AAC; T = ceil(duration x 25) frames

Each chunk of motion is decoded and written as soon as it is integrated (progress bar in frames).
`python -m dali_float.sampler render` is the command line; training's sample videos
(training.samples) use the same pieces with a cached clip.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dali_float import media
from dali_float.config import Preset
from dali_float.errors import ClipSkipped, MediaError, UsageError
from dali_float.generation import ClipData, GuidanceOptions, iter_motion_chunks
from dali_float.models import Encoders, MotionDecoder, MotionEncoder, encode_reference, one_hot_emotion
from dali_float.models import emotion_vector as model_emotion_vector
from dali_float.models import FloatMotionModel
from dali_float.progress import progress_bar

log = logging.getLogger(__name__)

# Activation memory of the decoder per frame, in units of its largest layer (channels x S x S float32):
# measured on the CPU, float preset, ~180 MB per 512x512 frame for a 33.5 MB largest layer.
_DECODER_MEMORY_FACTOR = 5.5
DECODER_MEMORY_BUDGET = 1.5e9  # bytes of activations one decoder call may take on the CPU


def decoder_batch_for(preset: Preset, device: torch.device | str) -> int:
    """Frames per decoder call: a whole chunk (50) on a GPU; on the CPU as many as fit
    DECODER_MEMORY_BUDGET (tiny: the whole chunk; float at 512x512: 8)."""
    chunk = preset.timing.num_frames
    if torch.device(device).type == "cuda":
        return chunk
    size = preset.motion.input_size
    per_frame = _DECODER_MEMORY_FACTOR * 4 * preset.motion.channels_at(size) * size * size
    return int(max(1, min(chunk, DECODER_MEMORY_BUDGET // per_frame)))


# --------------------------------------------------------------------------------------------------
# The reference


@dataclass
class Reference:
    """The portrait every frame is drawn from, on the renderer's device."""

    image: torch.Tensor  # (1, 3, S, S) in [-1, 1]: the framed first frame
    identity: torch.Tensor  # (F,) float32: identity latent s
    motion: torch.Tensor  # (F,) float32: motion latent r, the FMT's reference condition wr
    features: list[torch.Tensor]  # the decoder's skip features, (1, ch[r], r, r) for r = 8 ... S
    description: str  # what it is, for the log


def frame_first_frame(path: Path, crop: str, preset: Preset, device: torch.device | str
                      ) -> tuple[torch.Tensor, media.CropDecision]:
    """The first frame of a photo or a clip, framed as preprocessing frames a clip: (1, 3, S, S), the crop.

    A photo is a clip of one frame (the face detector runs on it); a clip gets the crop preprocessing
    would give it (detection on frames spread over the clip). MediaError (one line) when it cannot be read
    or framed.
    """
    timing, size = preset.timing, preset.motion.input_size
    info = media.probe_video(Path(path))
    indices = media.clip_frame_indices(info, timing.fps)
    if not len(indices):
        raise MediaError(f"{path}: no frame to use as the reference; pass a photo or a video")
    decoder = media.get_frame_decoder(size, device)
    try:
        decision = media.ClipFramer(crop, device).decide(info, decoder, indices, timing.fps, size)
    except ClipSkipped as err:
        raise MediaError(f"{path} cannot be the reference with --crop {crop}: {err}") from None
    return media.decode_frames(info, indices[:1], decoder, window=decision.window), decision


def reference_from_file(path: Path, crop: str, encoder: MotionEncoder, preset: Preset,
                        device: torch.device | str) -> Reference:
    """A photo or a clip's first frame, framed by `crop`, through the motion encoder."""
    image, decision = frame_first_frame(path, crop, preset, device)
    encoded = encode_reference(encoder, image.to(device))
    box = ", ".join(f"{v:.0f}" for v in decision.crop_box)
    return Reference(image, encoded.identity[0], encoded.motion_latents[0], encoded.features,
                     f"{path} (--crop {crop}: [{box}] of {decision.width}x{decision.height})")


def reference_from_clip(clip: ClipData, encoder: MotionEncoder, preset: Preset, device: torch.device | str
                        ) -> Reference:
    """A cached clip: its cached identity and first-frame motion, and its first frame decoded with its
    cached crop (for the decoder's features, which the cache does not hold)."""
    entry = clip.entry
    if len(entry.crop_box) != 4 or not entry.source_width:
        raise UsageError(f"the cache entry of {clip.clip_id} records no crop; rerun preprocess.py to refresh it")
    info = media.probe_video(clip.source_path)
    span = tuple(entry.segment_s) if entry.segment_s else None
    indices = media.clip_frame_indices(info, preset.timing.fps, span)
    window = media.CropDecision(tuple(entry.crop_box), entry.source_width, entry.source_height).window
    image = media.decode_frames(info, indices[:1], input_size=preset.motion.input_size, device=device, window=window)
    encoded = encode_reference(encoder, image.to(device))
    as_tensor = lambda a: torch.from_numpy(np.asarray(a, np.float32)).to(device)  # noqa: E731
    return Reference(image, as_tensor(clip.identity), as_tensor(clip.motion[0]), encoded.features,
                     f"cached clip {clip.clip_id} (crop {entry.crop or 'recorded'}: {entry.crop_box})")


# --------------------------------------------------------------------------------------------------
# The speech


@dataclass
class Speech:
    """What drives the motion, and the sound the video carries."""

    features: torch.Tensor  # (T, A) float32 audio features at 25 fps (wav2vec2, all layers)
    emotion: torch.Tensor  # (E,) float32 probabilities
    sound: np.ndarray  # (M,) float32 mono in [-1, 1]: the track muxed into the MP4
    sound_rate: int  # Hz
    description: str

    @property
    def num_frames(self) -> int:
        return int(self.features.shape[0])


def speech_from_file(path: Path, encoders: Encoders, preset: Preset, emotion: str | None = None) -> Speech:
    """Any audio file (or a video's track) through preprocessing's audio path: T = ceil(duration x 25).

    emotion: a class name (one-hot, as FLOAT's --emo); None: the run's emotion source (the classifier on
    this speech, the file's RAVDESS name, or uniform).
    """
    path = Path(path)
    wave, frames = media.prepare_speech(path, preset.timing)
    device = encoders.audio.device
    features = encoders.audio.encode(wave[None].to(device), frames)[0].float()
    if not bool(torch.isfinite(features).all()):
        raise MediaError(f"{path}: wav2vec2 features hold non-finite values (silent or broken audio?)")
    vector = one_hot_emotion(emotion) if emotion else model_emotion_vector(encoders, wave[None], path)
    rate = media.native_rate(path)
    sound = media.load_audio(path, rate).numpy()
    return Speech(features, torch.from_numpy(vector).to(device), sound, rate,
                  f"{path} ({len(sound) / rate:.2f} s, {frames} frames)")


def speech_from_clip(clip: ClipData, num_frames: int, device: torch.device | str, fps: int) -> Speech:
    """The first `num_frames` frames of a cached clip: cached features and emotion; its own sound."""
    frames = min(num_frames, clip.audio.shape[0])
    info = media.probe_video(clip.source_path)
    rate = media.native_rate(info.audio_source or info.path)  # a clip without audio: one MediaError line
    start = clip.entry.segment_s[0] if clip.entry.segment_s else 0.0
    sound = media.clip_waveform(info, rate, start)[:int(round(frames / fps * rate))].numpy()
    return Speech(torch.from_numpy(clip.audio[:frames]).to(device), torch.from_numpy(clip.emotion).to(device),
                  sound, rate, f"cached clip {clip.clip_id} (first {frames} frames)")


# --------------------------------------------------------------------------------------------------
# Frames and video


@dataclass
class RenderResult:
    path: Path
    frames: int
    seconds: float  # wall time of motion + frames + encoding
    audio_seconds: float

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


class Renderer:
    """A motion model and the decoder, on one device, in eval mode.

    frame_batch: frames per decoder call (default decoder_batch_for: a whole chunk on a GPU).
    """

    def __init__(self, model: FloatMotionModel, decoder: MotionDecoder, frame_batch: int | None = None) -> None:
        self.model, self.decoder = model, decoder
        self.preset = model.preset
        self.device = next(model.parameters()).device
        self.frame_batch = int(frame_batch) if frame_batch is not None else decoder_batch_for(self.preset, self.device)
        if self.frame_batch < 1:
            raise UsageError(f"--frame_batch must be at least 1, got {self.frame_batch}")

    @torch.inference_mode()
    def decode(self, reference: Reference, motion: torch.Tensor) -> torch.Tensor:
        """Motion latents (n, F) -> frames (n, 3, S, S) in the decoder's dtype, one batch."""
        return self.decoder(reference.identity[None] + motion, reference.features)

    def frames(self, reference: Reference, speech: Speech, guidance: GuidanceOptions = GuidanceOptions(),
               seed: int = 0) -> Iterator[torch.Tensor]:
        """Every frame for `speech`, (n, 3, S, S) batches of at most frame_batch, chunk by chunk.

        The noise comes from a generator seeded with `seed` on the model's device (same seed, same video).
        """
        generator = torch.Generator(self.device).manual_seed(seed)
        chunks = iter_motion_chunks(self.model, speech.features.to(self.device), reference.motion, speech.emotion,
                                    guidance, generator)
        for motion in chunks:
            for start in range(0, len(motion), self.frame_batch):
                yield self.decode(reference, motion[start:start + self.frame_batch])

    def render(self, reference: Reference, speech: Speech, out: Path, guidance: GuidanceOptions = GuidanceOptions(),
               seed: int = 0, progress: bool = True) -> RenderResult:
        """Write the MP4 of `reference` speaking `speech` to `out` (H.264 + AAC); returns what was done."""
        start = time.perf_counter()
        size, fps = self.preset.motion.input_size, self.preset.timing.fps
        with media.Mp4Writer(out, size, fps, speech.sound, speech.sound_rate) as writer, \
                progress_bar(total=speech.num_frames, unit="frame", desc="render", disable=not progress,
                             dynamic_ncols=True) as bar:
            for batch in self.frames(reference, speech, guidance, seed):
                writer.write(batch)
                bar.update(len(batch))
        result = RenderResult(Path(out), writer.frames, time.perf_counter() - start,
                              len(speech.sound) / speech.sound_rate)
        log.info("wrote %s: %d frames (%.2f s of speech) in %.1f s, %.2f frames/s", out, result.frames,
                 result.audio_seconds, result.seconds, result.frames_per_s)
        return result
