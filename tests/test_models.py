"""Models: shapes for both presets, FLOAT's key names, strict checkpoint loading, 25 fps audio, emotions, FMT."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dali_float.models as models
from dali_float.cli import add_model_arguments
from dali_float.config import EMOTION_CLASSES, FLOAT_PRESET, TINY_PRESET
from dali_float.errors import CheckpointError, MediaError, UsageError
from dali_float.models import (AudioEncoder, EmotionEncoder, FloatMotionModel, ModelSources,
                               MotionEncoder, build_encoders, count_parameters, emotion_from_filename, emotion_vector,
                               load_motion_checkpoint, model_identities, uniform_emotion)
from dali_float.models.motion_encoder import FLOAT_DIRECTION_KEY, FLOAT_ENCODER_PREFIX
import float_reference
from float_layout import (TINY_DIMS, FloatDims, audio_projection_layout, filled, float_checkpoint_layout,
                          fmt_layout, motion_encoder_layout)

TINY = TINY_PRESET
REPO = Path(__file__).resolve().parents[1]
F_TINY = TINY.motion_dim
A_TINY = TINY.audio_feature_dim
SAMPLES_PER_FRAME = TINY.timing.audio_samples_per_frame


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _encoder_key(float_key: str) -> str:
    """Where a float.pth key of the motion encoder lives in MotionEncoder (the one renaming the loader does)."""
    return "direction.weight" if float_key == FLOAT_DIRECTION_KEY else float_key.removeprefix(FLOAT_ENCODER_PREFIX)


# ---------------------------------------------------------------------------------------------- motion encoder

def test_motion_encoder_tiny_shapes_and_basis():
    enc = MotionEncoder(TINY.motion, seed=TINY.init_seed).eval()
    with torch.no_grad():
        out = enc(_images(4, TINY.motion.input_size))
    assert out.identity.shape == (4, F_TINY)
    assert out.coefficients.shape == (4, TINY.motion.num_coefficients)
    assert out.motion_latents.shape == (4, F_TINY)
    assert all(t.dtype == torch.float32 for t in out)
    q = enc.basis()
    assert q.shape == (F_TINY, TINY.motion.num_coefficients)
    torch.testing.assert_close(q.T @ q, torch.eye(q.shape[1]), atol=1e-5, rtol=0)
    # r = Q lambda, and lambda is recovered from r because Q is orthonormal.
    torch.testing.assert_close(out.motion_latents, out.coefficients @ q.T)
    torch.testing.assert_close(out.motion_latents @ q, out.coefficients, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expects"):
        enc(_images(1, TINY.motion.input_size * 2))


@pytest.mark.parametrize("preset", [TINY, FLOAT_PRESET], ids=["tiny", "float"])
def test_motion_encoder_matches_an_independent_lia_forward(preset):
    """The LIA encoder against tests/float_reference.py (FLOAT's equalised convs, blur, fused leaky ReLU, skip
    paths, motion head and direction dictionary written out functionally), random weights and biases."""
    enc = MotionEncoder(preset.motion, seed=3).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    images = _images(2 if preset is TINY else 1, preset.motion.input_size, seed=5)
    with torch.no_grad():
        out = enc(images)
        s, lam, r = float_reference.lia_encode(enc.state_dict(), images)
    torch.testing.assert_close(out.identity, s, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.coefficients, lam, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.motion_latents, r, atol=1e-4, rtol=1e-4)
    assert s.abs().mean() > 0.1 and lam.abs().mean() > 0.1  # a signal, not vanishing activations


def test_motion_encoder_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = MotionEncoder(TINY.motion, seed=5), MotionEncoder(TINY.motion, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = MotionEncoder(TINY.motion, seed=6)
    assert not torch.equal(a.direction.weight, c.direction.weight)


def test_motion_encoder_float_keys_shapes_and_forward():
    enc = MotionEncoder(FLOAT_PRESET.motion).eval()
    found = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert found == {_encoder_key(k): v for k, v in motion_encoder_layout(FloatDims(), buffers=True).items()}
    # The blur kernels are buffers in FLOAT too (Blur.register_buffer), the rest are parameters.
    assert {n for n, _ in enc.named_buffers()} == {k for k in found if k.endswith(".kernel")}
    assert "net_app.convs.8.bias" not in found
    with torch.no_grad():
        start = time.perf_counter()
        out = enc(_images(1, 512))
        elapsed = time.perf_counter() - start
    logging.getLogger(__name__).info("float motion encoder: %.2f s per 512x512 frame on the CPU", elapsed)
    assert out.identity.shape == (1, 512) and out.coefficients.shape == (1, 20) and out.motion_latents.shape == (1, 512)
    assert torch.isfinite(out.motion_latents).all()


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_load_float_layout_checkpoint(tmp_path, wrap):
    """A float.pth laid out as FLOAT's code lays it out (tests/float_layout.py), with and without buffers:
    every encoder tensor lands in the parameter or buffer of the same role; the other models' keys are ignored."""
    state = filled(float_checkpoint_layout(TINY_DIMS, buffers=wrap is None), seed=1)
    path = tmp_path / "float.pth"
    torch.save({wrap: state} if wrap else state, path)
    target = load_motion_checkpoint(MotionEncoder(TINY.motion, seed=2).eval(), path)
    own = target.state_dict()
    loaded = {k for k in state if k.startswith(FLOAT_ENCODER_PREFIX) or k == FLOAT_DIRECTION_KEY}
    for key in loaded:
        assert torch.equal(own[_encoder_key(key)], state[key]), key
    params = {name for name, _ in target.named_parameters()}
    assert params <= {_encoder_key(k) for k in loaded}  # every parameter came from the file
    assert {k for k in state if _encoder_key(k) in own} == loaded  # and nothing of the other models went in


