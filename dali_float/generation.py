"""Generation, FLOAT's inference: motion latents from audio features, a reference motion and an emotion.

Chunks of 50 frames; each starts from Gaussian noise at t = 0 and is integrated to t = 1 by Euler on
the time grid `linspace(0, 1, nfe)` (torchdiffeq's fixed grid, as the official code: `nfe` counts the
grid's points) of the classifier-free guided velocity (GuidanceOptions: audio 2.0, emotion 1.0). The
first chunk has no previous frames: zeros, with the previous audio dropped (prev_audio_keep = 0); every
later chunk is conditioned on the last 10 generated frames and their audio. A last partial chunk is
padded by repeating the last audio row and cut back.

The sampler's commands (dali_float.sampler) and rendering (dali_float.render) share it, with ClipData:
a cached clip as both read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dali_float.cache import format as cf
from dali_float.errors import UsageError
from dali_float.models import FloatMotionModel


@dataclass(frozen=True)
class GuidanceOptions:
    nfe: int = 10  # points of the time grid linspace(0, 1, nfe): nfe - 1 Euler steps per chunk (FLOAT's meaning)
    a_scale: float = 2.0  # audio guidance
    e_scale: float = 1.0  # emotion guidance


@dataclass
class ClipData:
    """A cached clip as generation and rendering need it (float32)."""

    clip_id: str
    motion: np.ndarray  # (T, F) real motion latents
    audio: np.ndarray  # (T, A) audio features
    emotion: np.ndarray  # (E,)
    source_path: Path
    identity: np.ndarray  # (F,) identity latent s of the first frame
    entry: cf.ClipEntry  # the manifest's entry: crop_box, segment_s, source size

    @property
    def start_s(self) -> float:
        """Where the clip starts in its video (a segment; 0 for a whole video)."""
        return self.entry.segment_s[0] if self.entry.segment_s else 0.0


def time_grid(nfe: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """FLOAT's integration times: linspace(0, 1, nfe), float32 (nfe >= 2: nfe - 1 Euler steps)."""
    if nfe < 2:
        raise UsageError(f"--nfe counts the points of the time grid linspace(0, 1, nfe) as FLOAT does: "
                         f"at least 2 (one Euler step), got {nfe}")
    return torch.linspace(0, 1, nfe, device=device)


def generate_motion(model: FloatMotionModel, audio: torch.Tensor, ref_motion: torch.Tensor, emotion: torch.Tensor,
                    guidance: GuidanceOptions = GuidanceOptions(), generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    """Motion latents (T, F) float32 for audio features (T, A), reference motion (F,), emotion (E,).

    All inputs on the model's device. Chunk by chunk as the module docstring says.
    """
    return torch.cat(list(iter_motion_chunks(model, audio, ref_motion, emotion, guidance, generator)))


@torch.no_grad()
def iter_motion_chunks(model: FloatMotionModel, audio: torch.Tensor, ref_motion: torch.Tensor, emotion: torch.Tensor,
                       guidance: GuidanceOptions = GuidanceOptions(), generator: torch.Generator | None = None
                       ) -> Iterator[torch.Tensor]:
    """generate_motion one chunk at a time: yields (n, F) float32, n = 50 but for a shorter last chunk,
    as soon as it is integrated (so a renderer can decode it while nothing else is waiting)."""
    timing = model.preset.timing
    chunk, prev = timing.num_frames, timing.num_prev_frames
    device = next(model.parameters()).device
    audio = audio.float()
    frames, dims = audio.shape[0], model.preset.motion_dim
    wr, we = ref_motion.float()[None], emotion.float()[None]
    prev_x = torch.zeros(1, prev, dims, device=device)
    prev_audio = torch.zeros(1, prev, audio.shape[1], device=device)
    prev_keep = torch.zeros(1, device=device)  # the first chunk has no previous frames
    grid = time_grid(guidance.nfe, device)
    for start in range(0, frames, chunk):
        a = audio[start:start + chunk]
        n = a.shape[0]
        if n < chunk:  # the last, partial chunk: repeat its last audio row, cut the motion back
            a = torch.cat([a, a[-1:].expand(chunk - n, -1)])
        x = torch.randn(1, chunk, dims, generator=generator, device=device)
        for t0, t1 in zip(grid[:-1], grid[1:]):  # fixed-grid Euler: x += (t1 - t0) * v(t0, x)
            v = model.velocity_with_guidance(t0.reshape(1), x, prev_x, a[None], prev_audio, wr, we,
                                             a_scale=guidance.a_scale, e_scale=guidance.e_scale,
                                             prev_audio_keep=prev_keep)
            x = x + (t1 - t0) * v[:, prev:]
        yield x[0, :n]
        prev_x, prev_audio, prev_keep = x[:, -prev:], a[None, -prev:], torch.ones_like(prev_keep)
