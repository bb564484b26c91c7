"""What FLOAT's `float.pth` holds, written from FLOAT's public description, not from this project's models.

Key names and shapes follow the official architecture (repository deepbrainai-research/float, read, not
copied): `options/base_options.py` for the sizes, `models/float/FLOAT.py` for the top-level attributes
(`motion_autoencoder`, `audio_encoder`, `emotion_encoder`, `fmt`), `models/float/encoder.py` for the LIA
encoder (`enc.net_app.convs.*`, `enc.fc.*`), `models/float/styledecoder.py` for the decoder (Synthesis,
StyledConv, ModulatedConv2d, ToRGB, ToFlow), `models/float/FMT.py` for the flow-matching transformer
(timm's `Mlp` names its layers fc1/fc2; LayerNorms without affine hold no tensors). `generate.py` fills
the model by `named_parameters()` (skipping names with "wav2vec2"), so a float.pth need not hold buffers
(blur kernels, the attention mask) nor the frozen wav2vec2 weights; `buffers=True` adds the buffers a
full `state_dict()` would have. The tests load such checkpoints into the project's models and check where
every tensor lands; `generate_py_layout` is the whole file as generate.py reads it (the export's reference).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dali_float.config import TINY_PRESET

Shape = tuple[int, ...]

# EncoderApp's channel table in FLOAT (resolution -> channels), for 512x512 inputs.
FLOAT_CHANNELS = ((512, 32), (256, 64), (128, 128), (64, 256), (32, 512), (16, 512), (8, 512), (4, 512))


@dataclass(frozen=True)
class FloatDims:
    """The sizes that shape float.pth; defaults are FLOAT's option defaults."""

    input_size: int = 512  # --input_size
    dim_w: int = 512  # --dim_w: motion latent, also the audio projection's output
    dim_m: int = 20  # --dim_m: motion coefficients (columns of the direction dictionary)
    dim_a: int = 512  # --dim_a: audio condition entering c_embedder
    dim_e: int = 7  # --dim_e
    dim_h: int = 1024  # --dim_h
    fmt_depth: int = 8  # --fmt_depth
    mlp_ratio: float = 4.0  # --mlp_ratio
    frames: int = 60  # --num_prev_frames 10 + --wav2vec_sec 2 x --fps 25
    audio_input: int = 12 * 768  # not --only_last_features: 12 hidden states of wav2vec2-base
    frequency_embedding: int = 256  # TimestepEmbedder's default
    channels: tuple[tuple[int, int], ...] = FLOAT_CHANNELS


