"""The trained model: FLOAT's flow-matching transformer (FMT) and the trainable audio projection.

Parameter names follow FLOAT's `fmt.*` and `audio_encoder.audio_projection.*` so the released
float.pth can be loaded for fine-tuning (`FloatMotionModel.load_float_checkpoint`).

Shapes (float preset): F = motion dim 512, Da = projected audio 512, E = 7 emotions, H = 1024,
window of 60 frames = 10 previous + 50 current. Flow convention: noise at t = 0, data at t = 1;
the model predicts the velocity of all 60 frames, the loss uses the last 50.

Condition dropout is not done here (the trainer draws it). A dropped audio condition is zero AFTER
the projection, as in FLOAT; `FloatMotionModel.forward` takes per-sample keep masks for that.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dali_float.config import FMTConfig, Preset
from dali_float.errors import CheckpointError
from dali_float.models.motion_encoder import check_state_dict, read_state_dict

log = logging.getLogger(__name__)

FLOAT_FMT_PREFIX = "fmt."
FLOAT_AUDIO_PROJECTION_PREFIX = "audio_encoder.audio_projection."
OWN_AUDIO_PROJECTION_PREFIX = "audio_projection."  # FloatMotionModel's name for the same module
_MAX_PERIOD = 10_000  # of the sinusoidal timestep and position embeddings
_LN_EPS = 1e-6


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """(num_positions, dim) float32: sin on even, cos on odd columns; column pair i has period 10000^(2i/dim)."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim) // 2).to(torch.float64) / dim
    angle = position / (_MAX_PERIOD ** exponent)[None]
    table = torch.empty(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.float()


def band_mask(num_frames: int, window: int) -> torch.Tensor:
    """(T, T) bool, True where frame i must NOT attend to frame j (|i - j| > window); FLOAT's convention."""
    index = torch.arange(num_frames)
    return (index[:, None] - index[None, :]).abs() > window


class TimestepEmbedder(nn.Module):
    """t (B,) in [0, 1] -> [cos | sin] frequency embedding (B, D_freq) -> Linear -> SiLU -> Linear -> (B, H)."""

    def __init__(self, hidden_size: int, frequency_dim: int) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def frequency_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(_MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_dim % 2:
            embedding = F.pad(embedding, (0, 1))
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.frequency_embedding(t))


class SequenceEmbed(nn.Module):
    """Per-frame Linear(F -> H) of the motion sequence (`x_embedder.proj`)."""

    def __init__(self, in_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention (qkv with bias) through scaled_dot_product_attention."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, T, H); allowed (T, T) bool, True = may attend (SDPA's boolean convention)."""
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, h // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.proj(out.transpose(1, 2).reshape(b, t, h))


class Mlp(nn.Module):
    """fc1 (H -> r H) -> GELU (tanh approximation) -> fc2 (r H -> H)."""

    def __init__(self, hidden_size: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Frame-wise adaLN: shift and scale are (B, T, H) like x (one pair per frame, not per sample)."""
    return x * (1 + scale) + shift


class FMTBlock(nn.Module):
    """DiT block with frame-wise adaLN-Zero: attention and MLP, each shifted, scaled and gated per frame."""

    def __init__(self, cfg: FMTConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.norm1 = nn.LayerNorm(h, elementwise_affine=False, eps=_LN_EPS)
        self.attn = Attention(h, cfg.num_heads)
        self.norm2 = nn.LayerNorm(h, elementwise_affine=False, eps=_LN_EPS)
        self.mlp = Mlp(h, int(h * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))

    def forward(self, x: torch.Tensor, c: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x, c (B, T, H); allowed (T, T) bool."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), allowed)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Frame-wise adaLN (shift, scale) then Linear(H -> F): `decoder.*` in FLOAT's names."""

    def __init__(self, hidden_size: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=_LN_EPS)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class FlowMatchingTransformer(nn.Module):
    """FLOAT's FMT: velocity of 60 motion latents given time, previous motion, audio, reference, emotion.

    Init: DiT's (xavier-uniform linears, N(0, 0.02) timestep MLP, zeroed adaLN and output layers),
    drawn from a private generator seeded with `seed` (normally preset.init_seed).
    """

    def __init__(self, preset: Preset, seed: int | None = None) -> None:
        super().__init__()
        cfg = preset.fmt
        self.cfg = cfg
        self.motion_dim = preset.motion_dim
        self.audio_dim = cfg.audio_dim
        self.emotion_dim = preset.emotion_dim
        self.num_prev_frames = preset.timing.num_prev_frames
        self.window_frames = preset.timing.window_frames
        h = cfg.hidden_size

        self.x_embedder = SequenceEmbed(self.motion_dim, h)
        # Fixed, yet a Parameter (requires_grad=False) because float.pth stores it as one.
        self.pos_embed = nn.Parameter(sinusoid_table(self.window_frames, h)[None], requires_grad=False)
        self.t_embedder = TimestepEmbedder(h, cfg.timestep_frequency_dim)
        self.c_embedder = nn.Linear(self.motion_dim + self.audio_dim + self.emotion_dim, h)
        self.blocks = nn.ModuleList([FMTBlock(cfg) for _ in range(cfg.depth)])
        self.decoder = FinalLayer(h, self.motion_dim)
        # Banded attention: frame i sees frames i - window .. i + window. Name and convention (True =
        # blocked) as FLOAT's buffer, so state dicts line up.
        self.register_buffer("alignment_mask", band_mask(self.window_frames, cfg.attention_window))
        self.reset_parameters(preset.init_seed if seed is None else seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=generator)
                nn.init.zeros_(module.bias)
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02, generator=generator)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        zeroed = [block.adaLN_modulation[-1] for block in self.blocks]
        zeroed += [self.decoder.adaLN_modulation[-1], self.decoder.linear]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, t: torch.Tensor, x: torch.Tensor, prev_x: torch.Tensor, wa: torch.Tensor,
                prev_wa: torch.Tensor, wr: torch.Tensor, we: torch.Tensor) -> torch.Tensor:
        """Velocity (B, 60, F) of the whole window (the caller uses [:, 10:]).

        t (B,) float in [0, 1]; x (B, 50, F) noisy current motion; prev_x (B, 10, F) clean previous
        motion; wa (B, 50, Da), prev_wa (B, 10, Da) projected audio; wr (B, F) reference motion
        latent; we (B, E) emotion probabilities. Shorter windows (prev + current <= 60) also work.
        """
        seq = torch.cat([prev_x, x], dim=1)  # (B, T, F)
        audio = torch.cat([prev_wa, wa], dim=1)  # (B, T, Da)
        b, frames, _ = seq.shape
        if frames > self.window_frames or audio.shape[1] != frames:
            raise ValueError(f"FMT: motion has {frames} frames and audio {audio.shape[1]}; both must be the "
                             f"same and at most {self.window_frames}")
        h = self.x_embedder(seq) + self.pos_embed[:, :frames]
        cond = torch.cat([wr[:, None].expand(b, frames, -1), audio, we[:, None].expand(b, frames, -1)], dim=-1)
        c = self.c_embedder(cond) + self.t_embedder(t)[:, None]  # (B, T, H): one condition per frame
        allowed = ~self.alignment_mask[:frames, :frames]
        for block in self.blocks:
            h = block(h, c, allowed)
        return self.decoder(h, c)


class FloatMotionModel(nn.Module):
    """Everything FLOAT trains: `fmt` plus `audio_projection` (Linear(A -> Da) -> LayerNorm -> SiLU)."""

    def __init__(self, preset: Preset, seed: int | None = None) -> None:
        super().__init__()
        self.preset = preset
        seed = preset.init_seed if seed is None else seed
        self.fmt = FlowMatchingTransformer(preset, seed)
        da = preset.fmt.audio_dim
        self.audio_projection = nn.Sequential(nn.Linear(preset.audio_feature_dim, da), nn.LayerNorm(da), nn.SiLU())
        with torch.no_grad():  # FLOAT's default torch init, but from a private generator
            weight = self.audio_projection[0].weight
            bound = 1.0 / math.sqrt(weight.shape[1])
            generator = torch.Generator().manual_seed(seed + 1)
            weight.uniform_(-bound, bound, generator=generator)
            self.audio_projection[0].bias.uniform_(-bound, bound, generator=generator)

    def project_audio(self, audio: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Raw features (B, T, A) -> (B, T, Da); samples with keep[b] == 0 become zero (dropped condition)."""
        projected = self.audio_projection(audio)
        if keep is not None:
            projected = projected * keep.to(projected.dtype)[:, None, None]
        return projected

    def forward(self, t: torch.Tensor, x: torch.Tensor, prev_x: torch.Tensor, audio: torch.Tensor,
                prev_audio: torch.Tensor, wr: torch.Tensor, we: torch.Tensor,
                audio_keep: torch.Tensor | None = None, prev_audio_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity (B, 60, F) from raw cached audio features.

        t (B,), x (B, 50, F), prev_x (B, 10, F), audio (B, 50, A), prev_audio (B, 10, A), wr (B, F),
        we (B, E). audio_keep / prev_audio_keep: optional (B,) 0/1 (or bool) masks; 0 zeroes that sample's
        projected (previous) audio, which is how FLOAT drops the audio condition. Dropping the other
        conditions (wr, we, prev_x) is zeroing the inputs themselves.
        """
        wa = self.project_audio(audio, audio_keep)
        prev_wa = self.project_audio(prev_audio, prev_audio_keep)
        return self.fmt(t, x, prev_x, wa, prev_wa, wr, we)

    @torch.no_grad()
    def velocity_with_guidance(self, t: torch.Tensor, x: torch.Tensor, prev_x: torch.Tensor, audio: torch.Tensor,
                               prev_audio: torch.Tensor, wr: torch.Tensor, we: torch.Tensor,
                               a_scale: float = 2.0, e_scale: float = 1.0,
                               prev_audio_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Classifier-free guided velocity (B, 60, F), FLOAT's incremental form.

        One batched call on [uncond (audio 0, emotion 0), all_cond, audio_only (emotion 0)]:
        v = uncond + a_scale (audio_only - uncond) + e_scale (all_cond - audio_only).
        The previous audio is kept in all three (as FLOAT); pass prev_audio_keep = 0 for the first
        chunk, which has no previous frames. Arguments as in forward.
        """
        if a_scale == 1.0 and e_scale == 1.0:  # the formula collapses to all_cond
            return self(t, x, prev_x, audio, prev_audio, wr, we, prev_audio_keep=prev_audio_keep)
        b = x.shape[0]
        ones = torch.ones(b, device=x.device)
        audio_keep = torch.cat([torch.zeros_like(ones), ones, ones])
        we3 = torch.cat([torch.zeros_like(we), we, torch.zeros_like(we)])
        prev_keep = None if prev_audio_keep is None else prev_audio_keep.repeat(3)

        def rep(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.repeat(3, *([1] * (tensor.ndim - 1)))

        out = self(rep(t), rep(x), rep(prev_x), rep(audio), rep(prev_audio), rep(wr), we3,
                   audio_keep=audio_keep, prev_audio_keep=prev_keep)
        uncond, all_cond, audio_only = out.chunk(3, dim=0)
        return uncond + a_scale * (audio_only - uncond) + e_scale * (all_cond - audio_only)

    def load_float_checkpoint(self, path: Path) -> FloatMotionModel:
        """Load `fmt.*` and `audio_encoder.audio_projection.*` from FLOAT's float.pth (strict); returns self.

        Also accepts this model's own state dict (`fmt.*`, `audio_projection.*`). Other keys of
        float.pth (motion auto-encoder, wav2vec2, emotion) are ignored; FLOAT's `fmt.alignment_mask`
        buffer may be absent. Raises CheckpointError (one line) on a missing file or any mismatch.
        """
        path = Path(path)
        state = checked_float_state(self, read_state_dict(path, "FLOAT"), path)
        self.load_state_dict(state, strict=False)  # strictness checked above; the mask buffer may be absent
        log.info("loaded FMT and audio projection from %s (%d tensors)", path, len(state))
        return self


def from_float_names(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The FloatMotionModel tensors of a float.pth (or of a FloatMotionModel state dict), by this model's
    names: `fmt.*` as they are, `audio_encoder.audio_projection.*` -> `audio_projection.*`; every other
    key (motion auto-encoder, wav2vec2, emotion encoder) left out."""
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if key.startswith(FLOAT_FMT_PREFIX):
            state[key] = value
        elif key.startswith(FLOAT_AUDIO_PROJECTION_PREFIX):
            state[OWN_AUDIO_PROJECTION_PREFIX + key[len(FLOAT_AUDIO_PROJECTION_PREFIX):]] = value
        elif key.startswith(OWN_AUDIO_PROJECTION_PREFIX):
            state[key] = value
    return state


def float_name(key: str) -> str:
    """A FloatMotionModel state-dict key by float.pth's name (the inverse of from_float_names)."""
    if key.startswith(OWN_AUDIO_PROJECTION_PREFIX):
        return FLOAT_AUDIO_PROJECTION_PREFIX + key[len(OWN_AUDIO_PROJECTION_PREFIX):]
    if key.startswith(FLOAT_FMT_PREFIX):
        return key
    raise ValueError(f"{key!r} is not a FloatMotionModel key")


def to_float_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FloatMotionModel state dict by float.pth's names."""
    return {float_name(key): value for key, value in state.items()}


def checked_float_state(model: FloatMotionModel, raw: Mapping[str, torch.Tensor], path: Path
                        ) -> dict[str, torch.Tensor]:
    """`model`'s tensors out of a float.pth or FloatMotionModel state dict read from `path`, checked strictly
    against `model` (names and shapes; its buffers may be absent). `model` may live on the meta device:
    only its shapes are read. CheckpointError (one line: counts, the first offending keys with both
    shapes, what to pass) on any mismatch."""
    state = from_float_names(raw)
    if not state:
        raise CheckpointError(f"FLOAT checkpoint {path} has no fmt.* or audio_encoder.audio_projection.* keys; "
                              f"pass FLOAT's float.pth or a FloatMotionModel state dict")
    buffers = frozenset(name for name, _ in model.named_buffers())
    check_state_dict(path, "FLOAT", {k: v.shape for k, v in model.state_dict().items()}, state, optional=buffers,
                     hint=f"float.pth needs --preset float (this model is preset {model.preset.name})")
    return state


def count_parameters(module: nn.Module) -> int:
    """Number of parameter values (FLOAT counts its fixed pos_embed Parameter too)."""
    return sum(p.numel() for p in module.parameters())
