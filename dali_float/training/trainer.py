"""The training loop: FLOAT's flow-matching transformer on cached windows, fp16 with DDP when asked.

    python train.py --loader dali --preset tiny --steps 200                 # demo corpus, CPU or one GPU
    torchrun --nproc_per_node 8 train.py --preset float --motion_ckpt float.pth \\
        --wav2vec2_path wav2vec2-base-960h --emotion_path wav2vec-emotion --data_root /data/HDTF
    python train.py ... --resume latest                                    # continue as if never stopped

It reads in the order it runs: the process (rank, device, precision), the data (preprocess if
needed, this rank's loader), the model and its optimiser state (fresh or resumed), one loop, teardown.
The loop never asks which loader made a batch: every loader returns the same `Batch`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from dali_float import __version__
from dali_float.cli import cores_per_local_rank
from dali_float.config import Preset, get_preset
from dali_float.errors import DaliFloatError, UsageError
from dali_float.models import FloatMotionModel
from dali_float.training.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointStore, capture_rng,
                                            check_fingerprint, check_resumable, load_checkpoint, resolve_resume,
                                            restore_rng)
from dali_float.training.config import TrainConfig
from dali_float.training.data import DataSource, check_data_arguments, open_training_loader, prepare_data
from dali_float.training.distributed import Distributed, StopSignal
from dali_float.training.initial import log_initial_weights, read_initial_weights
from dali_float.training.monitor import Monitor, SampleLog, StepStats, truncate_metrics
from dali_float.training.objective import ConditionDropout, flow_matching_loss
from dali_float.training.optim import EMA, LRSchedule, build_optimizer, trainable_parameters
from dali_float.training.precision import resolve_precision
from dali_float.training.run_folder import RunFolderOwner, check_settings, write_config
from dali_float.training.samples import SampleVideos

log = logging.getLogger("dali_float.training")

# A loss that stays non-finite this many steps in a row is not a passing overflow: stop (saved).
MAX_NONFINITE_STREAK = 20


@dataclass
class TrainResult:
    """How a run ended (as this rank saw it: only rank 0 has a checkpoint path)."""

    step: int  # steps done, counted from the start of the run (resumes included)
    checkpoint: Path | None  # the last checkpoint written (rank 0), None on other ranks
    interrupted: bool  # stopped by SIGINT / SIGTERM after saving
    skipped_steps: int  # steps without an update (non-finite loss or gradient), this invocation
    data_wait_fraction: float  # data-wait over step time, this invocation, rank 0's view
    elapsed_s: float
    steps_per_s: float
    weights_digest: str  # SHA-256 of the final model state (equal on every rank under DDP)
    sample_video_seconds: list[float]  # wall time of each sample video (rank 0; the first includes its set-up)
    stopped_by: str = ""  # the signal that interrupted the run ("SIGINT", "SIGTERM", or one on another rank)

    @property
    def exit_code(self) -> int:
        """0 done; interrupted: 128 + the signal's number, as a shell reports it (130 SIGINT, 143 SIGTERM)."""
        if not self.interrupted:
            return 0
        return 143 if self.stopped_by == "SIGTERM" else 130


def train(cfg: TrainConfig, source: DataSource | None = None) -> TrainResult:
    """Run training as `cfg` says. `source`: an already opened data source (tests); None: prepare_data."""
    dist = Distributed.start(cfg.device)
    with contextlib.ExitStack() as held:  # the run folder's lock, taken in _train
        try:
            return _train(cfg, dist, source, held)
        finally:
            dist.close()


