"""A second, plain-functional implementation of FLOAT's motion encoder and flow-matching transformer forward
passes, written from FLOAT's published architecture (FLOAT.md; the official models/float/{encoder,FMT}.py
read for the conventions, not copied), for the tests to hold the project's nn.Modules against.

It reads a state dict by name (the project's, whose names tests/float_layout.py checks against FLOAT's)
and computes with nothing but torch.nn.functional: StyleGAN2's equalised learning rate (weights scaled by
1/sqrt(fan in) when used), upfirdn2d's zero-pad-then-correlate blur with the normalised [1, 3, 3, 1]
kernel, fused leaky ReLU (slope 0.2, gain sqrt 2), the direction dictionary applied as FLOAT writes it
(sum over diag(lambda) Q^T), DiT blocks with framewise adaLN written out, attention as an explicit
softmax over a +-2 frame band.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PERIOD = 10_000  # of both sinusoidal embeddings (FLOAT: get_sinusoid_encoding_table, timestep_embedding)
LN_EPS = 1e-6  # FLOAT's LayerNorms in the FMT
BAND = 2  # --attention_window


# --------------------------------------------------------------------------------------------- LIA encoder

def _equal_conv(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    fan_in = w.shape[1] * w.shape[2] * w.shape[3]
    return F.conv2d(x, w * fan_in ** -0.5, None, stride, padding)


def _blur(x: torch.Tensor, pad0: int, pad1: int) -> torch.Tensor:
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = torch.outer(taps, taps) / 64.0
    x = F.pad(x, (pad0, pad1, pad0, pad1))
    channels = x.shape[1]
    return F.conv2d(x, kernel.flip(0, 1).repeat(channels, 1, 1, 1), groups=channels)


def _conv_layer(x, sd, prefix: str, k: int, downsample: bool, activate: bool = True) -> torch.Tensor:
    if downsample:  # blur (index 0), stride-2 conv without padding (1), activation (2)
        p = 2 + (k - 1)
        x = _equal_conv(_blur(x, (p + 1) // 2, p // 2), sd[f"{prefix}.1.weight"], 2, 0)
        index = 2
    else:
        x = _equal_conv(x, sd[f"{prefix}.0.weight"], 1, k // 2)
        index = 1
    if activate:
        x = F.leaky_relu(x + sd[f"{prefix}.{index}.bias"], 0.2) * math.sqrt(2)
    return x


def lia_encode(sd: dict[str, torch.Tensor], images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """images (N, 3, S, S) -> (identity s, coefficients lambda, motion latent r), from a MotionEncoder state dict."""
    x = _conv_layer(images, sd, "net_app.convs.0", 1, downsample=False)
    index, size = 1, images.shape[-1]
    while size > 4:
        p = f"net_app.convs.{index}"
        main = _conv_layer(_conv_layer(x, sd, f"{p}.conv1", 3, False), sd, f"{p}.conv2", 3, True)
        skip = _conv_layer(x, sd, f"{p}.skip", 1, True, activate=False)
        x = (main + skip) / math.sqrt(2)
        index, size = index + 1, size // 2
    s = _equal_conv(x, sd[f"net_app.convs.{index}.weight"], 1, 0).reshape(x.shape[0], -1)
    h = s
    for i in range(5):
        w = sd[f"fc.{i}.weight"]
        h = h @ (w * w.shape[1] ** -0.5).T + sd[f"fc.{i}.bias"]
    q, _ = torch.linalg.qr(sd["direction.weight"] + 1e-8)
    r = (torch.diag_embed(h) @ q.T).sum(dim=1)
    return s, h, r


# --------------------------------------------------------------------------------------------- FMT

def sinusoid_table(positions: int, dim: int) -> torch.Tensor:
    """Entry (p, i): p / PERIOD^(2 floor(i / 2) / dim), sine in even columns, cosine in odd ones."""
    table = torch.tensor([[p / PERIOD ** (2 * (i // 2) / dim) for i in range(dim)] for p in range(positions)],
                         dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = table[:, 0::2].sin(), table[:, 1::2].cos()
    return table.float()


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t w_k) | sin(t w_k)], w_k = PERIOD^(-k / half), k < half = dim // 2; a zero column for an odd dim."""
    half = dim // 2
    w = torch.tensor([PERIOD ** (-k / half) for k in range(half)], dtype=torch.float32)
    args = t.float()[:, None] * w[None]
    out = torch.cat([args.cos(), args.sin()], dim=1)
    return torch.cat([out, torch.zeros(len(t), 1)], dim=1) if dim % 2 else out


def _linear(sd, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _framewise(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS) * (1 + scale) + shift


def _attention(sd, name: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, h = x.shape
    q, k, v = _linear(sd, f"{name}.qkv", x).reshape(b, t, 3, heads, h // heads).unbind(2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(h // heads)
    i = torch.arange(t)
    scores = scores.masked_fill((i[:, None] - i[None, :]).abs() > BAND, float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), v).reshape(b, t, h)
    return _linear(sd, f"{name}.proj", out)


def fmt_velocity(sd: dict[str, torch.Tensor], heads: int, t, x, prev_x, wa, prev_wa, wr, we) -> torch.Tensor:
    """FLOAT's FMT forward from an `fmt.*` state dict (without the prefix): velocity (B, 10 + 50, F)."""
    seq, audio = torch.cat([prev_x, x], dim=1), torch.cat([prev_wa, wa], dim=1)
    frames = seq.shape[1]
    hidden = _linear(sd, "x_embedder.proj", seq) + sd["pos_embed"][:, :frames]
    temb = _linear(sd, "t_embedder.mlp.0", timestep_embedding(t, sd["t_embedder.mlp.0.weight"].shape[1]))
    temb = _linear(sd, "t_embedder.mlp.2", F.silu(temb))
    cond = torch.cat([wr[:, None].expand(-1, frames, -1), audio, we[:, None].expand(-1, frames, -1)], dim=-1)
    c = _linear(sd, "c_embedder", cond) + temb[:, None]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}"
        mods = _linear(sd, f"{b}.adaLN_modulation.1", F.silu(c)).chunk(6, dim=-1)
        hidden = hidden + mods[2] * _attention(sd, f"{b}.attn", _framewise(hidden, mods[0], mods[1]), heads)
        y = _framewise(hidden, mods[3], mods[4])
        mlp = _linear(sd, f"{b}.mlp.fc2", F.gelu(_linear(sd, f"{b}.mlp.fc1", y), approximate="tanh"))
        hidden = hidden + mods[5] * mlp
    shift, scale = _linear(sd, "decoder.adaLN_modulation.1", F.silu(c)).chunk(2, dim=-1)
    return _linear(sd, "decoder.linear", _framewise(hidden, shift, scale))


def audio_projection(sd: dict[str, torch.Tensor], audio: torch.Tensor) -> torch.Tensor:
    """Linear -> LayerNorm (affine, torch's default eps) -> SiLU, from `audio_projection.*` (without the prefix)."""
    x = _linear(sd, "0", audio)
    return F.silu(F.layer_norm(x, x.shape[-1:], sd["1.weight"], sd["1.bias"]))
