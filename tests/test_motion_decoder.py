"""FLOAT's motion decoder: float.pth's key names and shapes, strict loading and clear refusals, the
batched modulated convolution against StyleGAN2's per-frame weights, FLOAT's warp grid, batched output
equal to frame-by-frame output, and the encoder's skip features.

The expected keys are written from FLOAT's public code (`models/float/styledecoder.py`: Synthesis,
StyledConv, ModulatedConv2d, ToRGB, ToFlow; the LIA channel table) in tests/float_layout.py, not read from
the module.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dali_float import models
from dali_float.config import FLOAT_PRESET, TINY_PRESET
from dali_float.errors import CheckpointError
from dali_float.models import MotionDecoder, MotionEncoder, build_decoder, load_decoder_checkpoint
from dali_float.models.motion_decoder import FLOAT_DECODER_PREFIX, ModulatedConv2d, ToFlow, Upsample, decoder_keys
from float_layout import TINY_DIMS, FloatDims, motion_decoder_layout

TINY = TINY_PRESET.motion
BLUR = torch.tensor([1.0, 3.0, 3.0, 1.0])
BLUR_2D = torch.outer(BLUR, BLUR) / 64  # FLOAT's make_kernel([1, 3, 3, 1])


def floats_decoder_keys(d: FloatDims) -> dict[str, tuple]:
    """`motion_autoencoder.dec.*` of FLOAT's Synthesis at `d`'s sizes (tests/float_layout.py), buffers
    included, without the prefix: as the decoder's keys read."""
    return {k.removeprefix(FLOAT_DECODER_PREFIX): v for k, v in motion_decoder_layout(d, buffers=True).items()}


def float_layout(decoder: MotionDecoder, with_buffers: bool = True) -> dict[str, torch.Tensor]:
    """The decoder's weights as float.pth holds them: prefixed, with the dictionary and other models' keys."""
    state = {FLOAT_DECODER_PREFIX + k: v.clone() for k, v in decoder.state_dict().items()
             if with_buffers or not k.endswith(".kernel")}
    state[FLOAT_DECODER_PREFIX + "direction.weight"] = torch.randn(decoder.cfg.latent_dim, decoder.cfg.num_coefficients)
    state["motion_autoencoder.enc.fc.0.weight"] = torch.zeros(2, 2)  # another model's key: ignored
    state["fmt.x_embedder.proj.weight"] = torch.zeros(2, 2)
    return state