def motion_encoder_layout(d: FloatDims, buffers: bool = False) -> dict[str, Shape]:
    """`motion_autoencoder.enc.*` and the motion dictionary `motion_autoencoder.dec.direction.weight`."""
    ch = dict(d.channels)
    p = "motion_autoencoder.enc."
    keys: dict[str, Shape] = {p + "net_app.convs.0.0.weight": (ch[d.input_size], 3, 1, 1),  # 1x1 conv, no bias
                              p + "net_app.convs.0.1.bias": (1, ch[d.input_size], 1, 1)}  # FusedLeakyReLU
    size, index = d.input_size, 1
    while size > 4:  # one ResBlock per halving, down to 4x4
        cin, cout = ch[size], ch[size // 2]
        b = f"{p}net_app.convs.{index}."
        keys |= {b + "conv1.0.weight": (cin, cin, 3, 3), b + "conv1.1.bias": (1, cin, 1, 1),
                 b + "conv2.1.weight": (cout, cin, 3, 3), b + "conv2.2.bias": (1, cout, 1, 1),
                 b + "skip.1.weight": (cout, cin, 1, 1)}  # conv2.0 and skip.0 are Blur: buffers only
        if buffers:
            keys |= {b + "conv2.0.kernel": (4, 4), b + "skip.0.kernel": (4, 4)}
        size, index = size // 2, index + 1
    keys[f"{p}net_app.convs.{index}.weight"] = (d.dim_w, ch[4], 4, 4)  # the final 4x4 conv, no bias
    for i in range(4):
        keys |= {f"{p}fc.{i}.weight": (d.dim_w, d.dim_w), f"{p}fc.{i}.bias": (d.dim_w,)}
    keys |= {f"{p}fc.4.weight": (d.dim_m, d.dim_w), f"{p}fc.4.bias": (d.dim_m,),
             "motion_autoencoder.dec.direction.weight": (d.dim_w, d.dim_m)}
    return keys


def fmt_layout(d: FloatDims, buffers: bool = False) -> dict[str, Shape]:
    """`fmt.*`: x_embedder, fixed pos_embed (a Parameter), t_embedder, c_embedder, DiT blocks, decoder."""
    h, mlp = d.dim_h, int(d.dim_h * d.mlp_ratio)
    keys: dict[str, Shape] = {
        "fmt.x_embedder.proj.weight": (h, d.dim_w), "fmt.x_embedder.proj.bias": (h,),
        "fmt.pos_embed": (1, d.frames, h),
        "fmt.t_embedder.mlp.0.weight": (h, d.frequency_embedding), "fmt.t_embedder.mlp.0.bias": (h,),
        "fmt.t_embedder.mlp.2.weight": (h, h), "fmt.t_embedder.mlp.2.bias": (h,),
        "fmt.c_embedder.weight": (h, d.dim_w + d.dim_a + d.dim_e), "fmt.c_embedder.bias": (h,),
    }
    for i in range(d.fmt_depth):
        b = f"fmt.blocks.{i}."
        keys |= {b + "attn.qkv.weight": (3 * h, h), b + "attn.qkv.bias": (3 * h,),
                 b + "attn.proj.weight": (h, h), b + "attn.proj.bias": (h,),
                 b + "mlp.fc1.weight": (mlp, h), b + "mlp.fc1.bias": (mlp,),
                 b + "mlp.fc2.weight": (h, mlp), b + "mlp.fc2.bias": (h,),
                 b + "adaLN_modulation.1.weight": (6 * h, h), b + "adaLN_modulation.1.bias": (6 * h,)}
    keys |= {"fmt.decoder.adaLN_modulation.1.weight": (2 * h, h), "fmt.decoder.adaLN_modulation.1.bias": (2 * h,),
             "fmt.decoder.linear.weight": (d.dim_w, h), "fmt.decoder.linear.bias": (d.dim_w,)}
    if buffers:
        keys["fmt.alignment_mask"] = (d.frames, d.frames)
    return keys


def audio_projection_layout(d: FloatDims) -> dict[str, Shape]:
    """`audio_encoder.audio_projection`: Linear(audio_input -> dim_w), LayerNorm(dim_w), SiLU."""
    p = "audio_encoder.audio_projection."
    return {p + "0.weight": (d.dim_w, d.audio_input), p + "0.bias": (d.dim_w,), p + "1.weight": (d.dim_w,),
            p + "1.bias": (d.dim_w,)}


def motion_decoder_layout(d: FloatDims, buffers: bool = False) -> dict[str, Shape]:
    """`motion_autoencoder.dec.*`: FLOAT's Synthesis(size, style_dim = dim_w, motion_dim = dim_m), the motion
    dictionary `direction.weight` included."""
    ch = dict(d.channels)
    p = "motion_autoencoder.dec."
    keys: dict[str, Shape] = {p + "direction.weight": (d.dim_w, d.dim_m), p + "input.input": (1, ch[4], 4, 4)}

    def styled(name: str, cin: int, cout: int, upsample: bool) -> None:
        keys.update({f"{p}{name}.conv.weight": (1, cout, cin, 3, 3),
                     f"{p}{name}.conv.modulation.weight": (cin, d.dim_w), f"{p}{name}.conv.modulation.bias": (cin,),
                     f"{p}{name}.noise.weight": (1,), f"{p}{name}.activate.bias": (1, cout, 1, 1)})
        if upsample and buffers:
            keys[f"{p}{name}.conv.blur.kernel"] = (4, 4)

    def to_rgb(name: str, cin: int, upsample: bool) -> None:
        keys.update({f"{p}{name}.conv.0.weight": (3, cin, 1, 1), f"{p}{name}.conv.1.bias": (1, 3, 1, 1),
                     f"{p}{name}.bias": (1, 3, 1, 1)})
        if upsample and buffers:
            keys[f"{p}{name}.upsample.kernel"] = (4, 4)

    styled("conv1", ch[4], ch[4], False)
    to_rgb("to_rgb1", ch[4], False)
    cin = ch[4]
    for k, log_r in enumerate(range(3, int(math.log2(d.input_size)) + 1)):
        cout = ch[2**log_r]
        styled(f"convs.{2 * k}", cin, cout, True)
        styled(f"convs.{2 * k + 1}", cout, cout, False)
        to_rgb(f"to_rgbs.{k}", cout, True)
        keys.update({f"{p}to_flows.{k}.conv.weight": (1, 3, cout, 1, 1),
                     f"{p}to_flows.{k}.conv.modulation.weight": (cout, d.dim_w),
                     f"{p}to_flows.{k}.conv.modulation.bias": (cout,), f"{p}to_flows.{k}.bias": (1, 3, 1, 1)})
        if buffers:
            keys[f"{p}to_flows.{k}.upsample.kernel"] = (4, 4)
        cin = cout
    return keys


# Stand-ins for the frozen wav2vec2 models' keys (generate.py skips every name holding "wav2vec2"): present in
# a float.pth, to be ignored by the loaders and carried unchanged by the export.
WAV2VEC2_KEYS: dict[str, Shape] = {
    "audio_encoder.wav2vec2.feature_projection.projection.weight": (4, 4),
    "emotion_encoder.wav2vec2_for_emotion.classifier.out_proj.weight": (7, 4),
}

# A few keys of the parts of FLOAT the project does not load (image decoder, frozen wav2vec2s): present in
# a float.pth, to be ignored. (The decoder key is a stand-in of another shape: these loaders never read it.)
OTHER_KEYS: dict[str, Shape] = {"motion_autoencoder.dec.to_flows.0.conv.weight": (1, 2, 3, 3), **WAV2VEC2_KEYS}


def float_checkpoint_layout(d: FloatDims, buffers: bool = False) -> dict[str, Shape]:
    """Every key of a float.pth the project reads, plus OTHER_KEYS."""
    return {**motion_encoder_layout(d, buffers), **fmt_layout(d, buffers), **audio_projection_layout(d),
            **OTHER_KEYS}


def generate_py_layout(d: FloatDims, buffers: bool = False) -> dict[str, Shape]:
    """The whole float.pth as FLOAT's generate.py reads it: every parameter of FLOAT's model (motion
    auto-encoder's encoder and decoder, FMT, audio projection) by name, plus the wav2vec2 stand-ins;
    `buffers=True` adds the buffers of a full state_dict()."""
    return {**motion_encoder_layout(d, buffers), **motion_decoder_layout(d, buffers), **fmt_layout(d, buffers),
            **audio_projection_layout(d), **WAV2VEC2_KEYS}


# The tiny preset's sizes in FLOAT's terms: checkpoints of FLOAT's layout small enough to fill with values.
TINY_DIMS = FloatDims(input_size=TINY_PRESET.motion.input_size, dim_w=TINY_PRESET.motion_dim,
                      dim_m=TINY_PRESET.motion.num_coefficients, dim_a=TINY_PRESET.fmt.audio_dim,
                      dim_h=TINY_PRESET.fmt.hidden_size, fmt_depth=TINY_PRESET.fmt.depth,
                      mlp_ratio=TINY_PRESET.fmt.mlp_ratio, audio_input=TINY_PRESET.audio_feature_dim,
                      frequency_embedding=TINY_PRESET.fmt.timestep_frequency_dim, channels=TINY_PRESET.motion.channels)


def filled(layout: dict[str, Shape], seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A checkpoint of that layout: distinct random values (the attention mask FLOAT's banded bool, +-2)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in layout.items():
        if device == "meta":
            state[name] = torch.empty(shape, device="meta", dtype=torch.bool if name.endswith("mask") else None)
        elif name.endswith("alignment_mask"):
            index = torch.arange(shape[0])
            state[name] = (index[:, None] - index[None, :]).abs() > 2
        else:
            state[name] = torch.randn(shape, generator=g)
    return state
