"""The frozen speech-emotion encoder: one 7-vector of probabilities per clip.

FLOAT uses `r-f/wav2vec-english-speech-emotion-recognition` (wav2vec2-large-xlsr-53 fine-tune):
a `wav2vec2` backbone, the last hidden state mean-pooled over time, then a head
`classifier.dense` -> tanh -> `classifier.out_proj` (7 logits) and a softmax. The classifier here
has those parameter names so that a local copy of that checkpoint loads with `from_pretrained`.

Two other sources of the emotion vector: the RAVDESS file-name code (one-hot) and a uniform vector.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2Model, Wav2Vec2PreTrainedModel

from dali_float.config import EMOTION_CLASSES, Preset
from dali_float.errors import CheckpointError, MediaError, UsageError
from dali_float.models.audio_encoder import MIN_SAMPLES, load_pretrained, seeded_init, wav2vec2_config

log = logging.getLogger(__name__)

_POOLING_MODES = ("mean", "sum", "max")

# RAVDESS: MM-VC-EE-II-SS-RR-AA (modality, vocal channel, emotion, intensity, statement, repetition, actor).
_RAVDESS_NAME = re.compile(r"^\d{2}-\d{2}-(\d{2})-\d{2}-\d{2}-\d{2}-\d{2}$")
_RAVDESS_EMOTIONS = {
    "01": "neutral", "02": "neutral",  # calm has no class of its own: neutral, as the community code does
    "03": "happy", "04": "sad", "05": "angry", "06": "fear", "07": "disgust", "08": "surprise",
}


class ClassificationHead(nn.Module):
    """dense (H -> H) -> tanh -> out_proj (H -> classes); dropout between, inactive in eval."""

    def __init__(self, config: Wav2Vec2Config) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(getattr(config, "final_dropout", 0.0))
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.dense(self.dropout(pooled)))
        return self.out_proj(self.dropout(x))


class Wav2Vec2EmotionClassifier(Wav2Vec2PreTrainedModel):
    """wav2vec2 + pooled classification head, in the layout of the r-f speech-emotion checkpoint."""

    def __init__(self, config: Wav2Vec2Config) -> None:
        super().__init__(config)
        self.pooling_mode = getattr(config, "pooling_mode", "mean")
        if self.pooling_mode not in _POOLING_MODES:
            raise CheckpointError(f"emotion classifier config has pooling_mode {self.pooling_mode!r}; "
                                  f"expected one of {', '.join(_POOLING_MODES)}")
        self.wav2vec2 = Wav2Vec2Model(config)
        self.classifier = ClassificationHead(config)
        self.post_init()

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        """input_values (B, N) float, normalised, 16 kHz -> logits (B, num_labels)."""
        hidden = self.wav2vec2(input_values).last_hidden_state  # (B, L, H)
        if self.pooling_mode == "mean":
            pooled = hidden.mean(dim=1)
        elif self.pooling_mode == "sum":
            pooled = hidden.sum(dim=1)
        else:
            pooled = hidden.max(dim=1).values
        return self.classifier(pooled)


def _label_order(config: Wav2Vec2Config, path: Path) -> list[int]:
    """Index in the model's logits of each of EMOTION_CLASSES (the checkpoint may order them otherwise)."""
    labels = [str(config.id2label[i]).lower() for i in range(config.num_labels)]
    if sorted(labels) != sorted(EMOTION_CLASSES):
        raise CheckpointError(f"emotion classifier {path} predicts {labels}; expected the 7 classes "
                              f"{', '.join(EMOTION_CLASSES)} (use --emotion filename or none otherwise)")
    return [labels.index(name) for name in EMOTION_CLASSES]


