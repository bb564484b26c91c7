"""FLOAT's motion decoder: (identity s + motion latent r, the reference's skip features) -> image.

The synthesis half of FLOAT's motion auto-encoder (`motion_autoencoder.dec` in float.pth), a
StyleGAN2-style generator that warps the reference image's encoder features instead of drawing from
noise. Written here from FLOAT's public description and the StyleGAN2 / LIA papers; the state dict has
float.pth's names and shapes so that `motion_autoencoder.dec.*` loads strictly:

    input.input                     (1, ch[4], 4, 4)        learned constant
    conv1                           StyledConv ch[4] -> ch[4] at 4x4
    to_rgb1                         ToRGB (in float.pth, unused by FLOAT's forward: kept for the keys)
    for each resolution r = 8, 16, ..., S (index k = 0, 1, ...):
      convs.{2k}                    StyledConv ch[r/2] -> ch[r], 2x upsampling (transposed conv + blur)
      convs.{2k+1}                  StyledConv ch[r] -> ch[r]
      to_flows.{k}                  modulated 1x1 conv -> 3 channels: a flow (tanh, 2) and a mask (sigmoid,
                                    1); the reference's feature map of resolution r is warped by the flow,
                                    blended in by the mask; the 3 channels add up over resolutions
      to_rgbs.{k}                   1x1 conv of the warped features -> RGB, added to the upsampled
                                    RGB of the coarser resolutions
    direction.weight                (F, M) the motion dictionary (loaded by the encoder; checked here)

Every layer takes the same style, the latent s + r of the frame. The image is the last RGB sum,
(N, 3, S, S), roughly in [-1, 1] (FLOAT clamps it when writing the video).

Batched: a modulated convolution scales the input channels by the frame's style, convolves with the
shared weight, and scales the output channels by the frame's demodulation factor. This is the
modulated convolution of StyleGAN2 (weight * style, normalised per output channel) rearranged so that
one ordinary convolution serves all N frames (FLOAT's own code forms one weight per frame and runs a
grouped convolution, one frame at a time). `tests/test_motion_decoder.py` checks it against the
per-frame weight form and checks batched against frame-by-frame output.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dali_float.config import MotionEncoderConfig
from dali_float.models.motion_encoder import (FLOAT_DIRECTION_KEY, Blur, ConvLayer, EqualLinear, FusedLeakyReLU,
                                              check_state_dict, read_state_dict)

log = logging.getLogger(__name__)

FLOAT_DECODER_PREFIX = "motion_autoencoder.dec."
DIRECTION_KEY = FLOAT_DIRECTION_KEY[len(FLOAT_DECODER_PREFIX):]  # "direction.weight": the encoder uses it
_DEMOD_EPS = 1e-8  # StyleGAN2's: inside the reciprocal square root of the squared weight sum
_UPSAMPLE = 2
_BLUR_SIZE = 4  # taps of the [1, 3, 3, 1] blur


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------

class Upsample(Blur):
    """2x upsampling of an image-like tensor: zeros between the samples, then the [1, 3, 3, 1] blur with
    gain 4 and padding 2 before, 1 after: (N, C, H, W) -> (N, C, 2H, 2W). Its kernel is `upsample.kernel`."""

    def __init__(self) -> None:
        super().__init__(pad=(2, 1), gain=_UPSAMPLE**2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        spread = x.new_zeros(n, c, _UPSAMPLE * h, _UPSAMPLE * w)
        spread[:, :, ::_UPSAMPLE, ::_UPSAMPLE] = x
        return super().forward(spread)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution for N frames at once, each with its own style.

    weight (1, out, in, k, k) as float.pth stores it; modulation: EqualLinear(style_dim -> in), bias 1 at
    init. For frame b: w_b = weight * style_b[in] / sqrt(in k k); with `demodulate`, each output channel
    of w_b is divided by its L2 norm (+ eps). upsample: a stride-2 transposed convolution followed by
    the blur (gain 4), doubling the resolution; otherwise a same-size convolution (padding k // 2).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, out_channels, in_channels, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channels)
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.demodulate = demodulate
        self.upsample = upsample
        self.padding = kernel_size // 2
        if upsample:
            # After the transposed conv (2H + k - 2 samples), pad so that the 4-tap blur gives 2H again.
            pad = _BLUR_SIZE - _UPSAMPLE - (kernel_size - 1)
            self.blur = Blur(pad=((pad + 1) // 2 + _UPSAMPLE - 1, pad // 2 + 1), gain=_UPSAMPLE**2)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """x (N, in, H, W), style (N, style_dim) -> (N, out, H', W'), H' = 2H with upsample, else H."""
        s = self.modulation(style)  # (N, in)
        weight = self.weight[0] * self.scale  # (out, in, k, k), shared by the frames
        x = x * s[:, :, None, None]
        if self.upsample:
            out = F.conv_transpose2d(x, weight.transpose(0, 1), stride=_UPSAMPLE)
        else:
            out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            # |w_b[o]|^2 = sum_i s_b[i]^2 sum_kk weight[o, i]^2, in float32 at least (float16 overflows).
            acc = torch.promote_types(s.dtype, torch.float32)
            energy = s.to(acc).square() @ weight.to(acc).square().sum(dim=(2, 3)).T  # (N, out)
            out = out * torch.rsqrt(energy + _DEMOD_EPS).to(out.dtype)[:, :, None, None]
        if self.upsample:
            out = self.blur(out)  # per channel and linear: commutes with the demodulation above
        return out


