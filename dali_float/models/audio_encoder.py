"""The frozen wav2vec2 audio encoder, run at the video frame rate (FLOAT's convention).

The conv feature extractor gives ~50 vectors per second; FLOAT interpolates them linearly
(align_corners=True) to exactly T video frames BEFORE the feature projection and the transformer,
so the transformer runs at 25 Hz, and concatenates the outputs of all transformer layers:
(B, T, hidden_size * num_hidden_layers), 12 x 768 = 9216 values per frame with wav2vec2-base.

With transformers 5.x the top-level model collects the hidden states, so the interpolation is a
forward hook on `model.feature_extractor` and the model is called as a whole (see FLOAT.md).

The trainable projection of these features (Linear -> LayerNorm -> SiLU) is part of the trained
model (`fmt.FloatMotionModel.audio_projection`), not of this frozen encoder: the cache holds the
unprojected features.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

from dali_float.config import PRESETS, Preset, Wav2Vec2Sizes
from dali_float.errors import CheckpointError, MediaError

log = logging.getLogger(__name__)

# The receptive field of wav2vec2's conv stack (kernels 10,3,3,3,3,2,2 / strides 5,2,2,2,2,2,2):
# shorter input gives no feature vector at all.
MIN_SAMPLES = 400
# Parameters a from_pretrained folder may lack without harm: the SpecAugment vector is unused at inference.
_OPTIONAL_WAV2VEC2_KEYS = ("masked_spec_embed",)


def wav2vec2_config(sizes: Wav2Vec2Sizes, **extra: Any) -> Wav2Vec2Config:
    """A transformers Wav2Vec2Config with the preset's sizes (for a seeded random init).

    conv_bias follows the layout: the "large" (xlsr / lv60) models with layer-normed convs have conv
    biases, the "base" models with a group norm do not.
    """
    return Wav2Vec2Config(
        hidden_size=sizes.hidden_size,
        num_hidden_layers=sizes.num_hidden_layers,
        num_attention_heads=sizes.num_attention_heads,
        intermediate_size=sizes.intermediate_size,
        conv_dim=list(sizes.conv_dim),
        conv_kernel=list(sizes.conv_kernel),
        conv_stride=list(sizes.conv_stride),
        num_conv_pos_embeddings=sizes.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=sizes.num_conv_pos_embedding_groups,
        do_stable_layer_norm=sizes.do_stable_layer_norm,
        feat_extract_norm=sizes.feat_extract_norm,
        conv_bias=sizes.feat_extract_norm == "layer",
        apply_spec_augment=False,  # frozen encoders never mask
        **extra,
    )


def seeded_init(build: Any, seed: int) -> Any:
    """Call build() with the global CPU RNG seeded to `seed`, restoring the caller's RNG state after.

    transformers initialises weights with torch.nn.init (the global generator), hence fork_rng.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def load_pretrained(cls: type, path: Path, what: str, optional_keys: tuple[str, ...] = ()) -> Any:
    """cls.from_pretrained(path) from local files only, float32; CheckpointError (one line) if it fails.

    A folder whose weights do not cover the model (another architecture) is refused instead of being
    silently completed with random weights.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{what} folder {path} does not exist or is not a folder "
                              f"(expected a save_pretrained folder with config.json and the weights)")
    try:
        model, info = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                          output_loading_info=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... for a bad folder
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{what} folder {path} does not load ({type(err).__name__}: {reason[:200]}); "
                              f"expected a save_pretrained folder with config.json and "
                              f"model.safetensors or pytorch_model.bin") from None
    missing = [k for k in info.get("missing_keys", ()) if not any(k.endswith(o) for o in optional_keys)]
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or mismatched:
        shown = ", ".join(str(k) for k in (missing + mismatched)[:3])
        raise CheckpointError(f"{what} folder {path} does not fit {cls.__name__}: {len(missing)} missing and "
                              f"{len(mismatched)} shape-mismatched weights ({shown}); "
                              f"is it the right model?")
    return model


class AudioEncoder(nn.Module):
    """Frozen wav2vec2 (always in eval mode) -> per-frame features of all transformer layers.

    preset: fixes the sizes (a loaded folder must match them). wav2vec2_path: a local
    save_pretrained folder (e.g. facebook/wav2vec2-base-960h); None -> seeded random init
    (`preset.init_seed`), good only for testing the pipeline.
    """

    def __init__(self, preset: Preset, wav2vec2_path: Path | None = None) -> None:
        super().__init__()
        self.preset = preset
        self.sizes = preset.audio.wav2vec2
        if wav2vec2_path is None:
            model = seeded_init(lambda: Wav2Vec2Model(wav2vec2_config(self.sizes)), preset.init_seed)
        else:
            model = load_pretrained(Wav2Vec2Model, wav2vec2_path, "wav2vec2", _OPTIONAL_WAV2VEC2_KEYS)
            self._check_sizes(model.config, Path(wav2vec2_path))
            model.config.apply_spec_augment = False
            log.info("loaded wav2vec2 from %s", wav2vec2_path)
        model.requires_grad_(False)
        self.model = model.eval()
        # encode()'s frame count, read by the hook; per thread: decode lanes share this encoder
        self._call = threading.local()
        self.model.feature_extractor.register_forward_hook(self._to_frame_rate)

    def _check_sizes(self, config: Wav2Vec2Config, path: Path) -> None:
        found = (config.hidden_size, config.num_hidden_layers)
        if found == (self.sizes.hidden_size, self.sizes.num_hidden_layers):
            return
        fits = [p.name for p in PRESETS.values()
                if (p.audio.wav2vec2.hidden_size, p.audio.wav2vec2.num_hidden_layers) == found]
        advice = f"use --preset {fits[0]}" if fits else "no preset has these sizes"
        raise CheckpointError(
            f"wav2vec2 folder {path} has hidden_size {found[0]} x {found[1]} layers, preset "
            f"{self.preset.name} expects {self.sizes.hidden_size} x {self.sizes.num_hidden_layers}; {advice}")

    def train(self, mode: bool = True) -> AudioEncoder:
        """Frozen: stays in eval mode (no dropout, no layer drop, no masking) whatever the caller asks."""
        return super().train(False)

    @property
    def feature_dim(self) -> int:
        """A: values per frame (hidden_size x num_hidden_layers; float: 9216)."""
        return self.sizes.hidden_size * self.sizes.num_hidden_layers

    @property
    def device(self) -> torch.device:
        return self.model.feature_projection.projection.weight.device

    def _to_frame_rate(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook: conv features (B, C, L) -> (B, C, T), linear, align_corners=True (FLOAT)."""
        num_frames = getattr(self._call, "num_frames", None)
        if num_frames is None:
            return None
        return F.interpolate(output, size=num_frames, mode="linear", align_corners=True)

    @torch.no_grad()  # not inference_mode: the features may feed a trained projection in the same process
    def encode(self, waveform: torch.Tensor, num_frames: int) -> torch.Tensor:
        """waveform (B, N) float, normalised per utterance, 16 kHz -> features (B, T, A) float32, T = num_frames.

        The caller normally gives N = T x 640 samples (replicate-padded); any N >= 400 works, the conv
        features are stretched or squeezed to T frames. Runs on the encoder's device; under autocast
        if the caller enabled it (the result is float32 either way).
        """
        if waveform.ndim != 2:
            raise ValueError(f"AudioEncoder.encode expects a (B, N) waveform, got {tuple(waveform.shape)}")
        if waveform.shape[1] < MIN_SAMPLES:
            raise MediaError(f"audio of {waveform.shape[1]} samples is too short for wav2vec2 "
                             f"(at least {MIN_SAMPLES} samples = 25 ms at 16 kHz)")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        audio = waveform.to(self.device, torch.float32)
        self._call.num_frames = int(num_frames)
        try:
            out = self.model(audio, output_hidden_states=True)
        finally:
            self._call.num_frames = None
        layers = out.hidden_states[1:]  # [0] is the transformer's input; 1..L are its layers
        if len(layers) != self.sizes.num_hidden_layers:
            raise RuntimeError(f"wav2vec2 returned {len(layers)} layer outputs, expected "
                               f"{self.sizes.num_hidden_layers} (transformers version change?)")
        # Layer-major within a frame: [layer 1 | layer 2 | ...], as FLOAT's stack/permute/reshape.
        return torch.cat(layers, dim=-1).float()
