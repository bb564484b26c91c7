"""Typed, frozen configuration: every dimension of FLOAT in one place, and the two presets.

`float` holds the real sizes read from the official code (see ../shared/docs/FLOAT.md);
`tiny` keeps the same structure (25 fps, 16 kHz, 10 + 50 frame windows, 7 emotions,
LIA encoder -> 20 coefficients, wav2vec2 with all hidden states, adaLN FMT) at sizes that
run in seconds on two CPU cores. A preset is hashable and serialises to a stable dict:
its digest enters the cache fingerprint and every checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from dali_float.errors import UsageError

# Limits that fail a clip before it can exhaust memory (preprocessing's --max_frame_pixels, --max_clip_s):
# 8K UHD frames (33 MP), and 10 minutes: wav2vec2 attends over the whole clip at 25 Hz, so 15,000 frames x
# 15,000 x 12 heads x 2 bytes = 5.4 GB per layer in float16 (twice that in float32 on the CPU).
MAX_FRAME_PIXELS = 7680 * 4320
MAX_CLIP_S = 600.0

EMOTION_CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")

# LIA appearance encoder: channels at each resolution (the official channel table).
LIA_CHANNELS: tuple[tuple[int, int], ...] = (
    (4, 512), (8, 512), (16, 512), (32, 512), (64, 256), (128, 128), (256, 64), (512, 32), (1024, 16),
)


@dataclass(frozen=True)
class TimingConfig:
    """Frame rate, audio rate and the training window (10 previous + 50 current frames)."""

    fps: int = 25
    sample_rate_hz: int = 16_000
    num_prev_frames: int = 10
    num_frames: int = 50

    @property
    def window_frames(self) -> int:
        return self.num_prev_frames + self.num_frames

    @property
    def audio_samples_per_frame(self) -> int:
        return self.sample_rate_hz // self.fps


@dataclass(frozen=True)
class MotionEncoderConfig:
    """LIA-style encoder: image (3, input_size, input_size) -> identity latent s, coefficients lambda, r = Q lambda."""

    input_size: int = 512
    latent_dim: int = 512  # dim_w: size of s and of the motion latent r
    num_coefficients: int = 20  # dim_m: motion coefficients lambda, columns of the direction basis
    channels: tuple[tuple[int, int], ...] = LIA_CHANNELS  # (resolution, channels)

    def channels_at(self, resolution: int) -> int:
        return dict(self.channels)[resolution]


@dataclass(frozen=True)
class Wav2Vec2Sizes:
    """The sizes of a wav2vec2 model (transformers.Wav2Vec2Config fields of the same names)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False  # True for the "large" (xlsr) layout
    feat_extract_norm: str = "group"  # "layer" for the "large" (xlsr) layout


@dataclass(frozen=True)
class AudioEncoderConfig:
    """wav2vec2 run at 25 Hz; all hidden states 1..L concatenated per frame."""

    wav2vec2: Wav2Vec2Sizes = Wav2Vec2Sizes()

    @property
    def feature_dim(self) -> int:
        """Values per frame in the cache (float: 12 x 768 = 9216)."""
        return self.wav2vec2.hidden_size * self.wav2vec2.num_hidden_layers


@dataclass(frozen=True)
class EmotionEncoderConfig:
    """wav2vec2 speech-emotion classifier (mean pooled, dense-tanh-out head) -> softmax over 7 classes."""

    wav2vec2: Wav2Vec2Sizes = Wav2Vec2Sizes(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        do_stable_layer_norm=True, feat_extract_norm="layer",
    )
    classes: tuple[str, ...] = EMOTION_CLASSES

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class FMTConfig:
    """Flow-matching transformer: 8 adaLN-Zero blocks of 1024, banded attention of +-2 frames."""

    hidden_size: int = 1024
    depth: int = 8
    num_heads: int = 8
    mlp_ratio: float = 4.0
    attention_window: int = 2  # frames each side a frame attends to
    audio_dim: int = 512  # dim_a: output of the trainable audio projection
    timestep_frequency_dim: int = 256


@dataclass(frozen=True)
class Preset:
    """Everything that fixes the shapes of features, models and batches."""

    name: str
    timing: TimingConfig
    motion: MotionEncoderConfig
    audio: AudioEncoderConfig
    emotion: EmotionEncoderConfig
    fmt: FMTConfig
    init_seed: int = 0  # seed of every random init when no checkpoint is given

    def __post_init__(self) -> None:
        size = self.motion.input_size
        if size & (size - 1) or not 8 <= size <= 1024:
            raise UsageError(f"preset {self.name}: input_size must be a power of two in [8, 1024], got {size}")
        if self.motion.num_coefficients > self.motion.latent_dim:
            raise UsageError(f"preset {self.name}: num_coefficients ({self.motion.num_coefficients}) "
                             f"must not exceed latent_dim ({self.motion.latent_dim})")
        if self.fmt.hidden_size % self.fmt.num_heads:
            raise UsageError(f"preset {self.name}: FMT hidden_size must divide by num_heads")
        if self.timing.sample_rate_hz % self.timing.fps:
            raise UsageError(f"preset {self.name}: sample rate must be a multiple of fps")

    @property
    def motion_dim(self) -> int:
        """Width of a motion latent r (dim_w)."""
        return self.motion.latent_dim

    @property
    def audio_feature_dim(self) -> int:
        """Width of a cached audio feature row (float: 9216)."""
        return self.audio.feature_dim

    @property
    def emotion_dim(self) -> int:
        return self.emotion.num_classes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Stable SHA-256 of the whole preset (enters the cache fingerprint)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


FLOAT_PRESET = Preset(
    name="float",
    timing=TimingConfig(),
    motion=MotionEncoderConfig(),
    audio=AudioEncoderConfig(),
    emotion=EmotionEncoderConfig(),
    fmt=FMTConfig(),
)

_TINY_WAV2VEC2 = Wav2Vec2Sizes(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
)

TINY_PRESET = Preset(
    name="tiny",
    timing=TimingConfig(),
    motion=MotionEncoderConfig(
        input_size=64, latent_dim=64, num_coefficients=20,
        channels=((4, 64), (8, 64), (16, 64), (32, 64), (64, 32)),
    ),
    audio=AudioEncoderConfig(wav2vec2=_TINY_WAV2VEC2),
    emotion=EmotionEncoderConfig(wav2vec2=_TINY_WAV2VEC2),
    fmt=FMTConfig(hidden_size=128, depth=2, num_heads=4, audio_dim=64),
)

PRESETS: dict[str, Preset] = {p.name: p for p in (FLOAT_PRESET, TINY_PRESET)}


def get_preset(name: str) -> Preset:
    """The preset called `name`; a UsageError naming the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}") from None
