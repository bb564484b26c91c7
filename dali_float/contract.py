"""The batch contract: what every loader (`naive`, `torch`, `dali`) hands the training loop.

One definition, checked by `Batch.validate`; the training loop never asks which loader made a batch.
Features are float16 (the cache's dtype; autocast consumes them directly), indices int64, all tensors
of a batch on one device (CUDA when the loader feeds a GPU, CPU otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from dali_float.config import Preset

FEATURE_DTYPE = torch.float16
INDEX_DTYPE = torch.int64


@dataclass
class Batch:
    """One training batch of B windows; F = preset.motion_dim, A = preset.audio_feature_dim.

    Frames are 25 fps frame indices of the clip; a window is frames
    [window_start, window_start + 60): the first 10 are "previous", the last 50 "current".
    """

    prev_motion: torch.Tensor  # (B, 10, F) float16: motion latents r of the 10 previous frames
    motion: torch.Tensor  # (B, 50, F) float16: motion latents r of the 50 current frames
    prev_audio: torch.Tensor  # (B, 10, A) float16: wav2vec2 features (all hidden states) of the previous frames
    audio: torch.Tensor  # (B, 50, A) float16: the same for the current frames
    ref_motion: torch.Tensor  # (B, F) float16: motion latent r of the reference frame
    emotion: torch.Tensor  # (B, 7) float16: emotion probabilities of the clip
    window_start: torch.Tensor  # (B,) int64: first frame of the window
    ref_frame: torch.Tensor  # (B,) int64: frame the reference motion was taken from
    clip_id: list[str]  # B clip ids (path of the source video relative to the data root)

    TENSOR_FIELDS = ("prev_motion", "motion", "prev_audio", "audio", "ref_motion", "emotion",
                     "window_start", "ref_frame")

    @property
    def size(self) -> int:
        return len(self.clip_id)

    @property
    def device(self) -> torch.device:
        return self.motion.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.TENSOR_FIELDS}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        moved = {name: t.to(device, non_blocking=non_blocking) for name, t in self.tensors().items()}
        return Batch(**moved, clip_id=list(self.clip_id))

    def expected_shapes(self, preset: Preset) -> dict[str, tuple[int, ...]]:
        b, t = self.size, preset.timing
        f, a, e = preset.motion_dim, preset.audio_feature_dim, preset.emotion_dim
        return {
            "prev_motion": (b, t.num_prev_frames, f), "motion": (b, t.num_frames, f),
            "prev_audio": (b, t.num_prev_frames, a), "audio": (b, t.num_frames, a),
            "ref_motion": (b, f), "emotion": (b, e), "window_start": (b,), "ref_frame": (b,),
        }

    def validate(self, preset: Preset) -> "Batch":
        """Raise ValueError listing every field whose shape, dtype or device breaks the contract."""
        problems = []
        device = self.device
        for name, shape in self.expected_shapes(preset).items():
            t = getattr(self, name)
            dtype = INDEX_DTYPE if name in ("window_start", "ref_frame") else FEATURE_DTYPE
            if tuple(t.shape) != shape:
                problems.append(f"{name}: shape {tuple(t.shape)}, expected {shape}")
            if t.dtype != dtype:
                problems.append(f"{name}: dtype {t.dtype}, expected {dtype}")
            if t.device != device:
                problems.append(f"{name}: on {t.device}, the batch is on {device}")
        if problems:
            raise ValueError("batch breaks the contract: " + "; ".join(problems))
        return self


def batch_field_names() -> list[str]:
    return [f.name for f in fields(Batch)]
