"""Generation (dali_float.generation, and the sampler's commands) against FLOAT's inference convention, with
stand-in velocity fields, and the audio-following measurement on planted data: fast, no training (the
trained-model checks are in test_training.py).

FLOAT's inference (models/float/FLOAT.py `sample`): per chunk of 50 frames, noise at t = 0 integrated to
t = 1 by torchdiffeq's Euler method on `linspace(0, 1, nfe)` (nfe = 10: 9 steps), the classifier-free guided
velocity (audio 2.0, emotion 1.0), previous frames and audio zero for the first chunk, then the last 10
generated frames and their audio; the last chunk's audio replicate-padded, the motion cut back to T.
The FLOAT model itself is also integrated against a reference written from the official `FLOAT.sample` with
torchdiffeq as the integrator (an independent implementation of the time stepping), fed the same noise.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchdiffeq import odeint

from dali_float import sampler
from dali_float.config import TINY_PRESET, get_preset
from dali_float.errors import UsageError
from dali_float.models import FloatMotionModel
from dali_float.cache import format as cf
from dali_float.generation import ClipData, GuidanceOptions, generate_motion, time_grid
from dali_float.sampler import loudness_direction
from cached import entries_of

P = TINY_PRESET
F, A = P.motion_dim, P.audio_feature_dim


class Field(torch.nn.Module):
    """Stands in for FloatMotionModel.velocity_with_guidance: records every call, returns velocity(t, x)."""

    def __init__(self, velocity):
        super().__init__()
        self.preset = P
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # the device generate_motion reads
        self.velocity = velocity
        self.calls: list[dict] = []

    def velocity_with_guidance(self, t, x, prev_x, audio, prev_audio, wr, we, a_scale, e_scale, prev_audio_keep):
        self.calls.append(dict(t=float(t), x=x.clone(), prev_x=prev_x.clone(), audio=audio.clone(),
                               prev_audio=prev_audio.clone(), wr=wr.clone(), we=we.clone(), a_scale=a_scale,
                               e_scale=e_scale, prev_audio_keep=prev_audio_keep.clone()))
        v = self.velocity(t, torch.cat([prev_x, x], dim=1))
        return v


def _clip(clip_id: str, motion, audio, emotion, source: Path | None) -> ClipData:
    """A whole-video clip as the sampler reads it from the cache (identity unused here)."""
    entry = cf.ClipEntry(clip_id, str(source), 0, 0, "", cf.STATUS_CACHED, num_frames=len(motion))
    return ClipData(clip_id, motion, audio, emotion, source, np.zeros(F, np.float32), entry)


def _inputs(frames: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(frames, A, generator=g), torch.randn(F, generator=g),
            torch.softmax(torch.randn(7, generator=g), 0))


def _noise(chunks: int, seed: int) -> list[torch.Tensor]:
    """The noise generate_motion starts each chunk from, drawn the same way."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 50, F, generator=g) for _ in range(chunks)]


def test_a_constant_velocity_moves_the_noise_by_exactly_that_velocity():
    """Integrating from t = 0 to t = 1 (whatever the step count): x1 = x0 + v."""
    shift = torch.linspace(-1, 1, F)
    field = Field(lambda t, x: shift.expand_as(x).clone())
    audio, ref, emotion = _inputs(120)
    out = generate_motion(field, audio, ref, emotion, GuidanceOptions(nfe=10), torch.Generator().manual_seed(3))
    expected = torch.cat(_noise(3, 3), dim=1)[0, :120] + shift
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_euler_steps_from_t0_to_1_along_the_times_the_velocity_is_evaluated_at():
    """Whatever the step count: times start at 0, increase, stay below 1, and each step adds (next time - this
    time) x the velocity there, the last step reaching t = 1."""
    field = Field(lambda t, x: torch.sin(3 * x) + t)
    audio, ref, emotion = _inputs(50, seed=5)
    out = generate_motion(field, audio, ref, emotion, GuidanceOptions(nfe=6), torch.Generator().manual_seed(2))
    times = [c["t"] for c in field.calls]
    assert times[0] == 0 and all(a < b for a, b in zip(times, times[1:])) and times[-1] < 1
    states = [c["x"] for c in field.calls] + [out[None]]
    for k, call in enumerate(field.calls):
        step = (times[k + 1] if k + 1 < len(times) else 1.0) - times[k]
        velocity = field.velocity(times[k], torch.cat([call["prev_x"], call["x"]], dim=1))[:, 10:]
        torch.testing.assert_close(states[k + 1], call["x"] + step * velocity, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[0], _noise(1, 2)[0])  # from the seeded noise at t = 0