def awake(decoder: MotionDecoder, seed: int = 0) -> MotionDecoder:
    """Random biases, noise strengths and smaller modulation weights: every term of the forward matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if name.endswith("bias") or name.endswith("noise.weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return decoder


@pytest.fixture(scope="module")
def tiny_pair():
    enc = MotionEncoder(TINY, seed=1).eval()
    dec = awake(MotionDecoder(TINY, seed=2)).eval()
    images = torch.rand(1, 3, TINY.input_size, TINY.input_size, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ref = enc.encode_reference(images)
    return enc, dec, ref, images


# ---------------------------------------------------------------------------------------------- keys and loading

def test_decoder_has_floats_keys_and_shapes():
    dec = MotionDecoder(FLOAT_PRESET.motion)
    found = {k: tuple(v) for k, v in decoder_keys(dec).items()}
    assert found == floats_decoder_keys(FloatDims())
    assert len(found) == 150  # input, direction, conv1 (5), to_rgb1 (3), and 7 levels of 6 + 5 + 4 + 5
    # The blur kernels are buffers in FLOAT (register_buffer); every other key is a parameter.
    assert {n for n, _ in dec.named_buffers()} == {k for k in found if k.endswith(".kernel")}
    tiny = {k: tuple(v) for k, v in decoder_keys(MotionDecoder(TINY)).items()}
    assert tiny == floats_decoder_keys(TINY_DIMS)


def test_float_layout_checkpoint_loads_strictly(tmp_path, tiny_pair):
    _, source, ref, _ = tiny_pair
    latents = ref.identity + 0.3 * torch.randn(3, TINY.latent_dim, generator=torch.Generator().manual_seed(4))
    for wrap, with_buffers in ((None, True), ("state_dict", False)):
        state = float_layout(source, with_buffers)
        path = tmp_path / f"float_{wrap}.pth"
        torch.save({wrap: state} if wrap else state, path)
        target = load_decoder_checkpoint(MotionDecoder(TINY, seed=9), path).eval()
        with torch.no_grad():
            torch.testing.assert_close(target(latents, ref.features), source(latents, ref.features), rtol=0, atol=0)
    own = tmp_path / "own.pt"  # the decoder's own state dict (no dictionary in it) loads too
    torch.save(source.state_dict(), own)
    assert torch.equal(load_decoder_checkpoint(MotionDecoder(TINY, seed=9), own).input.input, source.input.input)


def test_wrong_checkpoints_are_refused_naming_the_keys(tmp_path):
    dec = MotionDecoder(TINY)
    state = float_layout(dec)

    def refused(name: str, changed: dict) -> str:
        torch.save(changed, tmp_path / name)
        with pytest.raises(CheckpointError) as err:
            load_decoder_checkpoint(MotionDecoder(TINY), tmp_path / name)
        message = str(err.value)
        assert name in message and "\n" not in message
        return message

    renamed = dict(state)
    renamed[FLOAT_DECODER_PREFIX + "to_flows.9.bias"] = renamed.pop(FLOAT_DECODER_PREFIX + "to_flows.3.bias")
    message = refused("renamed.pth", renamed)
    assert "1 missing, 1 unexpected" in message and "to_flows.3.bias" in message and "to_flows.9.bias" in message

    no_dictionary = {k: v for k, v in state.items() if not k.endswith("direction.weight")}
    assert "missing: direction.weight" in refused("no_direction.pth", no_dictionary)

    reshaped = dict(state)
    reshaped[FLOAT_DECODER_PREFIX + "convs.0.conv.weight"] = torch.zeros(1, 64, 32, 3, 3)
    assert "convs.0.conv.weight expected (1, 64, 64, 3, 3) found (1, 64, 32, 3, 3)" in refused("shape.pth", reshaped)

    float_sized = {FLOAT_DECODER_PREFIX + k: v for k, v in MotionDecoder(FLOAT_PRESET.motion).state_dict().items()}
    assert "--preset float" in refused("float_sized.pth", float_sized)
    assert "does not exist" in str(pytest.raises(CheckpointError, load_decoder_checkpoint, dec, tmp_path / "nope.pth"
                                                 ).value)


def test_random_init_is_seeded_and_said_loudly(monkeypatch, caplog):
    monkeypatch.setattr(models, "_random_decoder_warned", False)
    state = torch.get_rng_state()
    with caplog.at_level(logging.WARNING):
        a, b = build_decoder(TINY_PRESET, None, "cpu"), build_decoder(TINY_PRESET, None, "cpu")
    assert torch.equal(torch.get_rng_state(), state)  # a private generator
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    warnings = [r for r in caplog.records if "RANDOM WEIGHTS for the motion decoder" in r.getMessage()]
    assert len(warnings) == 1 and "not a face" in warnings[0].getMessage()
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


# ---------------------------------------------------------------------------------------------- the layers

def per_frame_modulated_conv(conv: ModulatedConv2d, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """StyleGAN2's definition, one frame at a time: w_b = weight * s_b / sqrt(fan_in), each output
    channel divided by its norm, then the convolution (a stride-2 transposed one followed by FLOAT's
    blur, gain 4, padding (1, 1), when upsampling)."""
    outs = []
    k = conv.weight.shape[-1]
    for b in range(x.shape[0]):
        s = style[b] @ (conv.modulation.weight.T / math.sqrt(style.shape[1])) + conv.modulation.bias
        w = conv.weight[0] / math.sqrt(conv.weight.shape[2] * k * k) * s[None, :, None, None]
        if conv.demodulate:
            w = w / torch.sqrt(w.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        if conv.upsample:
            y = F.conv_transpose2d(x[b:b + 1], w.transpose(0, 1), stride=2)
            y = F.pad(y, (1, 1, 1, 1))
            kernel = (BLUR_2D * 4).expand(y.shape[1], 1, 4, 4)
            y = F.conv2d(y, kernel, groups=y.shape[1])
        else:
            y = F.conv2d(x[b:b + 1], w, padding=k // 2)
        outs.append(y)
    return torch.cat(outs)


@pytest.mark.parametrize("upsample,demodulate,k", [(False, True, 3), (True, True, 3), (False, False, 1)])
def test_batched_modulated_conv_is_stylegan2s_per_frame_weights(upsample, demodulate, k):
    g = torch.Generator().manual_seed(0)
    conv = ModulatedConv2d(6, 5, k, style_dim=7, demodulate=demodulate, upsample=upsample)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.modulation.weight.copy_(torch.randn(conv.modulation.weight.shape, generator=g))
        conv.modulation.bias.copy_(1 + 0.5 * torch.randn(6, generator=g))
        x, style = torch.randn(4, 6, 8, 8, generator=g), torch.randn(4, 7, generator=g)
        ours = conv(x, style)
    assert ours.shape == (4, 5, 16, 16) if upsample else (4, 5, 8, 8)
    torch.testing.assert_close(ours, per_frame_modulated_conv(conv, x, style), rtol=1e-5, atol=1e-5)


def test_upsample_keeps_the_mean_and_floats_kernel():
    up = Upsample()
    torch.testing.assert_close(up.kernel, BLUR_2D * 4)  # FLOAT's upsample.kernel: make_kernel * factor^2
    flat = up(torch.full((1, 2, 6, 6), 3.0))
    assert flat.shape == (1, 2, 12, 12)
    torch.testing.assert_close(flat[..., 2:-2, 2:-2], torch.full((1, 2, 8, 8), 3.0))


def test_a_zero_flow_reads_the_reference_on_floats_grid():
    """With a zero flow and a mask of sigmoid(0) = 1/2, the warped features are half the reference read
    at FLOAT's grid x_j = linspace(-1, 1, w)[j], which grid_sample (align_corners=False) maps to the
    pixel coordinate (x_j + 1) w / 2 - 1/2: computed here by hand, bilinear, zeros outside."""
    flow = ToFlow(4, style_dim=3)
    with torch.no_grad():
        flow.conv.weight.zero_()
    h = w = 8
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(1, 4, h, w, generator=g)
    x = torch.randn(2, 4, h, w, generator=g)
    warped, blended, raw = flow(x, torch.randn(2, 3, generator=g), feature)
    f = np.pad(feature[0].numpy(), ((0, 0), (1, 1), (1, 1)))  # zeros outside, index shifted by one
    expected = np.zeros((4, h, w))
    for i in range(h):
        for j in range(w):
            px = (2 * j / (w - 1)) * w / 2 - 0.5 + 1  # (x_j + 1) w / 2 - 1/2, +1 for the zero border
            py = (2 * i / (h - 1)) * h / 2 - 0.5 + 1
            x0, y0 = int(np.floor(px)), int(np.floor(py))
            ax, ay = px - x0, py - y0
            expected[:, i, j] = ((1 - ax) * (1 - ay) * f[:, y0, x0] + ax * (1 - ay) * f[:, y0, x0 + 1]
                                 + (1 - ax) * ay * f[:, y0 + 1, x0] + ax * ay * f[:, y0 + 1, x0 + 1])
    torch.testing.assert_close(warped, 0.5 * torch.from_numpy(expected).float()[None].expand(2, -1, -1, -1),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blended, warped + 0.5 * x)
    assert torch.equal(raw, torch.zeros(2, 3, h, w))


@pytest.mark.parametrize("n", [8, 16, 32, 64, 128, 256, 512])
def test_the_warp_grid_is_floats_float64_linspace_rounded_to_float32(n, monkeypatch):
    """FLOAT's ToFlow.forward (models/float/styledecoder.py) builds its grid per call from numpy's float64
    `np.linspace(-1, 1, n)`, meshgrid'ed (x along the width, y along the height) and rounded once to
    float32 (`torch.tensor(xs).float()`); a float64 run adds that float32 grid to a float64 flow. With a
    zero flow (tanh(0) = 0), what ToFlow hands grid_sample is that grid, bit for bit. A float32
    `torch.linspace` is one ulp off in places (128 of 512 values at n = 512): the test tells them apart."""
    axis = np.linspace(-1, 1, n).astype(np.float32)  # IEEE round to nearest, as torch.tensor(xs).float()
    xs, ys = np.meshgrid(axis, axis)
    expected = np.stack([xs, ys], axis=-1)[None]
    seen: list[torch.Tensor] = []
    grid_sample = F.grid_sample

    def spy(feature: torch.Tensor, grid: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        seen.append(grid)
        return grid_sample(feature, grid, *args, **kwargs)

    monkeypatch.setattr(F, "grid_sample", spy)
    for dtype in (torch.float32, torch.float64):
        flow = ToFlow(4, style_dim=3).to(dtype)
        zeros = torch.zeros(1, 4, n, n, dtype=dtype)
        with torch.no_grad():
            for parameter in flow.parameters():  # every weight, its modulation's too (left uninitialised)
                parameter.zero_()
            flow(zeros, torch.zeros(1, 3, dtype=dtype), zeros)
        grid = seen.pop()
        assert grid.dtype == dtype and np.array_equal(grid.numpy(), expected.astype(grid.numpy().dtype))
    if n == 512:
        assert (grid[0, 0, :, 0].float() != torch.linspace(-1, 1, n)).any()  # 128 values with torch 2.x on CPU


# ---------------------------------------------------------------------------------------------- the decoder

def test_encoder_gives_the_features_the_decoder_warps(tiny_pair):
    enc, dec, ref, images = tiny_pair
    assert [tuple(f.shape) for f in ref.features] == [(1, *s) for s in dec.feature_shapes()]
    assert dec.feature_shapes() == [(64, 8, 8), (64, 16, 16), (64, 32, 32), (32, 64, 64)]
    with torch.no_grad():
        plain = enc(images)
    assert torch.equal(ref.identity, plain.identity) and torch.equal(ref.motion_latents, plain.motion_latents)


@pytest.mark.slow
def test_float_encoder_features_are_floats_seven_maps():
    enc = MotionEncoder(FLOAT_PRESET.motion).eval()
    with torch.no_grad():
        ref = enc.encode_reference(torch.zeros(1, 3, 512, 512))
    assert [tuple(f.shape[1:]) for f in ref.features] == [
        (512, 8, 8), (512, 16, 16), (512, 32, 32), (256, 64, 64), (128, 128, 128), (64, 256, 256), (32, 512, 512)]
    assert MotionDecoder(FLOAT_PRESET.motion).feature_shapes() == [tuple(f.shape[1:]) for f in ref.features]


def test_batched_decoding_equals_frame_by_frame(tiny_pair):
    _, dec, ref, _ = tiny_pair
    g = torch.Generator().manual_seed(5)
    latents = ref.identity + 0.5 * torch.randn(7, TINY.latent_dim, generator=g)
    with torch.no_grad():
        batched = dec(latents, ref.features)
        one_by_one = torch.cat([dec(latents[i:i + 1], ref.features) for i in range(7)])
    assert batched.shape == (7, 3, 64, 64) and torch.isfinite(batched).all()
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-4 * float(one_by_one.abs().max()))
    # The frames differ from each other (each its own style): a decoder that reused one frame's style fails above.
    assert float((batched[1:] - batched[:1]).abs().mean()) > 1e-2


def test_decoder_refuses_wrong_inputs_in_one_line(tiny_pair):
    _, dec, ref, _ = tiny_pair
    with pytest.raises(ValueError, match=r"latents \(N, 64\) and features"):
        dec(torch.zeros(2, 63), ref.features)
    with pytest.raises(ValueError, match="features"):
        dec(torch.zeros(2, 64), ref.features[:-1])


@pytest.mark.gpu
def test_float16_decoding_on_cuda_follows_float32():
    """build_decoder on a GPU is float16 (a chunk per call); its frames stay close to the float32 ones."""
    enc = MotionEncoder(TINY, seed=1).eval()
    with torch.no_grad():
        ref = enc.encode_reference(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    latents = ref.identity + 0.3 * torch.randn(50, TINY.latent_dim, generator=torch.Generator().manual_seed(1))
    cpu, gpu = build_decoder(TINY_PRESET, None, "cpu"), build_decoder(TINY_PRESET, None, "cuda")
    assert next(gpu.parameters()).dtype == torch.float16
    with torch.no_grad():
        want = cpu(latents, ref.features)
        got = gpu(latents.cuda(), [f.cuda() for f in ref.features])
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert float((got.float().cpu() - want).abs().mean()) < 0.02 * float(want.abs().mean())