class NoiseInjection(nn.Module):
    """StyleGAN2's per-layer noise strength; FLOAT decodes without noise, so this is the identity
    (the weight is kept: float.pth has it)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class StyledConv(nn.Module):
    """ModulatedConv2d (3x3) -> no noise -> bias + leaky ReLU (x sqrt 2)."""

    def __init__(self, in_channels: int, out_channels: int, style_dim: int, upsample: bool = False) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style)))


class ToRGB(nn.Module):
    """1x1 ConvLayer (with its leaky ReLU) -> 3 channels, + bias, + the 2x upsampled RGB of the coarser level."""

    def __init__(self, in_channels: int, upsample: bool = True) -> None:
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ConvLayer(in_channels, 3, 1)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x) + self.bias
        return out if skip is None else out + self.upsample(skip)


class ToFlow(nn.Module):
    """Modulated 1x1 conv -> (flow dx, dy; mask) + bias + the upsampled ones of the coarser level.

    The flow, tanh'd and added to the identity grid, samples the reference's feature map (bilinear,
    zeros outside); the mask (sigmoid) blends the warped features over the decoder's own.
    """

    def __init__(self, in_channels: int, style_dim: int) -> None:
        super().__init__()
        self.upsample = Upsample()
        self.conv = ModulatedConv2d(in_channels, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, feature: torch.Tensor, skip: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C, r, r) decoder activations; feature (N or 1, C, r, r) of the reference; skip (N, 3, r/2, r/2).

        Returns (warped features * mask, their blend with x, the 3 raw channels for the next level).
        """
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        n, _, h, w = x.shape
        flow = torch.tanh(out[:, :2]).permute(0, 2, 3, 1) + _identity_grid(h, w, out)
        mask = torch.sigmoid(out[:, 2:3])
        if feature.shape[0] != n:
            feature = feature.expand(n, -1, -1, -1)  # one reference for every frame
        warped = F.grid_sample(feature, flow, mode="bilinear", padding_mode="zeros",
                               align_corners=False) * mask
        return warped, warped + x * (1.0 - mask), out


def _identity_grid(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(1, h, w, 2) sampling grid (x, y) = linspace(-1, 1) along the width and the height.

    The end points are the edge pixels' centres while grid_sample reads with align_corners=False: FLOAT
    trained with this grid, so it is kept (a zero flow is a slight zoom-in, not the identity).
    """
    xs = _grid_axis(w).to(device=like.device, dtype=like.dtype)
    ys = _grid_axis(h).to(device=like.device, dtype=like.dtype)
    return torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)[None]


def _grid_axis(n: int) -> torch.Tensor:
    """The n grid coordinates in [-1, 1], float32 on the CPU, rounded as FLOAT rounds them.

    FLOAT's ToFlow.forward builds its grid per call as numpy's float64 `np.linspace(-1, 1, n)` and rounds
    it once to float32 (`torch.tensor(xs).float()`). A float32 `torch.linspace` is one ulp off in places
    (128 of the 512 values at n = 512), which the decoder amplifies to visible differences.
    """
    return torch.from_numpy(np.linspace(-1.0, 1.0, n)).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------

class ConstantInput(nn.Module):
    """The learned 4x4 start of the synthesis, `input.input` (1, ch[4], 4, 4)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.empty(1, channels, 4, 4))

    def forward(self, n: int) -> torch.Tensor:
        return self.input.expand(n, -1, -1, -1)


