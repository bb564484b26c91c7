"""The trainer's configuration: one frozen, validated record of every choice a run makes.

It is built from train.py's arguments (`TrainConfig.from_args`), saved in every checkpoint and sent to
wandb. Fields left None are resolved where the information exists (`resolved_lr`, the device in
`training.distributed`, the precision in `training.precision`), and the resolved values are logged.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dali_float import paths
from dali_float.config import PRESETS
from dali_float.errors import UsageError
from dali_float.loaders import EPOCH_POLICIES, LOADER_KINDS, REF_RULES
from dali_float.loaders.sampling import check_choice
from dali_float.media.framing import check_crop, default_crop
from dali_float.models import ModelSources

PRECISIONS = ("fp16", "bf16", "no")
LR_SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("online", "offline", "disabled")

# Learning rate per preset when --lr is not given. float: what FLOAT's training was reported with
# (Adam, 1e-5, batch 8; unverified). tiny: a 0.7 M-parameter model learns in a few hundred steps at 1e-3.
DEFAULT_LR = {"float": 1e-5, "tiny": 1e-3}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is asked to do (units in the comments)."""

    # data
    preset: str = "tiny"
    loader: str = "dali"  # dali | torch | naive
    data_root: Path | None = None  # None: the built-in demo corpus
    segments: Path | None = None  # CSV of clip segments (media.segments); None: every video is a clip
    crop: str | None = None  # face | center | none; None: face, center for the demo corpus (media.framing)
    cache_dir: Path | None = None  # None: $DALI_FLOAT_HOME/features
    force_preprocess: bool = False
    lock_timeout_s: float = 60.0  # wait this long for another writer of the cache (cache.lock)
    motion_ckpt: Path | None = None  # the frozen encoders' weights (None: seeded random init)
    wav2vec2_path: Path | None = None
    emotion_path: Path | None = None
    emotion: str | None = None  # model | filename | none (None: model)
    ref: str = "first"  # reference frame rule (loaders.sampling)
    epoch_policy: str = "windows"
    read_strategy: str = "auto"  # DALI loader: auto | pread | resident | python (checked by the loader)
    resident_reserve_gb: float | None = None  # resident: memory left besides the partition (None: 16 GPU, 4 CPU)
    num_workers: int = 2  # torch / naive loader worker processes
    num_threads: int = 2  # DALI pipeline CPU threads
    # optimisation
    steps: int = 1000  # optimiser steps (batches per rank), counted from the start of the run
    batch_size: int = 8  # windows per rank and step
    lr: float | None = None  # peak learning rate; None: DEFAULT_LR of the preset
    lr_schedule: str = "constant"  # after warm-up: constant, or cosine down to lr * COSINE_FLOOR at `steps`
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    weight_decay: float = 0.01  # AdamW (decoupled)
    grad_clip: float = 1.0  # max global L2 norm of the gradient
    ema_decay: float = 0.0  # EMA of the weights; 0 = off
    loss_ot_weight: float = 1.0
    loss_vel_weight: float = 1.0
    no_audio: bool = False  # ablation: drop audio and previous audio for every sample
    mixed_precision: str | None = None  # fp16 | bf16 | no; None: fp16 on a GPU, no on the CPU
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    # output
    output_dir: Path = dataclasses.field(default_factory=paths.default_output_dir)
    save_every: int = 1000  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept (0: all)
    resume: str | None = None  # "latest" or a checkpoint path
    init_from: Path | None = None  # a new run's weights: float.pth, a run folder or checkpoint (training.initial)
    log_every: int = 10  # steps between log lines / metrics.jsonl records
    progress: bool = True  # progress bar (rank 0): tqdm on a terminal, lines in a log file
    log_samples: bool = False  # write each rank's (clip_id, window_start) per step to samples_rank<R>.tsv
    sample_every: int | None = None  # steps between sample videos (0: none); None: 1000 on a GPU, none on the CPU
    wandb_project: str | None = None
    wandb_mode: str | None = None  # None: online when a project is given, else disabled

    def __post_init__(self) -> None:
        check_choice("preset", self.preset, sorted(PRESETS))
        check_choice("loader", self.loader, LOADER_KINDS)
        check_choice("ref", self.ref, REF_RULES)
        check_choice("epoch_policy", self.epoch_policy, EPOCH_POLICIES)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("device", self.device, DEVICES)
        check_crop(self.resolved_crop)
        if self.mixed_precision is not None:
            check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        if self.wandb_mode is not None:
            check_choice("wandb_mode", self.wandb_mode, WANDB_MODES)
        at_least = {"steps": (self.steps, 1), "batch_size": (self.batch_size, 1), "log_every": (self.log_every, 1),
                    "warmup_steps": (self.warmup_steps, 0), "save_every": (self.save_every, 0),
                    "keep_checkpoints": (self.keep_checkpoints, 0), "num_workers": (self.num_workers, 0),
                    "num_threads": (self.num_threads, 1)}
        for name, (value, low) in at_least.items():
            if value < low:
                raise UsageError(f"--{name} must be at least {low}, got {value}")
        if self.resident_reserve_gb is not None and not self.resident_reserve_gb >= 0:
            raise UsageError(f"--resident_reserve_gb must be at least 0, got {self.resident_reserve_gb}")
        if self.sample_every is not None and self.sample_every < 0:
            raise UsageError(f"--sample_every must be at least 0 (0 = no sample videos), got {self.sample_every}")
        if self.lr is not None and not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UsageError(f"--ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if min(self.loss_ot_weight, self.loss_vel_weight) < 0 or self.loss_ot_weight + self.loss_vel_weight == 0:
            raise UsageError(f"--loss_ot_weight and --loss_vel_weight must be >= 0 and not both 0, got "
                             f"{self.loss_ot_weight} and {self.loss_vel_weight}")
        if self.grad_clip <= 0 or self.weight_decay < 0:
            raise UsageError(f"grad_clip must be > 0 and weight_decay >= 0, got {self.grad_clip}, {self.weight_decay}")
        if self.init_from is not None and self.resume is not None:
            raise UsageError("--init_from starts a new run from other weights, --resume continues this one: pass one "
                             "of the two")
        ModelSources(self.motion_ckpt, self.wav2vec2_path, self.emotion_path, self.emotion or "model")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """From train.py's namespace: every attribute named like a field is taken, the rest ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names and v is not None}
        return cls(**values)

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.preset]

    @property
    def resolved_crop(self) -> str:
        return self.crop if self.crop is not None else default_crop(self.data_root)

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else paths.default_cache_dir(self.data_root)

    @property
    def resolved_wandb_mode(self) -> str:
        if self.wandb_mode is not None:
            return self.wandb_mode
        return "online" if self.wandb_project else "disabled"

    @property
    def sources(self) -> ModelSources:
        return ModelSources(self.motion_ckpt, self.wav2vec2_path, self.emotion_path, self.emotion or "model")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return Path(self.output_dir) / "metrics.jsonl"

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (paths as strings), with the resolved learning rate and cache folder."""
        out = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
        out.update(resolved_lr=self.resolved_lr, resolved_cache_dir=str(self.resolved_cache_dir),
                   resolved_crop=self.resolved_crop)
        return out
