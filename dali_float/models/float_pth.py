"""FLOAT's float.pth as a whole: the parts it holds, their names in it, and a check of a whole file.

float.pth is the flat state dict of FLOAT's model (official `models/float/FLOAT.py`), whose parts are

    motion_autoencoder.enc.*            LIA encoder                       (MotionEncoder)
    motion_autoencoder.dec.*            decoder and motion dictionary     (MotionDecoder; the dictionary: MotionEncoder)
    fmt.*                               flow-matching transformer         (FloatMotionModel.fmt)
    audio_encoder.audio_projection.*    the trainable audio projection    (FloatMotionModel.audio_projection)
    audio_encoder.wav2vec2.*            frozen wav2vec2-base              (not read here: passed through)
    emotion_encoder.wav2vec2_for_emotion.*  frozen emotion classifier     (not read here: passed through)

FLOAT's `generate.py` fills its model by `named_parameters()` from that dict, skipping names that contain
"wav2vec2": a file it loads without a missing parameter holds every parameter of the first four parts.
Buffers (blur kernels, the attention mask) are rebuilt by FLOAT's constructors, so a file may lack them.
Each model module keeps its own prefix and renaming; this module puts them together.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from dali_float.config import Preset
from dali_float.models.fmt import FLOAT_AUDIO_PROJECTION_PREFIX, FLOAT_FMT_PREFIX, FloatMotionModel, float_name
from dali_float.models.motion_decoder import FLOAT_DECODER_PREFIX, MotionDecoder, decoder_keys
from dali_float.models.motion_encoder import (FLOAT_DIRECTION_KEY, FLOAT_ENCODER_PREFIX, MotionEncoder,
                                              check_state_dict)

MOTION_AUTOENCODER_PREFIX = "motion_autoencoder."
# The prefixes of the parts this project models; keys under them are checked by name and shape, every
# other key of float.pth (the two frozen wav2vec2 models) is carried as it is.
MODELLED_PREFIXES = (MOTION_AUTOENCODER_PREFIX, FLOAT_FMT_PREFIX, FLOAT_AUDIO_PROJECTION_PREFIX)


@dataclass(frozen=True)
class FloatLayout:
    """The keys of float.pth this project models, for one preset, by float.pth's names."""

    shapes: dict[str, torch.Size]  # every such key with its shape
    buffers: frozenset[str]  # those that are buffers (FLOAT rebuilds them: a file may lack them)
    trained: frozenset[str]  # those of FloatMotionModel, what training changes (fmt.*, the audio projection)

    @property
    def parameters(self) -> frozenset[str]:
        """What generate.py copies by name: every key but the buffers."""
        return frozenset(self.shapes) - self.buffers


def float_layout(preset: Preset) -> FloatLayout:
    """float.pth's modelled keys at `preset`'s sizes, read off the project's models built on the meta device
    (names and shapes only: no memory, no init time)."""
    with torch.device("meta"):
        encoder = MotionEncoder(preset.motion)
        decoder = MotionDecoder(preset.motion)
        motion_model = FloatMotionModel(preset)
    shapes: dict[str, torch.Size] = {}
    buffers: set[str] = set()
    encoder_buffers = {name for name, _ in encoder.named_buffers()}
    for name, tensor in encoder.state_dict().items():
        key = FLOAT_DIRECTION_KEY if name == "direction.weight" else FLOAT_ENCODER_PREFIX + name
        shapes[key] = tensor.shape
        if name in encoder_buffers:
            buffers.add(key)
    decoder_buffers = {name for name, _ in decoder.named_buffers()}
    for name, shape in decoder_keys(decoder).items():  # includes the dictionary, as float.pth does
        shapes[FLOAT_DECODER_PREFIX + name] = shape
        if name in decoder_buffers:
            buffers.add(FLOAT_DECODER_PREFIX + name)
    own_buffers = {name for name, _ in motion_model.named_buffers()}
    trained = set()
    for name, tensor in motion_model.state_dict().items():
        key = float_name(name)
        shapes[key] = tensor.shape
        trained.add(key)
        if name in own_buffers:
            buffers.add(key)
    return FloatLayout(shapes, frozenset(buffers), frozenset(trained))


def check_float_pth(state: Mapping[str, torch.Tensor], path: Path, preset: Preset, what: str = "FLOAT") -> FloatLayout:
    """CheckpointError (one line: counts, the first offending keys with both shapes, what to pass) unless
    `state` is a whole float.pth for `preset`: every modelled parameter present with its shape, no unknown
    key under a modelled prefix (buffers may be absent). Keys of the other parts are not looked at.
    Returns the layout it checked against."""
    layout = float_layout(preset)
    modelled = {k: v for k, v in state.items() if k.startswith(MODELLED_PREFIXES)}
    check_state_dict(path, what, layout.shapes, modelled, optional=layout.buffers,
                     hint=f"pass FLOAT's whole float.pth (motion auto-encoder, FMT, audio projection) for preset "
                          f"{preset.name} (FLOAT's own file fits --preset float)")
    return layout
