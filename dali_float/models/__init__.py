"""FLOAT's models: the three frozen encoders that make the cache, and the trained motion model.

  motion_encoder  image -> identity s, coefficients lambda, motion latent r (LIA, loads float.pth)
  motion_decoder  identity s + motion latent r, reference features -> image (loads float.pth)
  audio_encoder   waveform -> wav2vec2 features of all layers at 25 fps (B, T, 12 x 768)
  emotion         waveform -> 7 emotion probabilities (or RAVDESS file name / uniform)
  fmt             flow-matching transformer + trainable audio projection (what training optimises)
  float_pth       FLOAT's float.pth as a whole: its parts, their names, a check of a whole file (the export)
  torch_files     what a file given as a checkpoint is when torch.save did not write it (no torch needed)

Here: where the encoders' weights come from (`ModelSources`), their identities for the cache
fingerprint without building anything (`model_identities`), `build_encoders` for preprocessing and
`build_decoder` for rendering.
"""
from __future__ import annotations

import argparse
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dali_float import activity
from dali_float.config import Preset
from dali_float.errors import UsageError
from dali_float.hashing import sha256_file, sha256_tree

if TYPE_CHECKING:
    import numpy as np
    import torch

    from dali_float.models.audio_encoder import AudioEncoder
    from dali_float.models.emotion import EmotionEncoder
    from dali_float.models.fmt import FloatMotionModel, FlowMatchingTransformer, count_parameters
    from dali_float.models.motion_decoder import MotionDecoder, load_decoder_checkpoint
    from dali_float.models.motion_encoder import (MotionEncoder, MotionEncoding, ReferenceEncoding,
                                                  load_motion_checkpoint)

# The model modules import torch (~2 s) and the wav2vec2 ones transformers too (~1.5 s more): their names are
# imported on first use (PEP 562), so that what only needs ModelSources and the weights' identities
# (`preprocess.py status`, the cache fingerprint) imports neither.
_LAZY = {"AudioEncoder": "audio_encoder", "EmotionEncoder": "emotion", "emotion_from_filename": "emotion",
         "uniform_emotion": "emotion", "one_hot_emotion": "emotion",
         "FloatMotionModel": "fmt", "FlowMatchingTransformer": "fmt", "count_parameters": "fmt",
         "MotionDecoder": "motion_decoder", "load_decoder_checkpoint": "motion_decoder",
         "MotionEncoder": "motion_encoder", "MotionEncoding": "motion_encoder", "ReferenceEncoding": "motion_encoder",
         "load_motion_checkpoint": "motion_encoder"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AudioEncoder", "EmotionEncoder", "Encoders", "FloatMotionModel", "FlowMatchingTransformer", "ModelSources",
    "MotionDecoder", "MotionEncoder", "MotionEncoding", "ReferenceEncoding", "build_decoder", "build_encoders",
    "build_motion_encoder",
    "count_parameters", "emotion_from_filename", "emotion_vector", "encode_motion", "encode_reference",
    "load_decoder_checkpoint", "load_motion_checkpoint", "model_identities", "one_hot_emotion", "uniform_emotion",
]

log = logging.getLogger(__name__)

EMOTION_SOURCES = ("model", "filename", "none")
_random_init_warned = False  # the random-init warning is logged once per process
_random_decoder_warned = False


@dataclass(frozen=True)
class ModelSources:
    """Where each frozen encoder's weights come from; None = seeded random init (pipeline tests only).

    emotion: "model" (the classifier at emotion_path, or random init), "filename" (RAVDESS one-hot),
    "none" (uniform vector).
    """

    motion_ckpt: Path | None = None
    wav2vec2_path: Path | None = None
    emotion_path: Path | None = None
    emotion: str = "model"

    def __post_init__(self) -> None:
        if self.emotion not in EMOTION_SOURCES:
            raise UsageError(f"--emotion must be one of {', '.join(EMOTION_SOURCES)}, got {self.emotion!r}")
        if self.emotion_path is not None and self.emotion != "model":
            raise UsageError(f"--emotion_path is only used with --emotion model, not with --emotion {self.emotion}; "
                             f"drop one of the two")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelSources:
        """From the arguments of dali_float.cli.add_model_arguments (missing attributes = defaults)."""
        return cls(
            motion_ckpt=getattr(args, "motion_ckpt", None),
            wav2vec2_path=getattr(args, "wav2vec2_path", None),
            emotion_path=getattr(args, "emotion_path", None),
            emotion=getattr(args, "emotion", None) or "model",
        )

    def random_models(self) -> list[str]:
        """Names of the encoders that would start from random weights."""
        random = [name for name, src in (("motion", self.motion_ckpt), ("audio", self.wav2vec2_path)) if src is None]
        if self.emotion == "model" and self.emotion_path is None:
            random.append("emotion")
        return random


def model_identities(preset: Preset, sources: ModelSources) -> dict[str, str]:
    """Identity of each encoder's weights, without building them: keys "motion", "audio", "emotion".

    "sha256:<hex>" of a checkpoint file or of a from_pretrained folder (every file's name and content),
    "random-init:<preset.init_seed>" without weights, and "filename" / "none" for those emotion sources.
    These enter the cache fingerprint (with the preset's digest, which fixes the random-init sizes).
    """
    random = f"random-init:{preset.init_seed}"
    motion = f"sha256:{sha256_file(sources.motion_ckpt, remember=True)}" if sources.motion_ckpt else random
    audio = f"sha256:{sha256_tree(sources.wav2vec2_path, remember=True)}" if sources.wav2vec2_path else random
    if sources.emotion != "model":
        emotion = sources.emotion
    else:
        emotion = f"sha256:{sha256_tree(sources.emotion_path, remember=True)}" if sources.emotion_path else random
    return {"motion": motion, "audio": audio, "emotion": emotion}


