"""The sampler integrates as FLOAT's official code does: torchdiffeq's fixed-grid Euler over
`linspace(0, 1, nfe)` (so `--nfe 10` is 9 steps), chunk by chunk. The reference below is written from
the official `FLOAT.sample` with torchdiffeq itself as the integrator (an independent implementation
of the time stepping), fed the same noise."""
from __future__ import annotations

import pytest
import torch
from torchdiffeq import odeint

from dali_float import sampler
from dali_float.config import get_preset
from dali_float.errors import UsageError
from dali_float.models import FloatMotionModel


@pytest.fixture(scope="module")
def model() -> FloatMotionModel:
    torch.manual_seed(0)
    m = FloatMotionModel(get_preset("tiny")).eval()
    # A random init keeps the FMT's adaLN-Zero output near 0; wake every layer up so the velocity
    # depends on t and x and a wrong step count shows.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def official_sample(model, audio, ref_motion, emotion, nfe, noise_seed, a_scale=2.0, e_scale=1.0):
    """FLOAT.sample's loop (chunks of L, the last L' frames of the previous chunk as condition), with
    torchdiffeq's Euler on linspace(0, 1, nfe); noise drawn chunk by chunk from one generator."""
    timing = model.preset.timing
    chunk, prev = timing.num_frames, timing.num_prev_frames
    gen = torch.Generator().manual_seed(noise_seed)
    time = torch.linspace(0, 1, nfe)
    frames, dims = audio.shape[0], model.preset.motion_dim
    prev_x, prev_a = torch.zeros(1, prev, dims), torch.zeros(1, prev, audio.shape[1])
    keep = torch.zeros(1)
    out = []
    for start in range(0, frames, chunk):
        a = audio[start:start + chunk]
        n = len(a)
        a = torch.nn.functional.pad(a[None].transpose(1, 2), (0, chunk - n), mode="replicate").transpose(1, 2)
        x0 = torch.randn(1, chunk, dims, generator=gen)

        def velocity(t, x):
            v = model.velocity_with_guidance(t.reshape(1), x, prev_x, a, prev_a, ref_motion[None], emotion[None],
                                             a_scale=a_scale, e_scale=e_scale, prev_audio_keep=keep)
            return v[:, prev:]

        x = odeint(velocity, x0, time, method="euler")[-1]
        out.append(x[0, :n])
        prev_x, prev_a, keep = x[:, -prev:], a[:, -prev:], torch.ones(1)
    return torch.cat(out)


@pytest.mark.parametrize("frames", [50, 123])
@pytest.mark.parametrize("nfe", [2, 10])
def test_generation_matches_floats_euler_on_linspace_0_1_nfe(model, frames, nfe):
    preset = model.preset
    g = torch.Generator().manual_seed(1)
    audio = torch.randn(frames, preset.audio_feature_dim, generator=g)
    ref, emotion = torch.randn(preset.motion_dim, generator=g), torch.softmax(torch.randn(7, generator=g), 0)
    ours = sampler.generate_motion(model, audio, ref, emotion, sampler.GuidanceOptions(nfe=nfe),
                                   torch.Generator().manual_seed(7))
    reference = official_sample(model, audio, ref, emotion, nfe, noise_seed=7)
    assert ours.shape == (frames, preset.motion_dim)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_nfe_10_evaluates_the_velocity_9_times_per_chunk(model, monkeypatch):
    calls = []
    original = type(model).velocity_with_guidance

    def counting(self, t, *args, **kwargs):
        calls.append(float(t.reshape(-1)[0]))
        return original(self, t, *args, **kwargs)

    monkeypatch.setattr(type(model), "velocity_with_guidance", counting)
    preset = model.preset
    sampler.generate_motion(model, torch.zeros(preset.timing.num_frames, preset.audio_feature_dim),
                            torch.zeros(preset.motion_dim), torch.zeros(7), sampler.GuidanceOptions(nfe=10))
    assert calls == pytest.approx([i / 9 for i in range(9)])


def test_nfe_below_2_is_a_usage_error():
    with pytest.raises(UsageError, match="at least 2"):
        sampler.time_grid(1)
    with pytest.raises(UsageError, match="at least 2"):  # the command line refuses it before loading anything
        sampler.main(["generate", "--checkpoint", "nowhere", "--clip", "x", "--out", "y.npy", "--nfe", "1"])