@pytest.mark.parametrize("nfe", [10, 2, 5])
def test_euler_evaluations_on_linspace_0_1_nfe(nfe):
    """The velocity is evaluated at linspace(0, 1, nfe)[:-1], nfe - 1 Euler steps of 1 / (nfe - 1) each:
    dx/dt = -x ends at x0 (1 - 1 / (nfe - 1))^(nfe - 1)."""
    field = Field(lambda t, x: -x)
    audio, ref, emotion = _inputs(50)
    out = generate_motion(field, audio, ref, emotion, GuidanceOptions(nfe=nfe), torch.Generator().manual_seed(1))
    assert [c["t"] for c in field.calls] == pytest.approx(np.linspace(0, 1, nfe)[:-1].tolist())
    steps = nfe - 1
    torch.testing.assert_close(out, _noise(1, 1)[0][0] * (1 - 1 / steps) ** steps, atol=1e-5, rtol=1e-5)


def test_chunks_continue_from_the_last_ten_generated_frames():
    """3 chunks for 120 frames: the first without previous frames (zeros, previous audio dropped), each next
    one conditioned on the last 10 frames generated and their audio; the last chunk's audio padded by
    repeating its last row; the reference, emotion and guidance scales passed unchanged."""
    field = Field(lambda t, x: torch.full_like(x, 0.5))
    audio, ref, emotion = _inputs(120, seed=2)
    guidance = GuidanceOptions(nfe=4, a_scale=3.0, e_scale=0.5)
    out = generate_motion(field, audio, ref, emotion, guidance, torch.Generator().manual_seed(4))
    assert out.shape == (120, F) and out.dtype == torch.float32
    per_chunk = len(field.calls) // 3
    assert len(field.calls) == 3 * per_chunk and per_chunk in (3, 4)  # nfe - 1 or nfe evaluations
    firsts = [field.calls[i * per_chunk] for i in range(3)]
    assert torch.equal(firsts[0]["prev_x"], torch.zeros(1, 10, F))
    assert torch.equal(firsts[0]["prev_audio_keep"], torch.zeros(1))
    assert all(torch.equal(c["prev_audio_keep"], torch.ones(1)) for c in firsts[1:])
    for k in (1, 2):
        assert torch.equal(firsts[k]["prev_x"][0], out[50 * k - 10:50 * k])
        assert torch.equal(firsts[k]["prev_audio"][0], audio[50 * k - 10:50 * k])
    assert torch.equal(firsts[0]["audio"][0], audio[:50]) and torch.equal(firsts[1]["audio"][0], audio[50:100])
    last = firsts[2]["audio"][0]
    assert torch.equal(last[:20], audio[100:]) and torch.equal(last[20:], audio[-1:].expand(30, A))
    for c in field.calls:
        assert torch.equal(c["wr"], ref[None]) and torch.equal(c["we"], emotion[None])
        assert (c["a_scale"], c["e_scale"]) == (3.0, 0.5)
    assert GuidanceOptions() == GuidanceOptions(nfe=10, a_scale=2.0, e_scale=1.0)  # FLOAT's defaults


def test_a_clip_is_generated_from_its_first_frame_and_its_emotion():
    """generate_for_clip: the reference motion is the clip's first frame (FLOAT's r_s of the source image),
    the emotion the clip's, the audio all of it."""
    motion = np.random.default_rng(0).standard_normal((60, F)).astype(np.float32)
    clip = _clip("c", motion, np.random.default_rng(1).standard_normal((60, A)).astype(np.float32),
                    np.linspace(0.1, 0.3, 7).astype(np.float32), None)
    field = Field(lambda t, x: torch.zeros_like(x))
    trained = type("Trained", (), {"model": field})()
    out = sampler.generate_for_clip(trained, clip, GuidanceOptions(nfe=2), seed=0)
    assert out.shape == (60, F) and out.dtype == np.float32
    assert np.array_equal(field.calls[0]["wr"][0].numpy(), motion[0])
    assert np.array_equal(field.calls[0]["we"][0].numpy(), clip.emotion)
    assert np.array_equal(field.calls[0]["audio"][0].numpy(), clip.audio[:50])


