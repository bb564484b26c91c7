"""The fp16 flow-matching trainer of FLOAT's motion model, one concern per module:

  config       TrainConfig: every choice of a run, validated, saved in each checkpoint
  precision    fp16 (autocast + GradScaler) / bf16 / float32, and what dtype the features enter with
  objective    flow matching on the straight path, L_OT + L_vel, FLOAT's condition dropout
  optim        AdamW, warm-up + constant/cosine schedule, EMA of the weights
  checkpoint   atomic save, keep the newest K, `latest`, RNG capture, resume checks
  run_folder   config.json (every setting), what --resume restores of it, run.lock (one owner at a time)
  initial      a new run's weights: the seeded random init, or --init_from (float.pth, a run of ours)
  distributed  torchrun / DDP, the per-step agreement of the ranks, Ctrl-C handling
  data         preprocessing when needed, this rank's loader
  monitor      progress bar, log lines, metrics.jsonl, wandb, the run summary
  trainer      train(): the loop, top to bottom
"""
from __future__ import annotations

from dali_float.training.config import DEFAULT_LR, TrainConfig
from dali_float.training.data import DataSource
from dali_float.training.objective import ConditionDropout, LossTerms, flow_matching_loss
from dali_float.training.trainer import TrainResult, train

__all__ = ["DEFAULT_LR", "ConditionDropout", "DataSource", "LossTerms", "TrainConfig", "TrainResult",
           "flow_matching_loss", "train"]