def test_float_sized_checkpoint_fits_the_motion_encoder_exactly(tmp_path):
    """FLOAT's 512x512 encoder layout, names and shapes only (meta tensors): loads strictly, nothing left over."""
    for buffers in (False, True):
        torch.save(filled(float_checkpoint_layout(FloatDims(), buffers), device="meta"), tmp_path / "float.pth")
        with torch.device("meta"):
            enc = MotionEncoder(FLOAT_PRESET.motion)
        load_motion_checkpoint(enc, tmp_path / "float.pth")


def test_load_own_state_dict(tmp_path):
    source = MotionEncoder(TINY.motion, seed=3)
    path = tmp_path / "motion.pt"
    torch.save(source.state_dict(), path)
    target = load_motion_checkpoint(MotionEncoder(TINY.motion, seed=4), path)
    assert torch.equal(target.direction.weight, source.direction.weight)


def test_motion_checkpoint_errors(tmp_path):
    enc = MotionEncoder(TINY.motion)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_motion_checkpoint(enc, tmp_path / "nope.pth")

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"not a torch checkpoint: a text file \(it begins 'not a checkpoint'\); "
                                              r"give a file written by torch.save, e.g. FLOAT's checkpoints/float.pth"):
        load_motion_checkpoint(enc, text)

    state = filled(float_checkpoint_layout(TINY_DIMS))
    renamed = dict(state)
    renamed[FLOAT_ENCODER_PREFIX + "fc.9.weight"] = renamed.pop(FLOAT_ENCODER_PREFIX + "fc.4.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointError) as err:
        load_motion_checkpoint(enc, tmp_path / "renamed.pth")
    message = str(err.value)
    assert "renamed.pth" in message and "1 missing, 1 unexpected" in message
    assert "fc.4.weight" in message and "fc.9.weight" in message and "\n" not in message

    reshaped = dict(state)
    reshaped[FLOAT_DIRECTION_KEY] = torch.zeros(F_TINY, 7)
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(CheckpointError, match=r"direction\.weight expected \(64, 20\) found \(64, 7\)"):
        load_motion_checkpoint(enc, tmp_path / "reshaped.pth")

    # A float-preset checkpoint given to the tiny preset: many mismatches, one line, says what to do.
    torch.save(MotionEncoder(FLOAT_PRESET.motion).state_dict(), tmp_path / "float_sized.pth")
    with pytest.raises(CheckpointError, match="--preset float") as err:
        load_motion_checkpoint(enc, tmp_path / "float_sized.pth")
    assert "\n" not in str(err.value)


def test_checkpoints_are_read_as_weights_only(tmp_path):
    """A checkpoint is never unpickled beyond tensors (torch.load weights_only): one holding any other object is
    refused, as is a dict whose values are not tensors."""
    state = MotionEncoder(TINY.motion).state_dict()
    torch.save({"state_dict": state, "opt": argparse.Namespace(lr=1)}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_motion_checkpoint(MotionEncoder(TINY.motion), tmp_path / "pickled.pth")
    torch.save({"step": 3, "lr": 0.1}, tmp_path / "numbers.pth")
    with pytest.raises(CheckpointError, match="holds a dict, not a state dict of tensors"):
        load_motion_checkpoint(MotionEncoder(TINY.motion), tmp_path / "numbers.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_motion_checkpoint(MotionEncoder(TINY.motion), tmp_path / "list.pth")


def test_a_mismatch_lists_the_first_three_keys_then_a_count(tmp_path):
    state = MotionEncoder(TINY.motion).state_dict()
    for n, tail in ((3, ""), (4, ", ... (+1)")):
        missing = [k for k in state if k.startswith("fc.")][:n]  # listed in the model's order
        torch.save({k: v for k, v in state.items() if k not in missing}, tmp_path / "m.pth")
        with pytest.raises(CheckpointError) as err:
            load_motion_checkpoint(MotionEncoder(TINY.motion), tmp_path / "m.pth")
        assert f"{n} missing" in str(err.value) and f"missing: {', '.join(missing[:3])}{tail};" in str(err.value)


# ---------------------------------------------------------------------------------------------- audio encoder

@pytest.fixture(scope="module")
def tiny_audio() -> AudioEncoder:
    return AudioEncoder(TINY)


@pytest.mark.parametrize("num_frames", [1, 10, 50, 60, 137])
@pytest.mark.parametrize("num_samples", [400, 640 * 50, 12_345])
def test_audio_encoder_gives_exactly_t_frames(tiny_audio, num_samples, num_frames):
    wave = torch.randn(2, num_samples, generator=torch.Generator().manual_seed(num_samples))
    out = tiny_audio.encode(wave, num_frames)
    assert out.shape == (2, num_frames, A_TINY) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_audio_encoder_matches_manual_layers(tiny_audio):
    """Interpolate the conv features, then run projection + every transformer layer by hand."""
    wave = torch.randn(1, 50 * SAMPLES_PER_FRAME, generator=torch.Generator().manual_seed(0))
    model = tiny_audio.model
    with torch.no_grad():
        conv = torch.nn.functional.interpolate(model.feature_extractor(wave), size=50, mode="linear",
                                               align_corners=True)
        hidden, _ = model.feature_projection(conv.transpose(1, 2))
        hidden = model.encoder.layer_norm(hidden + model.encoder.pos_conv_embed(hidden))
        layers = []
        for layer in model.encoder.layers:
            hidden = layer(hidden)
            layers.append(hidden)
    torch.testing.assert_close(tiny_audio.encode(wave, 50), torch.cat(layers, dim=-1))


def test_random_init_encoders_are_seeded_and_leave_the_global_rng_alone():
    """Without weights the encoders are the same for the same preset seed (the cache fingerprint says
    random-init:<seed>), and the caller's random stream is untouched."""
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    a, b = AudioEncoder(TINY), AudioEncoder(TINY)
    ea, eb = EmotionEncoder(TINY), EmotionEncoder(TINY)
    assert torch.equal(torch.random.get_rng_state(), before)
    for x, y in ((a, b), (ea, eb)):
        assert all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values()))
    other = AudioEncoder(dataclasses.replace(TINY, init_seed=1))
    assert not torch.equal(a.model.encoder.layers[0].attention.q_proj.weight,
                           other.model.encoder.layers[0].attention.q_proj.weight)


def test_random_init_layouts_are_the_real_models():
    """facebook/wav2vec2-base-960h: group-norm feature extractor without conv biases; the r-f emotion model
    (wav2vec2-large-xlsr-53): layer-norm feature extractor with conv biases, stable layer norm."""
    from dali_float.models.audio_encoder import wav2vec2_config

    base, large = wav2vec2_config(FLOAT_PRESET.audio.wav2vec2), wav2vec2_config(FLOAT_PRESET.emotion.wav2vec2)
    assert (base.feat_extract_norm, base.conv_bias, base.do_stable_layer_norm) == ("group", False, False)
    assert (large.feat_extract_norm, large.conv_bias, large.do_stable_layer_norm) == ("layer", True, True)
    assert (base.hidden_size, base.num_hidden_layers, large.hidden_size, large.num_hidden_layers) == (768, 12, 1024, 24)


def test_audio_encoder_frozen_and_too_short(tiny_audio):
    tiny_audio.train()
    assert not tiny_audio.model.training
    assert not any(p.requires_grad for p in tiny_audio.parameters())
    with pytest.raises(MediaError, match="too short"):
        tiny_audio.encode(torch.zeros(1, 399), 1)


def test_audio_encoder_float_sizes():
    enc = AudioEncoder(FLOAT_PRESET)
    assert enc.feature_dim == FLOAT_PRESET.audio_feature_dim == 9216
    out = enc.encode(torch.randn(1, 25 * 640), 25)
    assert out.shape == (1, 25, 9216)


def test_wav2vec2_path_roundtrip_and_wrong_size(tmp_path, tiny_audio):
    tiny_audio.model.save_pretrained(tmp_path / "w2v")
    loaded = AudioEncoder(TINY, tmp_path / "w2v")
    wave = torch.randn(1, 30 * SAMPLES_PER_FRAME)
    torch.testing.assert_close(loaded.encode(wave, 30), tiny_audio.encode(wave, 30), atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="use --preset tiny"):
        AudioEncoder(FLOAT_PRESET, tmp_path / "w2v")
    with pytest.raises(CheckpointError, match="does not load"):
        AudioEncoder(TINY, tmp_path)  # a folder without weights
    with pytest.raises(CheckpointError, match="does not exist"):
        AudioEncoder(TINY, tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- emotion

@pytest.fixture(scope="module")
def tiny_emotion() -> EmotionEncoder:
    return EmotionEncoder(TINY)


def test_emotion_encoder_is_frozen_and_checks_its_input(tiny_emotion):
    tiny_emotion.train()
    assert not tiny_emotion.model.training and not any(p.requires_grad for p in tiny_emotion.parameters())
    assert tiny_emotion.predict(torch.randn(400)).shape == (7,)  # the shortest input wav2vec2 takes
    with pytest.raises(MediaError, match="399 samples is too short"):
        tiny_emotion.predict(torch.randn(1, 399))
    with pytest.raises(ValueError, match=r"expects a \(1, N\) waveform"):
        tiny_emotion.predict(torch.randn(2, 16_000))
    with pytest.raises(ValueError, match="expects"):
        tiny_emotion.predict(torch.randn(1, 1, 16_000))


def test_emotion_predict_is_a_distribution(tiny_emotion):
    probs = tiny_emotion.predict(torch.randn(1, 16_000))
    assert probs.shape == (7,) and probs.dtype == torch.float32
    assert abs(float(probs.sum()) - 1.0) < 1e-5 and (probs > 0).all()


@pytest.mark.parametrize("mode", ["mean", "sum", "max"])
def test_emotion_classifier_pools_as_its_config_says(tiny_emotion, mode):
    """r-f's Wav2Vec2ForSpeechClassification: the last hidden states pooled over time (mean, sum or max), then
    dense -> tanh -> out_proj; another pooling mode is refused."""
    import copy

    from dali_float.models.emotion import Wav2Vec2EmotionClassifier

    config = copy.deepcopy(tiny_emotion.model.config)
    config.pooling_mode = mode
    classifier = Wav2Vec2EmotionClassifier(config)
    classifier.load_state_dict(tiny_emotion.model.state_dict())
    classifier.eval()
    wave = torch.randn(2, 16_000, generator=torch.Generator().manual_seed(1))
    pool = {"mean": lambda h: h.mean(dim=1), "sum": lambda h: h.sum(dim=1), "max": lambda h: h.amax(dim=1)}[mode]
    with torch.no_grad():
        hidden = classifier.wav2vec2(wave).last_hidden_state
        head = classifier.classifier
        torch.testing.assert_close(classifier(wave), head.out_proj(torch.tanh(head.dense(pool(hidden)))))
    config.pooling_mode = "median"
    with pytest.raises(CheckpointError, match="pooling_mode 'median'"):
        Wav2Vec2EmotionClassifier(config)


def test_a_wav2vec2_folder_missing_weights_is_refused(tmp_path, tiny_audio):
    """A folder whose weights do not cover the model is refused, not completed with random weights; only the
    SpecAugment vector (unused at inference) may be absent."""
    from safetensors.torch import load_file

    tiny_audio.model.save_pretrained(tmp_path / "w2v")
    state = load_file(tmp_path / "w2v" / "model.safetensors")
    (tmp_path / "w2v" / "model.safetensors").unlink()
    state.pop("masked_spec_embed", None)
    torch.save(state, tmp_path / "w2v" / "pytorch_model.bin")
    wave = torch.randn(1, 30 * SAMPLES_PER_FRAME)
    torch.testing.assert_close(AudioEncoder(TINY, tmp_path / "w2v").encode(wave, 30), tiny_audio.encode(wave, 30))
    del state[next(k for k in state if k.startswith("encoder.layers.0."))]
    torch.save(state, tmp_path / "w2v" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="does not fit Wav2Vec2Model: 1 missing and 0 shape-mismatched"):
        AudioEncoder(TINY, tmp_path / "w2v")


def test_emotion_from_pretrained_in_rf_layout(tmp_path, tiny_emotion):
    """Saved like the r-f checkpoint: config with id2label and pooling_mode, legacy weight-norm names, .bin."""
    folder = tmp_path / "ser"
    tiny_emotion.model.save_pretrained(tmp_path / "saved")
    folder.mkdir()
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["pooling_mode"] == "mean" and config["id2label"]["0"] == "angry"
    config["architectures"] = ["Wav2Vec2ForSpeechClassification"]
    (folder / "config.json").write_text(json.dumps(config))
    legacy = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                                 "weight_v"): v
              for k, v in tiny_emotion.model.state_dict().items()}
    assert any(k.endswith("weight_g") for k in legacy) and any(k.startswith("classifier.out_proj") for k in legacy)
    torch.save(legacy, folder / "pytorch_model.bin")
    wave = torch.randn(1, 16_000)
    torch.testing.assert_close(EmotionEncoder(TINY, folder).predict(wave), tiny_emotion.predict(wave))

    # Another label order in the checkpoint: the output is still in EMOTION_CLASSES order.
    order = list(reversed(EMOTION_CLASSES))
    config["id2label"] = {str(i): name for i, name in enumerate(order)}
    config["label2id"] = {name: i for i, name in enumerate(order)}
    (folder / "config.json").write_text(json.dumps(config))
    permuted = EmotionEncoder(TINY, folder).predict(wave)
    torch.testing.assert_close(permuted, tiny_emotion.predict(wave).flip(0))

    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(7)}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="expected the 7 classes"):
        EmotionEncoder(TINY, folder)