def test_the_same_seed_gives_the_same_motion():
    field = Field(lambda t, x: -0.3 * x)
    audio, ref, emotion = _inputs(60)
    runs = [generate_motion(field, audio, ref, emotion, GuidanceOptions(nfe=3), torch.Generator().manual_seed(s))
            for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


# --- the audio-following measurement -----------------------------------------------------------------------


def _planted(clips: int = 6, frames: int = 150, seed: int = 0):
    """Motion latents whose projection on one direction is the (per-clip offset) loudness, plus noise."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(F)
    direction /= np.linalg.norm(direction)
    motions, loudness = [], []
    for c in range(clips):
        rms = np.abs(np.sin(np.arange(frames) / (3 + c))) + c  # a per-clip level the centring must remove
        base = rng.standard_normal((frames, F)) * 0.05 + rng.standard_normal(F)
        motions.append((base + np.outer(rms, direction)).astype(np.float32))
        loudness.append(rms)
    return motions, loudness, direction


def test_loudness_direction_recovers_a_planted_direction():
    motions, loudness, direction = _planted()
    w = loudness_direction(motions, loudness)
    cosine = w @ direction / np.linalg.norm(w)
    assert cosine > 0.95, cosine  # 0.97 here: the noise of 64 other latent dimensions takes a little
    shifted = loudness_direction([m + 7.0 for m in motions], [r + 3.0 for r in loudness])  # centred per clip
    np.testing.assert_allclose(shifted, w, rtol=1e-3, atol=1e-6)  # float32 latents: rounding of the offset


def test_frame_rms_is_the_loudness_of_each_frames_640_samples(tmp_path):
    """One RMS per video frame of the waveform preprocessing sees: a click written at frame 20 of a 50-frame
    clip is the loudest frame."""
    from dali_float.demo import synth_talking_head, write_clip

    frames, _, _ = synth_talking_head(50, 64, seed=1)
    audio = np.zeros(2 * 16_000, np.float32)
    audio[20 * 640 + 100:20 * 640 + 400] = 0.8
    video = write_clip(tmp_path / "click.webm", frames, 25, audio=audio, audio_rate=16_000)
    clip = _clip("click", np.zeros((50, F), np.float32), np.zeros((50, A), np.float32), np.zeros(7, np.float32),
                    video)
    rms = sampler.frame_rms(clip, P)
    assert rms.shape == (50,) and np.isfinite(rms).all() and (rms >= 0).all()
    assert int(np.argmax(rms)) == 20 and rms[20] > 5 * np.median(rms)


def test_measure_scores_motion_that_follows_the_loudness_and_motion_that_does_not(monkeypatch):
    """A "model" returning each clip's real motion scores like the real motion; one returning another clip's
    motion scores about zero; the real motion's own score is fitted without its clip (left-one-clip-out)."""
    motions, loudness, _ = _planted(clips=6)
    clips = [_clip(f"c{i}", m, np.zeros((len(m), A), np.float32), np.full(7, 1 / 7, np.float32), None)
             for i, m in enumerate(motions)]
    rms = {c.clip_id: r for c, r in zip(clips, loudness)}
    other = {c.clip_id: motions[(i + 3) % 6] for i, c in enumerate(clips)}
    monkeypatch.setattr(sampler, "frame_rms", lambda clip, preset: rms[clip.clip_id])

    def generate(trained, clip, guidance, seed):
        return clip.motion if trained.name == "follows" else other[clip.clip_id]

    monkeypatch.setattr(sampler, "generate_for_clip", generate)
    models = {name: type("Trained", (), {"name": name, "model": type("M", (), {"preset": P}),
                                        "checkpoint": name})() for name in ("follows", "ignores")}
    result = sampler.measure_audio_following(models, clips, seeds=2, guidance=GuidanceOptions(nfe=3))
    assert result["follows"] > 0.95 and abs(result["ignores"]) < 0.3, result
    assert result["real_motion"] > 0.95
    assert (result["clips"], result["seeds"], result["nfe"]) == (6, 2, 3)
    assert set(result["per_clip"]) == {c.clip_id for c in clips}
    assert np.mean([v["follows"] for v in result["per_clip"].values()]) == pytest.approx(result["follows"])


def test_sampler_command_usage_errors():
    with pytest.raises(UsageError, match=r"--nfe counts the points of the time grid .* at least 2"):
        sampler.main(["generate", "--checkpoint", "x", "--clip", "y", "--out", "z.npy", "--nfe", "1"])
    given = {"--checkpoint": "run", "--clip": "c.mp4", "--out": "m.npy"}
    for missing in given:
        with pytest.raises(UsageError, match=missing):
            sampler.main(["generate", *[x for k, v in given.items() if k != missing for x in (k, v)]])
    with pytest.raises(UsageError):
        sampler.main([])  # no command


def test_sampler_defaults_are_floats_and_the_readmes():
    """FLOAT's defaults (options/base_options.py: nfe 10, audio guidance 2.0, emotion guidance 1.0) and the
    README's `[--seeds 2]`, as the commands parse them."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "[--nfe 10] [--a_scale 2] [--e_scale 1]" in readme and "[--seeds 2]" in readme
    args = sampler._parser().parse_args(["measure", "--checkpoint", "run"])
    assert (args.nfe, args.a_scale, args.e_scale, args.seeds) == (10, 2.0, 1.0, 2)
    assert args.baseline is None and args.json is None and not args.no_ema and args.device == "auto"


def test_render_parses_the_flags_readme_gives_it(tmp_path):
    """README's `sampler render` line: its defaults (noise seed 0 as its help says, the decoder batch left to
    the device, the run's crop and emotion source, FLOAT's guidance) and every optional flag taking a value."""
    speech = tmp_path / "speech.wav"
    speech.write_bytes(b"")
    required = ["render", "--checkpoint", "run", "--ref", "face.jpg", "--audio", str(speech), "--out", "o.mp4"]
    args = sampler._parser().parse_args(required)
    assert (args.seed, args.frame_batch, args.crop, args.emotion_class) == (0, None, None, None) and args.progress
    assert (args.nfe, args.a_scale, args.e_scale) == (10, 2.0, 1.0)
    args = sampler._parser().parse_args(required + ["--seed", "3", "--frame_batch", "4", "--crop", "center",
                                                    "--emotion_class", "happy", "--no_progress"])
    assert (args.seed, args.frame_batch, args.crop, args.emotion_class, args.progress) == (3, 4, "center", "happy", False)


# --- trained checkpoints and the command ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two 3-step runs (torch loader, EMA kept) on a synthetic cache: (cache, run A, run B)."""
    from dali_float.loaders import TrainingCache
    from dali_float.training import DataSource, TrainConfig, train
    from synthetic import write_synthetic_cache

    base = tmp_path_factory.mktemp("sampler_runs")
    # 40 frames: in the manifest, shorter than a window, so not a usable clip
    cache = TrainingCache.open(base / "cache", P, write_synthetic_cache(base / "cache", P, (70, 130, 40)))
    runs = []
    for name, seed in (("a", 0), ("b", 1)):
        cfg = TrainConfig(preset="tiny", loader="torch", steps=3, batch_size=2, output_dir=base / name, progress=False,
                          device="cpu", num_workers=0, ema_decay=0.5, seed=seed, cache_dir=base / "cache",
                          warmup_steps=1, lr=1e-2)
        train(cfg, DataSource.from_cache(cache))
        runs.append(base / name)
    return cache, runs[0], runs[1]