class MotionDecoder(nn.Module):
    """FLOAT's `motion_autoencoder.dec` (see the module docstring), for a MotionEncoderConfig.

    Without a checkpoint the weights are a seeded random init (`seed`; a private generator leaves the
    caller's RNG alone): the frames it draws are not a face.
    """

    def __init__(self, cfg: MotionEncoderConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        style = cfg.latent_dim
        self.resolutions = [2**i for i in range(3, int(math.log2(cfg.input_size)) + 1)]  # 8, 16, ..., S
        c4 = cfg.channels_at(4)
        self.input = ConstantInput(c4)
        self.conv1 = StyledConv(c4, c4, style)
        self.to_rgb1 = ToRGB(c4, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.to_flows = nn.ModuleList()
        in_channels = c4
        for r in self.resolutions:
            out_channels = cfg.channels_at(r)
            self.convs.append(StyledConv(in_channels, out_channels, style, upsample=True))
            self.convs.append(StyledConv(out_channels, out_channels, style))
            self.to_rgbs.append(ToRGB(out_channels))
            self.to_flows.append(ToFlow(out_channels, style))
            in_channels = out_channels
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Weights and the constant input N(0, 1); biases 0 except the modulations' (1: styles start at
        one); noise strengths 0. Deterministic in `seed`."""
        generator = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("modulation.bias"):
                param.fill_(1.0)
            elif name == "input.input" or (name.endswith("weight") and not name.endswith("noise.weight")):
                param.copy_(torch.randn(param.shape, generator=generator))
            else:
                param.zero_()

    def feature_shapes(self) -> list[tuple[int, int, int]]:
        """(channels, r, r) of the reference feature each level warps, coarsest first."""
        return [(self.cfg.channels_at(r), r, r) for r in self.resolutions]

    def forward(self, latents: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """latents (N, F): s + r per frame; features: the reference's skip features (1 or N, ch[r], r, r),
        r = 8 ... S (MotionEncoder.encode_reference). Returns (N, 3, S, S), unclamped, in the decoder's
        dtype (float32; float16 after .half(), as on a GPU). All N frames in one batch."""
        expected = self.feature_shapes()
        found = [tuple(f.shape[1:]) for f in features]
        if latents.ndim != 2 or latents.shape[1] != self.cfg.latent_dim or found != expected:
            raise ValueError(f"MotionDecoder expects latents (N, {self.cfg.latent_dim}) and features {expected}, "
                             f"got {tuple(latents.shape)} and {found}")
        dtype = self.input.input.dtype
        style = latents.to(dtype)  # every layer takes the same style: FLOAT mixes none
        x = self.conv1(self.input(latents.shape[0]), style)
        rgb = flow = None
        for k, feature in enumerate(f.to(dtype) for f in features):
            x = self.convs[2 * k](x, style)
            x = self.convs[2 * k + 1](x, style)
            warped, x, flow = self.to_flows[k](x, style, feature, flow)
            rgb = self.to_rgbs[k](warped, rgb)
        return rgb


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def decoder_keys(decoder: MotionDecoder) -> dict[str, torch.Size]:
    """Every key of `motion_autoencoder.dec.*` (without the prefix) with its shape: the decoder's own,
    plus the motion dictionary `direction.weight` (F, M), which float.pth keeps in the decoder."""
    keys = {k: v.shape for k, v in decoder.state_dict().items()}
    keys[DIRECTION_KEY] = torch.Size((decoder.cfg.latent_dim, decoder.cfg.num_coefficients))
    return keys


def _to_decoder_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FLOAT's flat keys -> decoder keys (`motion_autoencoder.dec.` dropped; other models' keys ignored);
    a state dict without that prefix is taken as the decoder's own."""
    if not any(k.startswith(FLOAT_DECODER_PREFIX) for k in state):
        return dict(state)
    return {k[len(FLOAT_DECODER_PREFIX):]: v for k, v in state.items() if k.startswith(FLOAT_DECODER_PREFIX)}


def load_decoder_checkpoint(decoder: MotionDecoder, path: Path) -> MotionDecoder:
    """Load `motion_autoencoder.dec.*` of FLOAT's float.pth (or a decoder state dict) strictly; returns it.

    Every parameter (and in float.pth the motion dictionary) must be there with its shape; the blur
    kernels (constant buffers) may be absent. CheckpointError (one line: file, counts, the first offending keys,
    what to pass) otherwise.
    """
    path = Path(path)
    raw = read_state_dict(path, "motion-decoder")
    state = _to_decoder_keys(raw)
    optional = frozenset(name for name, _ in decoder.named_buffers())
    if not any(k.startswith(FLOAT_DECODER_PREFIX) for k in raw):
        optional |= {DIRECTION_KEY}  # a decoder's own state dict has no dictionary; float.pth must
    check_state_dict(
        path, "motion-decoder", decoder_keys(decoder), state, optional=optional,
        hint=(f"expected FLOAT's float.pth ({FLOAT_DECODER_PREFIX}*) or a MotionDecoder state dict for "
              f"input_size {decoder.cfg.input_size} and latent_dim {decoder.cfg.latent_dim} "
              f"(float.pth needs --preset float)"))
    state.pop(DIRECTION_KEY, None)  # the encoder's (MotionEncoder.direction), not used to draw
    decoder.load_state_dict(state, strict=False)  # strictness checked above, buffers may be absent
    log.info("loaded motion decoder weights from %s (%d tensors)", path, len(state))
    return decoder