def _train(cfg: TrainConfig, dist: Distributed, source: DataSource | None, held: contextlib.ExitStack) -> TrainResult:
    # -------------------------------------------------------------------------------- the process
    preset = get_preset(cfg.preset)
    device = dist.device
    precision = resolve_precision(cfg.mixed_precision, device)
    if device.type == "cpu":
        _share_cores_with_the_loader(cfg)
    random.seed(cfg.seed + dist.rank)
    np.random.seed(cfg.seed + dist.rank)
    torch.manual_seed(cfg.seed + dist.rank)
    store = CheckpointStore(cfg.checkpoint_dir, cfg.keep_checkpoints)
    resumed = _read_resume(cfg, store, preset, dist.world_size)  # before any slow work: bad paths fail fast
    initial = read_initial_weights(cfg.init_from, preset) if cfg.init_from is not None else None  # (the same)
    if source is None:
        check_data_arguments(cfg)
    if dist.is_main:  # every argument checked: now the run folder is made (and held), or refused at once
        held.callback(RunFolderOwner(cfg.output_dir).release)
        if resumed is None and store.latest() is not None:
            raise UsageError(f"{cfg.output_dir} already holds a run (checkpoint {store.latest().name}): continue "
                             f"it with --resume latest, or start a new one with another --output_dir")
        write_config(cfg, {"resolved_device": str(device), "resolved_mixed_precision": precision.name})

    # -------------------------------------------------------------------------------- the data
    source = source or prepare_data(cfg, preset, dist)
    loader = open_training_loader(cfg, preset, source, dist)
    try:
        # ---------------------------------------------------------------- model and optimiser state
        model = FloatMotionModel(preset, seed=cfg.seed).to(device)  # float32 weights in every precision
        if initial is not None:
            initial.apply(model)  # before the EMA and the optimiser are made from its weights
        init_record = initial.record() if initial is not None else None
        params = trainable_parameters(model)
        optimizer = build_optimizer(model, cfg.resolved_lr, cfg.weight_decay)
        schedule = LRSchedule(cfg.resolved_lr, cfg.warmup_steps, cfg.lr_schedule, cfg.steps)
        scaler = precision.grad_scaler()
        ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        # t, noise and dropout come from this generator alone: the loader's randomness is its own.
        generator = torch.Generator(device).manual_seed(cfg.seed * 65_537 + dist.rank)
        dropout = ConditionDropout.without_audio() if cfg.no_audio else ConditionDropout()

        step, wandb_id = 0, None
        if resumed is not None:
            path, ckpt = resumed
            check_fingerprint(ckpt, path, source.fingerprint)
            step, wandb_id = ckpt["step"], ckpt.get("wandb_id")
            init_record = ckpt["config"].get("init")  # how the run started stays in its record
            if step >= cfg.steps:
                raise UsageError(f"{path} is at step {step} and --steps is {cfg.steps}: nothing to train; "
                                 f"raise --steps")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt["scaler"] and scaler.is_enabled():
                scaler.load_state_dict(ckpt["scaler"])
            schedule.check_resumed(ckpt["scheduler"])
            _restore_ema(ema, ckpt["ema"])
            mine = ckpt["ranks"][dist.rank]
            restore_rng(mine["rng"], generator)
            loader.load_state_dict(mine["loader"])
            log.info("resumed from %s at step %d", path, step)
        if dist.is_main:
            truncate_metrics(cfg.metrics_path, step)  # records past the checkpoint are recomputed
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
            if dist.enabled else model

        run_config = _run_config(cfg, preset, source, dist, precision.name, init_record)
        if dist.is_main:
            log.info("training %s (%d trainable parameters) with the %s loader on %s x %d, precision %s; data: %s",
                     preset.name, sum(p.numel() for p in params), cfg.loader, device, dist.world_size,
                     precision.description, source.describe())
            if resumed is None:
                log_initial_weights(initial, cfg.seed, cfg.warmup_steps, ema is not None, cfg.motion_ckpt)
        initial = None  # its tensors are in the model now (0.65 GB per rank at float sizes)

        # ------------------------------------------------------------------------------ the loop
        samples = SampleLog(Path(cfg.output_dir) / f"samples_rank{dist.rank}.tsv" if cfg.log_samples else None)
        monitor = Monitor(cfg, is_main=dist.is_main, world_size=dist.world_size, start_step=step, device=device,
                          run_config=run_config, wandb_id=wandb_id)
        videos = SampleVideos.start(cfg, preset, source, device, dist.is_main)

        def save_checkpoint(at_step: int) -> Path | None:
            """Collective: every rank hands in its loader and RNG state; rank 0 writes."""
            ranks = dist.gather({"rng": capture_rng(generator), "loader": loader.state_dict()})
            if not dist.is_main:
                return None
            return store.save({
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": at_step,
                "model": model.state_dict(), "ema": ema.state_dict() if ema else None,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "scheduler": schedule.state_dict(), "ranks": ranks, "config": run_config,
                "preset": {"name": preset.name, "digest": preset.digest()}, "fingerprint": source.fingerprint,
                "wandb_id": monitor.wandb_id,
            }, at_step)

        checkpoint, stopped_by, bad_streak, start_step = None, "", 0, step
        batches = iter(loader)
        try:
            with StopSignal() as stop:
                while step < cfg.steps:
                    t0 = time.perf_counter()
                    batch = next(batches)  # the loader prefetches: this waits only when it is behind
                    data_wait = time.perf_counter() - t0
                    samples.write(step + 1, batch.clip_id, batch.window_start)

                    lr = schedule(step)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    terms = flow_matching_loss(ddp, batch, generator, precision, dropout=dropout,
                                               ot_weight=cfg.loss_ot_weight, vel_weight=cfg.loss_vel_weight)
                    scaler.scale(terms.loss).backward()
                    scaler.unscale_(optimizer)  # true gradients for clipping and the norm (no-op without fp16)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)

                    # The step's one sync point and collective: losses averaged over ranks, and the ranks
                    # decide together whether to update (all finite) and whether to stop (a signal anywhere).
                    loss_bad = ~torch.isfinite(terms.loss.detach())
                    grad_bad = ~torch.isfinite(grad_norm)
                    loss, loss_ot, loss_vel, grad_norm, n_loss_bad, n_grad_bad, n_stop = dist.sum(
                        [terms.loss, terms.loss_ot, terms.loss_vel, grad_norm, loss_bad, grad_bad, stop.requested])
                    skipped = n_loss_bad + n_grad_bad > 0
                    if not skipped:
                        scaler.step(optimizer)
                        if ema is not None:
                            ema.update(model)
                    scaler.update()  # fp16: lowers the scale after an overflow, raises it after a quiet spell
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    bad_streak = bad_streak + 1 if n_loss_bad else 0

                    n = dist.world_size
                    monitor.step(StepStats(step, loss / n, loss_ot / n, loss_vel / n, lr, grad_norm / n,
                                           time.perf_counter() - t0, data_wait, skipped))
                    if n_stop:
                        stopped_by = stop.signal_name or "a signal on another rank"
                    diverged = bad_streak >= MAX_NONFINITE_STREAK
                    if stopped_by or diverged or step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
                        checkpoint = save_checkpoint(step) or checkpoint
                        if dist.is_main:
                            log.info("checkpoint: %s", checkpoint)
                    if videos is not None and not diverged:
                        videos.maybe_render(step, model, ema, monitor)  # rank 0 only; the others wait at the next step
                    if diverged:
                        raise DaliFloatError(f"the loss was non-finite for {bad_streak} steps in a row (up to step "
                                             f"{step}); no update was made from them. The last good weights are in "
                                             f"{checkpoint or cfg.checkpoint_dir}: lower --lr or check the data")
                    if stopped_by:
                        break
        finally:
            digest = weights_digest(model)
            samples.close(f"# weights sha256 {digest}")
            summary = _summary(monitor, step, start_step, checkpoint, videos)
            monitor.close(summary)
    finally:
        loader.close()

    if dist.is_main:
        log.info("done: steps %d-%d in %.1f s (%.2f steps/s, %.0f samples/s); data-wait %.1f%% of the step time; "
                 "%d step(s) skipped (non-finite); checkpoint %s", start_step + 1, step, summary["elapsed_s"],
                 summary["steps_per_s"], summary["samples_per_s"], 100 * summary["data_wait_fraction"],
                 summary["skipped_steps"], checkpoint)
        if summary["sample_video_seconds"]:
            log.info("sample videos took %.1f s in all (%.1f%% of the run)", summary["sample_video_seconds"],
                     100 * summary["sample_video_seconds"] / max(summary["elapsed_s"], 1e-9))
        if stopped_by:
            log.warning("interrupted by %s at step %d: checkpoint saved; continue with --resume latest "
                        "--output_dir %s", stopped_by, step, cfg.output_dir)
    return TrainResult(step=step, checkpoint=checkpoint, interrupted=bool(stopped_by),
                       skipped_steps=summary["skipped_steps"], data_wait_fraction=summary["data_wait_fraction"],
                       elapsed_s=summary["elapsed_s"], steps_per_s=summary["steps_per_s"], weights_digest=digest,
                       sample_video_seconds=list(videos.times) if videos is not None else [], stopped_by=stopped_by)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the model's state (names, dtypes and bytes, in state-dict order)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _share_cores_with_the_loader(cfg: TrainConfig) -> None:
    """Leave the loader's threads (dali) or worker processes (torch, naive), and the Python thread that
    drives them, cores of their own.

    torch's compute threads busy-wait: oversubscribed, tiny training on 2 cores ran at 1-4 steps/s
    instead of 31-35. OMP_NUM_THREADS, when set, is the user's choice and is kept.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    loader_cores = cfg.num_threads if cfg.loader == "dali" else cfg.num_workers
    cores = cores_per_local_rank()
    threads = max(1, cores - loader_cores - 1)
    torch.set_num_threads(threads)
    log.info("%d torch thread(s) on the CPU (%d core(s) per rank, %d for the %s loader; set OMP_NUM_THREADS to "
             "choose)", threads, cores, loader_cores, cfg.loader)


def _read_resume(cfg: TrainConfig, store: CheckpointStore, preset: Preset, world_size: int) -> tuple[Path, dict] | None:
    """The checkpoint to resume from (checked for preset, world size and the run's settings), or None for a
    fresh run (a folder that already holds one is refused under its lock, in _train)."""
    if cfg.resume is None:
        return None
    path = resolve_resume(cfg.resume, store)
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, path, preset, world_size)
    check_settings(cfg, ckpt["config"], str(path))
    return path, ckpt


def _restore_ema(ema: EMA | None, saved: dict[str, Any] | None) -> None:
    if ema is not None and saved:
        ema.load_state_dict(saved)
    elif ema is not None:
        log.warning("the checkpoint has no EMA: the EMA starts from the resumed weights")
    elif saved:
        log.warning("--ema_decay 0: the checkpoint's EMA is not continued (its weights stay in the old checkpoint)")


def _versions() -> dict[str, str]:
    out = {"dali_float": __version__, "torch": str(torch.__version__)}  # TorchVersion is not weights_only-safe
    for name, dist_name in (("dali", "nvidia-dali-cuda120"), ("transformers", "transformers")):
        try:
            out[name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _run_config(cfg: TrainConfig, preset: Preset, source: DataSource, dist: Distributed, precision: str,
                init_record: dict[str, Any] | None) -> dict[str, Any]:
    """The resolved configuration: saved in every checkpoint and sent to wandb. `init`: where the run's
    weights started (training.initial; None: the seeded random init)."""
    return {**cfg.to_dict(), "init": init_record, "fingerprint": source.fingerprint, "preset_digest": preset.digest(),
            "cache_root": str(source.cache.root) if source.cache is not None else None,
            "resolved_mixed_precision": precision, "resolved_device": str(dist.device),
            "world_size": dist.world_size, "versions": _versions()}


def _summary(monitor: Monitor, step: int, start_step: int, checkpoint: Path | None,
             videos: SampleVideos | None) -> dict[str, Any]:
    totals = monitor.totals
    elapsed = time.perf_counter() - totals.started
    done = step - start_step
    return {"final_step": step, "elapsed_s": elapsed, "steps_per_s": done / elapsed if elapsed > 0 else 0.0,
            "samples_per_s": done * monitor.samples_per_step / elapsed if elapsed > 0 else 0.0,
            "data_wait_fraction": totals.data_wait_fraction, "skipped_steps": totals.skipped,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "sample_video_seconds": sum(videos.times) if videos is not None else 0.0}