def test_load_trained_takes_the_ema_weights_unless_asked_not_to(two_runs):
    from dali_float.training.checkpoint import find_checkpoint, load_checkpoint

    _, run, _ = two_runs
    state = load_checkpoint(find_checkpoint(run))
    ema, raw = sampler.load_trained(run), sampler.load_trained(run, use_ema=False)
    assert not ema.model.training and ema.fingerprint == state["fingerprint"]
    name = "fmt.decoder.linear.weight"
    assert torch.equal(ema.model.state_dict()[name], state["ema"]["params"][name])
    assert torch.equal(raw.model.state_dict()[name], state["model"][name])
    assert not torch.equal(ema.model.state_dict()[name], raw.model.state_dict()[name])


def test_generate_command_writes_what_generate_for_clip_makes(two_runs, tmp_path):
    cache, run, _ = two_runs
    clip_id = next(cache.clip_id(i) for i in range(len(cache)) if cache.num_frames[i] == 130)
    out = tmp_path / "motion.npy"
    assert sampler.main(["generate", "--checkpoint", str(run), "--clip", clip_id, "--out", str(out), "--nfe", "3",
                         "--seed", "2"]) == 0
    trained = sampler.load_trained(run)
    data = sampler.read_clip(sampler.open_cache(trained), clip_id)
    assert data.motion.shape == (130, F) and data.audio.shape == (130, A)
    expected = sampler.generate_for_clip(trained, data, GuidanceOptions(nfe=3), seed=2)
    motion = np.load(out)
    assert motion.dtype == np.float32 and np.array_equal(motion, expected)
    usable = {cache.clip_id(i) for i in range(len(cache))}
    for unusable in ("nope.mp4", next(c for c in entries_of(cache.layout) if c not in usable)):  # 40 frames
        with pytest.raises(UsageError, match="not a usable clip"):
            sampler.main(["generate", "--checkpoint", str(run), "--clip", unusable, "--out", str(out)])