class EmotionEncoder(nn.Module):
    """Frozen classifier -> emotion probabilities in the order of EMOTION_CLASSES.

    emotion_path: a local save_pretrained folder of the classifier (the r-f checkpoint); its backbone
    may have any size, the output is always the 7 classes. None -> seeded random init with
    `preset.emotion.wav2vec2` sizes (`preset.init_seed`), good only for testing the pipeline.
    """

    def __init__(self, preset: Preset, emotion_path: Path | None = None) -> None:
        super().__init__()
        if emotion_path is None:
            config = wav2vec2_config(
                preset.emotion.wav2vec2, num_labels=len(EMOTION_CLASSES),
                id2label=dict(enumerate(EMOTION_CLASSES)),
                label2id={name: i for i, name in enumerate(EMOTION_CLASSES)}, pooling_mode="mean")
            model = seeded_init(lambda: Wav2Vec2EmotionClassifier(config), preset.init_seed)
            order = list(range(len(EMOTION_CLASSES)))
        else:
            model = load_pretrained(Wav2Vec2EmotionClassifier, emotion_path, "emotion classifier",
                                    ("masked_spec_embed",))
            order = _label_order(model.config, Path(emotion_path))
            log.info("loaded emotion classifier from %s (hidden size %d, %d layers)", emotion_path,
                     model.config.hidden_size, model.config.num_hidden_layers)
        model.requires_grad_(False)
        self.model = model.eval()
        self.register_buffer("order", torch.tensor(order), persistent=False)

    def train(self, mode: bool = True) -> EmotionEncoder:
        """Frozen: stays in eval mode whatever the caller asks."""
        return super().train(False)

    @torch.no_grad()
    def predict(self, waveform: torch.Tensor) -> torch.Tensor:
        """waveform (1, N) or (N,) float, normalised, 16 kHz -> probabilities (7,) float32 on the CPU.

        Order: dali_float.config.EMOTION_CLASSES. The whole clip is classified at once (FLOAT).
        """
        if waveform.ndim == 1:
            waveform = waveform[None]
        if waveform.ndim != 2 or waveform.shape[0] != 1:
            raise ValueError(f"EmotionEncoder.predict expects a (1, N) waveform, got {tuple(waveform.shape)}")
        if waveform.shape[1] < MIN_SAMPLES:
            raise MediaError(f"audio of {waveform.shape[1]} samples is too short for the emotion classifier "
                             f"(at least {MIN_SAMPLES} samples)")
        device = self.order.device
        logits = self.model(waveform.to(device, torch.float32)).float()
        probs = torch.softmax(logits[0], dim=-1)[self.order]
        return probs.cpu()  # one 7-vector per clip; the copy to the CPU is a sync point, once per clip


def emotion_from_filename(path: str | Path) -> np.ndarray:
    """One-hot (7,) float32 from a RAVDESS-style name `MM-VC-EE-II-SS-RR-AA.<ext>` (EE: emotion code).

    01 neutral, 02 calm -> neutral, 03 happy, 04 sad, 05 angry, 06 fearful -> fear, 07 disgust,
    08 surprised -> surprise. Anything else raises MediaError.
    """
    stem = Path(path).stem
    match = _RAVDESS_NAME.match(stem)
    if match is None or match.group(1) not in _RAVDESS_EMOTIONS:
        raise MediaError(f"{path}: --emotion filename needs RAVDESS-style names MM-VC-EE-II-SS-RR-AA "
                         f"(two-digit fields, EE = 01..08, e.g. 01-01-03-01-01-01-12.mp4)")
    return one_hot_emotion(_RAVDESS_EMOTIONS[match.group(1)])


def one_hot_emotion(name: str) -> np.ndarray:
    """(7,) float32 one-hot of an EMOTION_CLASSES name (as FLOAT's `--emo`); UsageError for another name."""
    if name not in EMOTION_CLASSES:
        raise UsageError(f"emotion {name!r} is not one of {', '.join(EMOTION_CLASSES)}")
    vector = np.zeros(len(EMOTION_CLASSES), dtype=np.float32)
    vector[EMOTION_CLASSES.index(name)] = 1.0
    return vector


def uniform_emotion() -> np.ndarray:
    """(7,) float32, each 1/7: no emotion information (`--emotion none`)."""
    return np.full(len(EMOTION_CLASSES), 1.0 / len(EMOTION_CLASSES), dtype=np.float32)