@pytest.mark.parametrize("name, emotion", [
    ("01-01-01-01-01-01-01.mp4", "neutral"), ("02-01-02-02-01-02-12.mp4", "neutral"),  # calm -> neutral
    ("01-01-03-01-01-01-12.mp4", "happy"), ("01-01-04-01-01-01-12.wav", "sad"),
    ("01-01-05-01-01-01-12.mp4", "angry"), ("01-01-06-01-01-01-12.mp4", "fear"),
    ("01-01-07-01-01-01-12.mp4", "disgust"), ("Actor_24/01-01-08-02-02-02-24.mp4", "surprise"),
])
def test_ravdess_names(name, emotion):
    vector = emotion_from_filename(name)
    assert vector.dtype == np.float32 and vector.shape == (7,)
    assert vector[EMOTION_CLASSES.index(emotion)] == 1.0 and vector.sum() == 1.0


@pytest.mark.parametrize("name", ["WDA_BarackObama_000.mp4", "01-01-09-01-01-01-12.mp4", "01-01-03-01-01-01.mp4"])
def test_bad_ravdess_name(name):
    with pytest.raises(MediaError, match="MM-VC-EE-II-SS-RR-AA"):
        emotion_from_filename(name)


def test_uniform_emotion():
    vector = uniform_emotion()
    assert vector.shape == (7,) and vector.dtype == np.float32
    np.testing.assert_allclose(vector, 1 / 7)