def test_generate_command_as_a_script(two_runs, tmp_path):
    """`python -m dali_float.sampler generate`: the output's folder is made, the log says what was written."""
    cache, run, _ = two_runs
    out = tmp_path / "new" / "folder" / "motion.npy"
    done = subprocess.run([sys.executable, "-m", "dali_float.sampler", "generate", "--checkpoint", str(run), "--clip",
                           cache.clip_id(0), "--out", str(out), "--nfe", "2"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert np.load(out).shape == (int(cache.num_frames[0]), F) and f"wrote {out}" in done.stderr


def test_measure_command_compares_two_runs_and_writes_json(two_runs, tmp_path, monkeypatch, capsys):
    cache, run, baseline = two_runs
    clip_ids = [cache.clip_id(i) for i in range(len(cache))]
    loud = {c: np.abs(np.sin(np.arange(t) / 5.0)) for c, t in zip(clip_ids, cache.num_frames.tolist())}
    monkeypatch.setattr(sampler, "frame_rms", lambda clip, preset: loud[clip.clip_id])  # synthetic: no audio file
    out = tmp_path / "measure.json"
    assert sampler.main(["measure", "--checkpoint", str(run), "--baseline", str(baseline), "--seeds", "1", "--nfe", "2",
                         "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"model", "baseline", "real_motion", "per_clip"} and result["clips"] == 2
    assert set(result["per_clip"]) == set(clip_ids) and result["nfe"] == 2
    # The same as the measurement itself on both runs' EMA weights (the command's defaults).
    clips = [sampler.read_clip(cache, c) for c in clip_ids]
    direct = sampler.measure_audio_following({"model": sampler.load_trained(run),
                                              "baseline": sampler.load_trained(baseline)}, clips, 1,
                                             GuidanceOptions(nfe=2))
    assert json.loads(json.dumps(direct)) == result
    printed = json.loads(capsys.readouterr().out)  # the summary on stdout: everything but the per-clip scores
    assert printed == {k: v for k, v in result.items() if k != "per_clip"}


# ---------------------------------------------------------------------------------------------- FLOAT's own loop

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
    ours = generate_motion(model, audio, ref, emotion, GuidanceOptions(nfe=nfe), torch.Generator().manual_seed(7))
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
    generate_motion(model, torch.zeros(preset.timing.num_frames, preset.audio_feature_dim),
                    torch.zeros(preset.motion_dim), torch.zeros(7), GuidanceOptions(nfe=10))
    assert calls == pytest.approx([i / 9 for i in range(9)])


def test_nfe_below_2_is_a_usage_error():
    with pytest.raises(UsageError, match="at least 2"):
        time_grid(1)
    with pytest.raises(UsageError, match="at least 2"):  # the command line refuses it before loading anything
        sampler.main(["generate", "--checkpoint", "nowhere", "--clip", "x", "--out", "y.npy", "--nfe", "1"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA says so")
def test_render_on_cuda_without_a_gpu_is_one_line(tmp_path):
    """--device cuda where there is none: one error line before anything loads (it was a traceback)."""
    speech = tmp_path / "speech.wav"
    speech.write_bytes(b"")
    for device in ("cuda", "cuda:1"):
        with pytest.raises(UsageError, match=rf"^--device {device}: CUDA is not available on this machine; use "
                                             rf"--device cpu \(or auto\)$"):
            sampler.main(["render", "--checkpoint", "nowhere", "--ref", "x.jpg", "--audio", str(speech), "--out",
                          str(tmp_path / "o.mp4"), "--device", device])
