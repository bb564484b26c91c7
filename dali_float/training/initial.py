"""Where a new run's trained weights come from: the seeded random init, or `--init_from`.

    --init_from float.pth          FLOAT's checkpoint: its `fmt.*` and `audio_encoder.audio_projection.*`
                                   (everything FLOAT trains), strictly: names and shapes against the preset
    --init_from RUN_DIR | X.pt     a dali-float run: its weights only, the EMA's when the run kept one
                                   (the weights the sampler renders and the export hands back)

Either way the run is new: the optimiser's moments, the learning-rate warm-up, the step count, the data
order and the noise start afresh, and an EMA starts from the loaded weights. `--resume` continues a run
instead (TrainConfig refuses the two together). The frozen encoders never come from here: a float.pth's
motion auto-encoder and wav2vec2 models are left in the file (the run's features come from --motion_ckpt,
--wav2vec2_path, --emotion_path).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dali_float.config import Preset
from dali_float.models import FloatMotionModel
from dali_float.models.fmt import OWN_AUDIO_PROJECTION_PREFIX, checked_float_state
from dali_float.models.motion_encoder import as_state_dict, read_torch_file
from dali_float.training.checkpoint import (check_preset, checked_training_checkpoint, find_checkpoint,
                                            is_training_checkpoint)
from dali_float.training.optim import with_ema_weights

log = logging.getLogger(__name__)

FROM_FLOAT = "float.pth"  # InitialWeights.kind: FLOAT's checkpoint (or a FloatMotionModel state dict)
FROM_RUN = "run"  # a checkpoint of this trainer

# The parts of FloatMotionModel, by the prefix of their state-dict keys: one log line each.
PARTS = {"FMT": "fmt.", "audio projection": OWN_AUDIO_PROJECTION_PREFIX}


@dataclass(frozen=True)
class InitialWeights:
    """Weights read for a new run, checked against its preset, not yet in a model."""

    path: Path  # the file read (a run folder's newest checkpoint)
    kind: str  # FROM_FLOAT or FROM_RUN
    state: dict[str, torch.Tensor]  # FloatMotionModel's names, float32 on the CPU; buffers may be absent
    weights: str  # which of the file's weights: "float.pth", "EMA" or "model" (a run without an EMA)
    step: int | None  # the run's step (FROM_RUN)
    left_in_file: int  # tensors of the file not taken (a float.pth's frozen models)

    def tensors(self, part: str) -> int:
        return sum(1 for k in self.state if k.startswith(PARTS[part]))

    def apply(self, model: FloatMotionModel) -> None:
        """Copy the weights into `model` (any device); the buffers the file lacks keep their built values."""
        model.load_state_dict(self.state, strict=False)  # strictness checked when read

    def record(self) -> dict[str, Any]:
        """What the run's config (every checkpoint, wandb) records of its start."""
        return {"path": str(self.path), "kind": self.kind, "weights": self.weights, "step": self.step,
                "tensors": {part: self.tensors(part) for part in PARTS}}


def read_initial_weights(path: Path, preset: Preset) -> InitialWeights:
    """`--init_from PATH`: FLOAT's float.pth, or a run folder or checkpoint of this trainer, read once and
    checked against `preset` (CheckpointError, one line, naming the first keys that differ with both shapes)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = find_checkpoint(path)
    obj = read_torch_file(path, "--init_from")
    with torch.device("meta"):  # the shapes to check against, without memory or init time
        expected = FloatMotionModel(preset)
    if is_training_checkpoint(obj):
        ckpt = checked_training_checkpoint(obj, path)
        check_preset(ckpt, path, preset, "another --init_from")
        weights = with_ema_weights(ckpt["model"], ckpt["ema"])
        state = checked_float_state(expected, weights, path)
        return InitialWeights(path, FROM_RUN, state, "EMA" if ckpt["ema"] else "model", int(ckpt["step"]), 0)
    raw = as_state_dict(obj, path, "--init_from")
    state = checked_float_state(expected, raw, path)
    return InitialWeights(path, FROM_FLOAT, state, FROM_FLOAT, None, len(raw) - len(state))


def log_initial_weights(initial: InitialWeights | None, seed: int, warmup_steps: int, ema: bool,
                        motion_ckpt: Path | None) -> None:
    """One log line per part of the model (where it came from), then what starts from scratch."""
    if initial is None:
        for part in PARTS:
            log.info("init: %s: seeded random init (seed %d); --init_from float.pth fine-tunes FLOAT's", part, seed)
        return
    what = (f"FLOAT checkpoint {initial.path}" if initial.kind == FROM_FLOAT else
            f"run checkpoint {initial.path} (step {initial.step}, {initial.weights} weights)")
    for part in PARTS:
        log.info("init: %s from %s: %d tensors", part, what, initial.tensors(part))
    if initial.kind == FROM_FLOAT and initial.left_in_file:
        log.info("init: left in %s: %d tensors of the frozen models (motion auto-encoder, wav2vec2, emotion): this "
                 "run's features come from --motion_ckpt / --wav2vec2_path / --emotion_path", initial.path.name,
                 initial.left_in_file)
    if initial.kind == FROM_RUN:
        log.info("init: not taken from that run: its optimiser, EMA, schedule, step, data order and RNG state "
                 "(--resume continues a run)")
    log.info("init: from scratch: optimiser state, learning-rate warm-up (%d steps), step count, data order and "
             "noise (seed %d)%s", warmup_steps, seed, "; the EMA starts from the loaded weights" if ema else "")
    if initial.kind == FROM_FLOAT and motion_ckpt is None:
        log.warning("--init_from %s without --motion_ckpt: the FMT learned FLOAT's motion latents, but this run's "
                    "features come from a random-init motion encoder; pass --motion_ckpt %s", initial.path,
                    initial.path)