# ---------------------------------------------------------------------------------------------- FMT

def _fmt_inputs(preset, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    f, a, e = preset.motion_dim, preset.audio_feature_dim, preset.emotion_dim
    return dict(t=torch.rand(batch, generator=g), x=torch.randn(batch, 50, f, generator=g),
                prev_x=torch.randn(batch, 10, f, generator=g), audio=torch.randn(batch, 50, a, generator=g),
                prev_audio=torch.randn(batch, 10, a, generator=g), wr=torch.randn(batch, f, generator=g),
                we=torch.softmax(torch.randn(batch, e, generator=g), -1))


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Undo adaLN-Zero (which makes the output exactly zero) so the tests see real dependencies."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_fmt_matches_an_independent_forward():
    """FloatMotionModel against tests/float_reference.py (FLOAT's FMT written out: sinusoidal positions, timestep
    embedding, condition per frame, DiT blocks with framewise adaLN, attention as an explicit softmax over a
    +-2 frame band, final layer) and the audio projection, a dropped audio zero after the projection."""
    model = FloatMotionModel(TINY).eval()
    _randomise(model, seed=3)
    inputs = _fmt_inputs(TINY, seed=4)
    keep = torch.tensor([1.0, 0.0])
    fmt_sd = {k[len("fmt."):]: v for k, v in model.state_dict().items() if k.startswith("fmt.")}
    proj_sd = {k[len("audio_projection."):]: v for k, v in model.state_dict().items() if k.startswith("audio_proj")}
    with torch.no_grad():
        wa = float_reference.audio_projection(proj_sd, inputs["audio"]) * keep[:, None, None]
        prev_wa = float_reference.audio_projection(proj_sd, inputs["prev_audio"])
        expected = float_reference.fmt_velocity(fmt_sd, TINY.fmt.num_heads, inputs["t"], inputs["x"], inputs["prev_x"],
                                                wa, prev_wa, inputs["wr"], inputs["we"])
        got = model(**inputs, audio_keep=keep)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert expected.abs().mean() > 0.01


def test_fmt_embeddings_are_floats():
    """The fixed position table (60 x 1024) and the timestep embedding (256, and an odd width) as FLOAT defines
    them; the FMT's LayerNorms use FLOAT's eps 1e-6, the projection's torch's default (as FLOAT's nn.LayerNorm)."""
    from dali_float.models.fmt import TimestepEmbedder, sinusoid_table

    torch.testing.assert_close(sinusoid_table(60, 1024), float_reference.sinusoid_table(60, 1024), atol=1e-6, rtol=0)
    t = torch.tensor([0.0, 0.013, 0.5, 0.999, 1.0])
    for dim in (256, 255):
        torch.testing.assert_close(TimestepEmbedder(8, dim).frequency_embedding(t),
                                   float_reference.timestep_embedding(t, dim), atol=1e-6, rtol=1e-5)
    model = FloatMotionModel(TINY)
    torch.testing.assert_close(model.fmt.pos_embed[0], float_reference.sinusoid_table(60, TINY.fmt.hidden_size),
                               atol=1e-6, rtol=0)
    norms = [m for m in model.fmt.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * TINY.fmt.depth + 1 and all(m.eps == 1e-6 and m.weight is None for m in norms)
    assert model.audio_projection[1].eps == 1e-5


def test_fmt_init_is_dits_and_seeded():
    """FLOAT's initialize_weights: xavier-uniform linears with zero biases, N(0, 0.02) timestep MLP, adaLN and
    output layers zero; the audio projection torch's default U(+-1/sqrt(fan in)). The same seed, the same weights."""
    model = FloatMotionModel(TINY, seed=5)
    again, other = FloatMotionModel(TINY, seed=5), FloatMotionModel(TINY, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(model.fmt.blocks[0].attn.qkv.weight, other.fmt.blocks[0].attn.qkv.weight)
    assert not torch.equal(model.audio_projection[0].weight, other.audio_projection[0].weight)
    fmt = model.fmt
    zeroed = {id(m) for m in [*(b.adaLN_modulation[1] for b in fmt.blocks), fmt.decoder.adaLN_modulation[1],
                              fmt.decoder.linear]}
    normal = {id(fmt.t_embedder.mlp[0]), id(fmt.t_embedder.mlp[2])}
    for m in fmt.modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        w = m.weight.detach()
        if id(m) in zeroed:
            assert not w.any() and not m.bias.any()
        elif id(m) in normal:
            assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002 and not m.bias.any()
        else:
            bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
            assert w.abs().max() <= bound and abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound
            assert not m.bias.any()
    linear, norm = model.audio_projection[0], model.audio_projection[1]
    bound = 1 / math.sqrt(linear.in_features)
    for t in (linear.weight.detach(), linear.bias.detach()):
        assert t.abs().max() <= bound and abs(t.std().item() - bound / math.sqrt(3)) < 0.15 * bound
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()


def test_fmt_shapes_and_zero_init():
    model = FloatMotionModel(TINY).eval()
    inputs = _fmt_inputs(TINY)
    out = model(**inputs)
    assert out.shape == (2, TINY.timing.window_frames, F_TINY)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the untrained model predicts zero velocity
    assert not model.fmt.pos_embed.requires_grad
    assert model.fmt.alignment_mask.dtype == torch.bool


def test_fmt_banded_attention():
    preset = dataclasses.replace(TINY, fmt=dataclasses.replace(TINY.fmt, depth=1))
    model = FloatMotionModel(preset).eval()
    _randomise(model)
    inputs = _fmt_inputs(preset, batch=1)
    base = model(**inputs)
    window = preset.fmt.attention_window
    for j in (0, 17, 49):  # current frame j is window frame 10 + j
        changed = dict(inputs, x=inputs["x"].clone())
        changed["x"][:, j] += 1.0
        diff = (model(**changed) - base).abs().amax(dim=(0, 2))
        moved = set(torch.nonzero(diff > 1e-6).flatten().tolist())
        frame = 10 + j
        assert moved == {i for i in range(60) if abs(i - frame) <= window}


def test_fmt_does_not_modify_inputs_and_keep_masks():
    model = FloatMotionModel(TINY).eval()
    _randomise(model)
    inputs = _fmt_inputs(TINY)
    copies = {k: v.clone() for k, v in inputs.items()}
    keep = torch.tensor([0.0, 1.0])
    out = model(**inputs, audio_keep=keep)
    assert all(torch.equal(inputs[k], copies[k]) for k in inputs)
    # A dropped audio condition is zero after the projection (FLOAT), not zero raw features.
    wa = model.audio_projection(inputs["audio"]) * keep[:, None, None]
    expected = model.fmt(inputs["t"], inputs["x"], inputs["prev_x"], wa, model.audio_projection(inputs["prev_audio"]),
                         inputs["wr"], inputs["we"])
    torch.testing.assert_close(out, expected)


def test_velocity_with_guidance():
    model = FloatMotionModel(TINY).eval()
    _randomise(model)
    inputs = _fmt_inputs(TINY)
    zeros = torch.zeros(2)
    with torch.no_grad():
        uncond = model(**dict(inputs, we=torch.zeros_like(inputs["we"])), audio_keep=zeros)
        all_cond = model(**inputs)
        audio_only = model(**dict(inputs, we=torch.zeros_like(inputs["we"])))
    expected = uncond + 2.0 * (audio_only - uncond) + 1.0 * (all_cond - audio_only)
    torch.testing.assert_close(model.velocity_with_guidance(**inputs), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.velocity_with_guidance(**inputs, a_scale=1.0, e_scale=1.0), all_cond)


@pytest.fixture(scope="module")
def float_model_meta() -> FloatMotionModel:
    """The float preset's FloatMotionModel on the meta device: names and shapes, no memory, no init time."""
    with torch.device("meta"):
        return FloatMotionModel(FLOAT_PRESET)


def test_velocity_with_guidance_keeps_the_previous_audio_rule_in_all_three_passes():
    """Batch 4; the previous audio dropped for the samples whose prev_audio_keep is 0, in the unconditional, the
    audio-only and the fully conditioned pass alike (FLOAT keeps prev_wa in all three)."""
    model = FloatMotionModel(TINY).eval()
    _randomise(model, seed=1)
    inputs = _fmt_inputs(TINY, batch=4, seed=2)
    prev_keep = torch.tensor([0.0, 1.0, 1.0, 0.0])
    zeros, no_emotion = torch.zeros(4), dict(inputs, we=torch.zeros_like(inputs["we"]))
    with torch.no_grad():
        uncond = model(**no_emotion, audio_keep=zeros, prev_audio_keep=prev_keep)
        audio_only = model(**no_emotion, prev_audio_keep=prev_keep)
        all_cond = model(**inputs, prev_audio_keep=prev_keep)
        got = model.velocity_with_guidance(**inputs, a_scale=2.5, e_scale=0.5, prev_audio_keep=prev_keep)
    torch.testing.assert_close(got, uncond + 2.5 * (audio_only - uncond) + 0.5 * (all_cond - audio_only),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, model.velocity_with_guidance(**inputs, a_scale=2.5, e_scale=0.5))


def test_fmt_checks_its_frames_and_defaults_to_the_presets_seed():
    model = FloatMotionModel(TINY)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 FloatMotionModel(TINY, seed=TINY.init_seed).state_dict().values()))
    inputs = _fmt_inputs(TINY)
    with pytest.raises(ValueError, match="motion has 60 frames and audio 59"):
        model(**dict(inputs, prev_audio=inputs["prev_audio"][:, 1:]))
    with pytest.raises(ValueError, match="at most 60"):
        model(**dict(inputs, prev_x=torch.cat([inputs["prev_x"]] * 2, dim=1),
                     prev_audio=torch.cat([inputs["prev_audio"]] * 2, dim=1)))
    shorter = model(**dict(inputs, prev_x=inputs["prev_x"][:, :5], prev_audio=inputs["prev_audio"][:, :5]))
    assert shorter.shape == (2, 55, F_TINY)  # fewer previous frames: positions 0..54


def test_fmt_float_keys_shapes_and_parameter_count(float_model_meta):
    found = {f"fmt.{k}": tuple(v.shape) for k, v in float_model_meta.fmt.state_dict().items()}
    assert found == fmt_layout(FloatDims(), buffers=True)
    trainable = sum(p.numel() for p in float_model_meta.fmt.parameters() if p.requires_grad)
    logging.getLogger(__name__).info("float FMT: %d trainable parameters", trainable)
    assert abs(trainable - 156.6e6) / 156.6e6 < 1e-3  # FLOAT.md: about 156.6 M for the FMT alone
    assert not float_model_meta.fmt.pos_embed.requires_grad  # fixed sinusoids, a Parameter as in float.pth


def test_float_model_audio_projection_size(float_model_meta):
    """FloatMotionModel's own projection: Linear(9216 -> 512), LayerNorm(512), SiLU, FLOAT's 4.72 M parameters."""
    projection = float_model_meta.audio_projection
    assert [type(m) for m in projection] == [torch.nn.Linear, torch.nn.LayerNorm, torch.nn.SiLU]
    assert (projection[0].in_features, projection[0].out_features) == (12 * 768, 512)
    size = count_parameters(projection)
    assert size == sum(int(np.prod(s)) for s in audio_projection_layout(FloatDims()).values()) == 4_720_128
    assert count_parameters(float_model_meta) == count_parameters(float_model_meta.fmt) + size
    trainable = sum(p.numel() for p in float_model_meta.parameters() if p.requires_grad)
    assert abs(trainable - 161.3e6) / 161.3e6 < 1e-3  # FLOAT.md: ~161.3 M trainable in all


def test_load_float_checkpoint(tmp_path):
    """A float.pth of FLOAT's layout (tests/float_layout.py, the tiny sizes): every fmt.* and
    audio_encoder.audio_projection.* tensor lands in the parameter of the same name, every trainable
    parameter comes from the file, the other models' keys are ignored, and the model then runs."""
    state = filled(float_checkpoint_layout(TINY_DIMS), seed=7)
    torch.save(state, tmp_path / "float.pth")
    target = FloatMotionModel(TINY, seed=8).eval().load_float_checkpoint(tmp_path / "float.pth")
    params = dict(target.named_parameters())
    taken = {k: k.removeprefix("audio_encoder.") for k in state
             if k.startswith("fmt.") or k.startswith("audio_encoder.audio_projection.")}
    for key, name in taken.items():
        assert torch.equal(params[name], state[key]), key
    assert set(params) == set(taken.values())
    assert torch.isfinite(target(**_fmt_inputs(TINY))).all()

    del state["fmt.blocks.1.mlp.fc2.bias"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"1 missing.*fmt\.blocks\.1\.mlp\.fc2\.bias"):
        FloatMotionModel(TINY).load_float_checkpoint(tmp_path / "broken.pth")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no fmt"):
        FloatMotionModel(TINY).load_float_checkpoint(tmp_path / "other.pth")


def test_float_sized_checkpoint_fits_the_fmt_exactly(tmp_path, float_model_meta):
    """FLOAT's own sizes, names and shapes only (meta tensors), with and without the attention-mask buffer."""
    for buffers in (False, True):
        torch.save(filled(float_checkpoint_layout(FloatDims(), buffers), device="meta"), tmp_path / "float.pth")
        float_model_meta.load_float_checkpoint(tmp_path / "float.pth")
    missing = {k: v for k, v in float_checkpoint_layout(FloatDims()).items() if k != "fmt.decoder.linear.bias"}
    torch.save(filled(missing, device="meta"), tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match=r"1 missing"):
        float_model_meta.load_float_checkpoint(tmp_path / "short.pth")


# ---------------------------------------------------------------------------------------------- autocast / CUDA

def test_encoders_return_float32_under_autocast(tiny_audio):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        motion = MotionEncoder(TINY.motion)(_images(2, TINY.motion.input_size))
        audio = tiny_audio.encode(torch.randn(1, 20 * SAMPLES_PER_FRAME), 20)
    assert all(t.dtype == torch.float32 for t in motion) and audio.dtype == torch.float32


@pytest.mark.gpu
def test_models_on_cuda_under_fp16_autocast():
    device = torch.device("cuda")
    motion, audio = MotionEncoder(TINY.motion).to(device), AudioEncoder(TINY).to(device)
    emotion, model = EmotionEncoder(TINY).to(device), FloatMotionModel(TINY).to(device)
    _randomise(model)
    images, wave = _images(2, TINY.motion.input_size).to(device), torch.randn(1, 50 * SAMPLES_PER_FRAME, device=device)
    inputs = {k: v.to(device) for k, v in _fmt_inputs(TINY).items()}
    with torch.no_grad():
        ref_r, ref_a = motion(images).motion_latents, audio.encode(wave, 50)
    with torch.autocast("cuda", dtype=torch.float16):
        with torch.no_grad():
            r, a = motion(images).motion_latents, audio.encode(wave, 50)
            probs = emotion.predict(wave)
        loss = model(**inputs).float().square().mean()
    loss.backward()
    assert r.dtype == a.dtype == torch.float32 and probs.shape == (7,)
    torch.testing.assert_close(r, ref_r, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(a, ref_a, atol=5e-2, rtol=5e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------- sources

def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return parser.parse_args(argv)


def test_model_sources_from_args(tmp_path):
    (tmp_path / "ser").mkdir()
    assert ModelSources.from_args(_parse([])) == ModelSources()
    sources = ModelSources.from_args(_parse(["--emotion", "filename"]))
    assert sources.emotion == "filename" and sources.emotion_path is None
    assert ModelSources.from_args(_parse(["--emotion_path", str(tmp_path / "ser")])).emotion == "model"
    with pytest.raises(UsageError, match="--emotion_path"):
        ModelSources.from_args(_parse(["--emotion", "none", "--emotion_path", str(tmp_path / "ser")]))
    with pytest.raises(UsageError):
        ModelSources(emotion="happy")


def test_model_identities(tmp_path):
    assert model_identities(TINY, ModelSources()) == {
        "motion": f"random-init:{TINY.init_seed}", "audio": f"random-init:{TINY.init_seed}",
        "emotion": f"random-init:{TINY.init_seed}"}
    assert model_identities(TINY, ModelSources(emotion="none"))["emotion"] == "none"
    assert model_identities(TINY, ModelSources(emotion="filename"))["emotion"] == "filename"

    ckpt = tmp_path / "motion.pt"
    torch.save(MotionEncoder(TINY.motion, seed=0).state_dict(), ckpt)
    folder = tmp_path / "w2v"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    sources = ModelSources(motion_ckpt=ckpt, wav2vec2_path=folder, emotion_path=folder)
    first = model_identities(TINY, sources)
    assert first["motion"].startswith("sha256:") and first["audio"] == first["emotion"]
    assert model_identities(TINY, sources) == first  # stable

    torch.save(MotionEncoder(TINY.motion, seed=1).state_dict(), ckpt)
    (folder / "config.json").write_text('{"hidden_size": 1}')
    second = model_identities(TINY, sources)
    assert second["motion"] != first["motion"] and second["audio"] != first["audio"]


def test_random_models_names_the_encoders_without_weights(tmp_path):
    ckpt, folder = tmp_path / "m.pt", tmp_path / "w"
    assert ModelSources().random_models() == ["motion", "audio", "emotion"]
    assert ModelSources(motion_ckpt=ckpt).random_models() == ["audio", "emotion"]
    assert ModelSources(wav2vec2_path=folder, emotion="filename").random_models() == ["motion"]
    assert ModelSources(motion_ckpt=ckpt, wav2vec2_path=folder, emotion_path=folder).random_models() == []
    assert ModelSources(motion_ckpt=ckpt, wav2vec2_path=folder, emotion="none").random_models() == []


def test_build_encoders_loads_the_given_weights(tmp_path):
    source = MotionEncoder(TINY.motion, seed=42)
    torch.save(source.state_dict(), tmp_path / "motion.pt")
    built = build_encoders(TINY, ModelSources(motion_ckpt=tmp_path / "motion.pt", emotion="none"), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(built.motion.state_dict().values(), source.state_dict().values()))
    assert built.emotion is None


def test_the_random_weights_warning_comes_once_per_process():
    code = ("import logging; logging.basicConfig(format='%(message)s');"
            "from dali_float.config import TINY_PRESET as P; from dali_float.models import ModelSources, build_encoders;"
            "build_encoders(P, ModelSources(emotion='none'), 'cpu'); build_encoders(P, ModelSources(), 'cpu')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("RANDOM WEIGHTS") == 1 and "RANDOM WEIGHTS for the motion, audio encoders" in done.stderr


def test_build_encoders_warns_once_and_emotion_vector(monkeypatch, caplog):
    monkeypatch.setattr(models, "_random_init_warned", False)
    with caplog.at_level(logging.WARNING, logger="dali_float.models"):
        encoders = build_encoders(TINY, ModelSources(), "cpu")
        build_encoders(TINY, ModelSources(emotion="none"), "cpu")
    warnings = [r for r in caplog.records if "RANDOM WEIGHTS" in r.getMessage()]
    assert len(warnings) == 1 and "motion, audio, emotion" in warnings[0].getMessage()
    for module in (encoders.motion, encoders.audio, encoders.emotion):
        assert not module.training and not any(p.requires_grad for p in module.parameters())

    wave = np.random.default_rng(0).standard_normal((1, 16_000)).astype(np.float32)
    probs = emotion_vector(encoders, wave, "clip.mp4")
    assert probs.shape == (7,) and probs.dtype == np.float32 and abs(probs.sum() - 1) < 1e-5
    by_name = dataclasses.replace(encoders, sources=ModelSources(emotion="filename"))
    assert emotion_vector(by_name, wave, "01-01-05-01-01-01-01.mp4")[EMOTION_CLASSES.index("angry")] == 1
    uniform = dataclasses.replace(encoders, sources=ModelSources(emotion="none"))
    np.testing.assert_allclose(emotion_vector(uniform, wave, "x.mp4"), 1 / 7)
