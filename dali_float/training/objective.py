"""FLOAT's training objective: conditional flow matching on the straight path, with condition dropout.

Convention (as FLOAT): noise x0 at t = 0, data x1 at t = 1, x_t = (1 - t) x0 + t x1, target
velocity x1 - x0, t ~ U(0, 1) per sample. The model sees the 50 noisy current frames, the 10 clean
previous frames, the audio features (projected inside the model), the reference motion and the
emotion; its velocity for the 50 current frames is regressed on the target:

    loss = w_ot * L_OT + w_vel * L_vel
    L_OT  = mean over (B, 50, F) of (v - (x1 - x0))^2
    L_vel = the same on frame-to-frame differences along the 50 frames, (B, 49, F).

Condition dropout (per sample, independent draws): audio, reference, emotion 0.1 each; previous
motion and previous audio 0.5 each. Audio is dropped after the projection (the model's keep masks),
the others by zeroing the inputs; every dropped input is a new tensor, the batch is never written.
All randomness (t, noise, dropout) comes from the caller's generator, in a fixed order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dali_float.contract import Batch
from dali_float.training.precision import Precision


@dataclass(frozen=True)
class ConditionDropout:
    """Probability that each condition is dropped for a sample (FLOAT's values by default)."""

    audio: float = 0.1
    ref: float = 0.1
    emotion: float = 0.1
    prev_motion: float = 0.5
    prev_audio: float = 0.5

    @classmethod
    def without_audio(cls) -> ConditionDropout:
        """The ablation: a model that never hears the audio (current or previous)."""
        return cls(audio=1.0, prev_audio=1.0)

    def keep_masks(self, generator: torch.Generator, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """(B,) float32 masks, 1 = keep, one uniform draw per condition and sample."""
        names = ("audio", "ref", "emotion", "prev_motion", "prev_audio")
        draws = torch.rand(len(names), batch_size, generator=generator, device=device)
        return {name: (draws[i] >= getattr(self, name)).float() for i, name in enumerate(names)}


@dataclass
class LossTerms:
    """0-dim float32 tensors (still attached to the graph)."""

    loss: torch.Tensor
    loss_ot: torch.Tensor
    loss_vel: torch.Tensor


def flow_matching_loss(model: nn.Module, batch: Batch, generator: torch.Generator, precision: Precision, *,
                       dropout: ConditionDropout = ConditionDropout(), ot_weight: float = 1.0,
                       vel_weight: float = 1.0) -> LossTerms:
    """One step's loss on `batch` for `model` (a FloatMotionModel, possibly DDP-wrapped).

    Draws, in this order from `generator` (on the batch's device): t (B,), noise x0 (B, 50, F),
    dropout masks (5, B). Features enter as `precision.feature_dtype` (float16 as delivered for fp16);
    the forward runs under `precision.autocast()`, the loss is computed in float32 outside it.
    """
    cast = (lambda x: x.to(precision.feature_dtype)) if precision.feature_dtype is not None else (lambda x: x)
    x1, prev_x = cast(batch.motion), cast(batch.prev_motion)
    audio, prev_audio = cast(batch.audio), cast(batch.prev_audio)
    ref, emotion = cast(batch.ref_motion), cast(batch.emotion)
    b, device = batch.size, x1.device

    t = torch.rand(b, generator=generator, device=device)
    x0 = torch.randn(x1.shape, generator=generator, device=device)
    keep = dropout.keep_masks(generator, b, device)

    tt = t[:, None, None]
    x_t = (1 - tt) * x0 + tt * x1  # float32 (x0 is)
    target = x1.float() - x0
    # Zeroing by multiplication makes new tensors: the loader's buffers stay as they were.
    prev_x = prev_x * keep["prev_motion"].to(prev_x.dtype)[:, None, None]
    ref = ref * keep["ref"].to(ref.dtype)[:, None]
    emotion = emotion * keep["emotion"].to(emotion.dtype)[:, None]
    with precision.autocast():
        velocity = model(t, x_t, prev_x, audio, prev_audio, ref, emotion,
                         audio_keep=keep["audio"], prev_audio_keep=keep["prev_audio"])
    v = velocity[:, prev_x.shape[1]:].float()  # the 50 current frames
    loss_ot = F.mse_loss(v, target)
    loss_vel = F.mse_loss(v.diff(dim=1), target.diff(dim=1))
    return LossTerms(ot_weight * loss_ot + vel_weight * loss_vel, loss_ot, loss_vel)