@dataclass
class Encoders:
    """The frozen encoders of preprocessing, in eval mode on one device (emotion None unless "model")."""

    motion: MotionEncoder
    audio: AudioEncoder
    emotion: EmotionEncoder | None
    sources: ModelSources


def build_encoders(preset: Preset, sources: ModelSources, device: torch.device | str) -> Encoders:
    """Build (and load) the frozen encoders on `device`; CheckpointError if any weights do not fit.

    Logs one loud warning per process when any of them starts from random weights.
    """
    global _random_init_warned
    random = sources.random_models()
    if random and not _random_init_warned:
        log.warning("RANDOM WEIGHTS for the %s encoder%s (no checkpoint given): features made with them are only "
                    "good for testing the pipeline, not for training FLOAT. Pass --motion_ckpt / --wav2vec2_path / "
                    "--emotion_path.", ", ".join(random), "s" if len(random) > 1 else "")
        _random_init_warned = True
    from dali_float.models.audio_encoder import AudioEncoder
    from dali_float.models.emotion import EmotionEncoder

    motion = build_motion_encoder(preset, sources.motion_ckpt, device)
    audio = AudioEncoder(preset, sources.wav2vec2_path)
    emotion = EmotionEncoder(preset, sources.emotion_path) if sources.emotion == "model" else None
    for module in (audio, emotion):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
            module.to(device)
    return Encoders(motion=motion, audio=audio, emotion=emotion, sources=sources)


def build_motion_encoder(preset: Preset, motion_ckpt: Path | None, device: torch.device | str) -> MotionEncoder:
    """The frozen motion encoder alone (float.pth's, or the seeded random init), eval mode, on `device`."""
    from dali_float.models.motion_encoder import MotionEncoder, load_motion_checkpoint

    motion = MotionEncoder(preset.motion, seed=preset.init_seed)
    if motion_ckpt is not None:
        load_motion_checkpoint(motion, motion_ckpt)
    return motion.requires_grad_(False).eval().to(device)


def emotion_vector(encoders: Encoders, waveform: torch.Tensor | np.ndarray, clip_path: str | Path) -> np.ndarray:
    """The clip's emotion (7,) float32 in EMOTION_CLASSES order, from the source chosen in encoders.sources.

    waveform: (1, N) or (N,) float, normalised, 16 kHz (used by "model" only); clip_path: the source
    video (used by "filename" only; MediaError if its name is not RAVDESS-style).
    """
    import numpy as np
    import torch

    from dali_float.models.emotion import emotion_from_filename, uniform_emotion

    source = encoders.sources.emotion
    if source == "filename":
        return emotion_from_filename(clip_path)
    if source == "none":
        return uniform_emotion()
    if encoders.emotion is None:
        raise UsageError("emotion source is 'model' but no emotion encoder was built")
    wave = torch.as_tensor(waveform, dtype=torch.float32)
    return encoders.emotion.predict(wave).numpy().astype(np.float32, copy=False)


def encode_motion(encoder: MotionEncoder, frames: torch.Tensor) -> MotionEncoding:
    """The motion encoder as preprocessing and the naive loader both run it (so they agree).

    frames (N, 3, S, S) in [-1, 1]; fp16 autocast on CUDA, float32 on the CPU; outputs float32.
    """
    import torch

    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=frames.is_cuda), \
            activity.encoder_call(frames):  # its GPU time, when the bench records it
        return encoder(frames)


def encode_reference(encoder: MotionEncoder, frames: torch.Tensor) -> ReferenceEncoding:
    """The motion encoder on reference images, with the decoder's skip features (encode_motion's precision).

    frames (N, 3, S, S) in [-1, 1]; fp16 autocast on CUDA, float32 on the CPU.
    """
    import torch

    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=frames.is_cuda):
        return encoder.encode_reference(frames)


def build_decoder(preset: Preset, motion_ckpt: Path | None, device: torch.device | str) -> MotionDecoder:
    """FLOAT's motion decoder on `device`, frozen, in eval mode: `motion_autoencoder.dec.*` of `motion_ckpt`
    (float.pth) or, without one, a seeded random init with one loud warning per process.

    float16 on a GPU (the frames of a chunk go through it in one batch), float32 on the CPU.
    """
    import torch

    from dali_float.models.motion_decoder import MotionDecoder, load_decoder_checkpoint

    global _random_decoder_warned
    decoder = MotionDecoder(preset.motion, seed=preset.init_seed)
    if motion_ckpt is not None:
        load_decoder_checkpoint(decoder, motion_ckpt)
    elif not _random_decoder_warned:
        log.warning("RANDOM WEIGHTS for the motion decoder (no --motion_ckpt): the rendered frames are not a face, "
                    "only the pipeline runs. Pass FLOAT's float.pth (--preset float) to see the motion.")
        _random_decoder_warned = True
    decoder.requires_grad_(False).eval().to(device)
    return decoder.half() if torch.device(device).type == "cuda" else decoder
