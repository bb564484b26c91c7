#!/usr/bin/env python
"""Train FLOAT's flow-matching transformer from the feature cache (preprocessing first when it is stale).

    python train.py --loader dali --preset tiny --steps 200         # the demo corpus, CPU or one GPU
    python train.py --resume latest                                  # continue that run, as it was set up
    python train.py --resume latest --steps 400                      # ... and make it longer
    python train.py --preset float --init_from float.pth --motion_ckpt float.pth ...   # fine-tune FLOAT
    torchrun --nproc_per_node 8 train.py --preset float --data_root /data/HDTF --motion_ckpt float.pth \\
        --wav2vec2_path wav2vec2-base-960h --emotion_path wav2vec-emotion --batch_size 8

Writes <output_dir>/metrics.jsonl (one JSON record per --log_every steps),
<output_dir>/checkpoints/step_*.pt with a `latest` pointer, <output_dir>/config.json (every setting; what
--resume restores) and, with --sample_every N, <output_dir>/samples/step_*.mp4. Exit codes: 0 done,
130 / 143 interrupted by SIGINT / SIGTERM (after saving), 2 usage error, 3 the run folder is in use (or
another problem of the machine), 1 other errors.
This script only parses arguments; the work is in dali_float.training.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dali_float.cli import (ArgumentParser, add_data_arguments, add_model_arguments, add_preset_argument, alias,
                            existing_path, given_flags, run_main, setup_logging)
from dali_float.loaders import EPOCH_POLICIES, LOADER_KINDS, REF_RULES
from dali_float.loaders.dali_loader import READ_STRATEGIES
from dali_float.training.config import DEVICES, LR_SCHEDULES, PRECISIONS, WANDB_MODES, TrainConfig

D = TrainConfig()  # the defaults, defined once


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="train.py", description=__doc__)
    add_preset_argument(parser)
    add_data_arguments(parser)
    add_model_arguments(parser)

    g = parser.add_argument_group("loader")
    g.add_argument("--loader", choices=LOADER_KINDS, default=D.loader,
                   help="where batches come from: dali (default), torch (both read the cache) or naive "
                        "(decodes and encodes every sample, the baseline)")
    g.add_argument("--ref", choices=REF_RULES, default=D.ref, help=f"reference frame rule (default {D.ref})")
    g.add_argument("--epoch_policy", choices=EPOCH_POLICIES, default=D.epoch_policy,
                   help=f"windows: clips weighted by length; clips: each clip once per epoch (default {D.epoch_policy})")
    g.add_argument("--read_strategy", choices=READ_STRATEGIES, default=D.read_strategy,
                   help="how the DALI loader reads windows: pread (from the shards), resident (each rank holds its "
                        "own part of the clips in GPU memory, host memory on the CPU, for the whole run), python; "
                        "auto: resident on a GPU when it fits, else pread")
    g.add_argument("--resident_reserve_gb", type=float, default=None, metavar="GB",
                   help="resident: memory to leave free besides this rank's clips (default: 16 on a GPU, 4 on the CPU)")
    # --num_workers, torch's DataLoader's own name (it is passed to it); preprocess.py's --workers is accepted too.
    alias(g.add_argument("--num_workers", type=int, default=D.num_workers,
                         help=f"torch/naive loader worker processes (default {D.num_workers})"), "--workers")
    g.add_argument("--num_threads", type=int, default=D.num_threads,
                   help=f"DALI pipeline threads (default {D.num_threads})")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=D.steps, help=f"total optimiser steps of the run (default {D.steps})")
    g.add_argument("--batch_size", type=int, default=D.batch_size,
                   help=f"windows per step and rank (default {D.batch_size})")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 1e-5 for --preset float, as FLOAT reported; 1e-3 for tiny)")
    g.add_argument("--lr_schedule", choices=LR_SCHEDULES, default=D.lr_schedule,
                   help="after warm-up: constant (default) or cosine down to 10%% of --lr at --steps")
    g.add_argument("--warmup_steps", type=int, default=D.warmup_steps,
                   help=f"linear warm-up steps (default {D.warmup_steps})")
    g.add_argument("--ema_decay", type=float, default=D.ema_decay,
                   help="EMA of the weights, e.g. 0.9999 (default 0 = off); the sampler uses it when present")
    g.add_argument("--loss_ot_weight", type=float, default=D.loss_ot_weight, help="weight of L_OT (default 1)")
    g.add_argument("--loss_vel_weight", type=float, default=D.loss_vel_weight, help="weight of L_vel (default 1)")
    g.add_argument("--no_audio", action="store_true",
                   help="ablation: drop the audio (current and previous) for every sample")
    g.add_argument("--mixed_precision", choices=PRECISIONS, default=None,
                   help="fp16 (autocast + GradScaler), bf16 or no (float32); default fp16 on a GPU, no on the CPU")
    g.add_argument("--device", choices=DEVICES, default=D.device, help="auto (default): cuda if present, else cpu")
    g.add_argument("--seed", type=int, default=D.seed, help=f"seed of the model, noise and data order (default {D.seed})")

    g = parser.add_argument_group("output")
    g.add_argument("--output_dir", type=Path, default=D.output_dir, help=f"run folder (default {D.output_dir})")
    g.add_argument("--save_every", type=int, default=D.save_every,
                   help=f"steps between checkpoints; 0 = only at the end (default {D.save_every})")
    g.add_argument("--keep_checkpoints", type=int, default=D.keep_checkpoints,
                   help=f"newest checkpoints kept; 0 = all (default {D.keep_checkpoints})")
    g.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="continue a run with its recorded settings: 'latest' in --output_dir, or a checkpoint file "
                        "or run folder (default: a new run)")
    g.add_argument("--init_from", type=existing_path, default=None, metavar="PATH",
                   help="start a new run from these weights: FLOAT's float.pth (its FMT and audio projection), or a "
                        "run folder or checkpoint of ours (its EMA weights when it kept them); optimiser, schedule "
                        "and step start afresh. Not with --resume (default: the seeded random init)")
    g.add_argument("--log_every", type=int, default=D.log_every,
                   help=f"steps between log lines and metrics.jsonl records (default {D.log_every})")
    g.add_argument("--log_samples", action="store_true",
                   help="write each rank's (clip, window start) per step to <output_dir>/samples_rank<R>.tsv")
    g.add_argument("--sample_every", type=int, default=None, metavar="N",
                   help="every N steps render a 4 s sample video of a fixed clip to <output_dir>/samples/ (and wandb); "
                        "0 = none; default 1000 on a GPU, none on the CPU (where it costs more than a few percent)")
    g.add_argument("--wandb_project", default=None, help="wandb project (default: no wandb)")
    g.add_argument("--wandb_mode", choices=WANDB_MODES, default=None,
                   help="online | offline (no account needed) | disabled; default online with --wandb_project")
    g.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from dali_float.training import train
    from dali_float.training.run_folder import config_from_args

    # With --resume, the flags not given are the run's recorded settings (its config.json).
    return train(config_from_args(vars(args), given_flags(args))).exit_code


if __name__ == "__main__":
    run_main(main)
