"""What a user sees of a run (rank 0 only): a progress bar (dali_float.progress: a tqdm bar on a terminal,
a line now and then in a log file), a log line and a metrics.jsonl record every --log_every steps, the
same numbers in wandb, and a summary at the end.

Data-wait is the wall time the loop spends in `next(batches)`: time the accelerator would sit idle
because the data pipeline is behind. Its fraction is data-wait over the whole step (wait + compute).
Step times are wall times between the loop's per-step sync points (the ranks' agreement in
`Distributed.sum` reads its result on the host), so on a GPU they are the device's time too.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dali_float.atomic import write_atomic
from dali_float.progress import progress_bar, redirect_logging
from dali_float.training.config import TrainConfig

log = logging.getLogger("dali_float.training")


@dataclass
class StepStats:
    """One step as measured on this rank; the losses are the mean over ranks."""

    step: int  # 1-based: the number of steps done after this one
    loss: float
    loss_ot: float
    loss_vel: float
    lr: float
    grad_norm: float
    step_time_s: float  # wall time of the whole step, data-wait included
    data_wait_s: float
    skipped: bool  # non-finite loss or gradient: no update


@dataclass
class _Window:
    """Sums over the steps since the last log record."""

    steps: int = 0
    finite: int = 0
    loss: float = 0.0
    loss_ot: float = 0.0
    loss_vel: float = 0.0
    grad_norm: float = 0.0
    step_time_s: float = 0.0
    data_wait_s: float = 0.0
    skipped: int = 0

    def add(self, s: StepStats) -> None:
        self.steps += 1
        self.step_time_s += s.step_time_s
        self.data_wait_s += s.data_wait_s
        if s.skipped:
            self.skipped += 1
        else:
            self.finite += 1
            self.loss += s.loss
            self.loss_ot += s.loss_ot
            self.loss_vel += s.loss_vel
            self.grad_norm += s.grad_norm


@dataclass
class RunTotals:
    """Whole-run numbers for the summary (this invocation; a resumed run counts from its resume)."""

    skipped: int = 0
    step_time_s: float = 0.0
    data_wait_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait_s / self.step_time_s if self.step_time_s > 0 else 0.0


class Monitor:
    """Progress bar, log lines, metrics.jsonl and wandb for one run. Only rank 0 shows or writes anything."""

    def __init__(self, cfg: TrainConfig, *, is_main: bool, world_size: int, start_step: int,
                 device: torch.device, run_config: dict[str, Any], wandb_id: str | None = None):
        self.cfg, self.is_main, self.device = cfg, is_main, device
        self.samples_per_step = cfg.batch_size * world_size
        self.window = _Window()
        self.last = StepStats(start_step, math.nan, math.nan, math.nan, 0.0, 0.0, 0.0, 0.0, False)
        self._stack = contextlib.ExitStack()
        self.bar = None
        self.wandb = None
        if is_main:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            self.wandb = _start_wandb(cfg, run_config, wandb_id)
            if cfg.progress:
                self._stack.enter_context(redirect_logging())  # log lines above the bar, not through it
                self.bar = self._stack.enter_context(
                    progress_bar(total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train"))
        self.totals = RunTotals()  # the clock starts here: wandb's start-up is not training time

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def step(self, s: StepStats) -> None:
        self.window.add(s)
        self.totals.skipped += int(s.skipped)
        self.totals.step_time_s += s.step_time_s
        self.totals.data_wait_s += s.data_wait_s
        self.last = s
        if self.bar is not None:
            # The postfix first: in a log file the update may write the line that carries it.
            self.bar.set_postfix_str(
                f"loss {s.loss:.4f} | {self.samples_per_step / max(s.step_time_s, 1e-9):.0f} samples/s | "
                f"data-wait {100 * s.data_wait_s / max(s.step_time_s, 1e-9):.0f}%", refresh=False)
            self.bar.update(1)
        if s.step % self.cfg.log_every == 0 or s.step == self.cfg.steps:
            self.flush()

    def flush(self) -> None:
        """Write the log record of the steps since the last one (no-op when there are none)."""
        w = self.window
        if not w.steps:
            return
        self.window = _Window()
        if not self.is_main:
            return
        # Means over the steps that updated the weights; None (JSON null) when every step was skipped.
        mean = (lambda total: total / w.finite) if w.finite else (lambda total: None)
        record = {
            "step": self.last.step, "loss": mean(w.loss), "loss_ot": mean(w.loss_ot), "loss_vel": mean(w.loss_vel),
            "lr": self.last.lr, "grad_norm": mean(w.grad_norm), "step_time_s": w.step_time_s / w.steps,
            "data_wait_s": w.data_wait_s / w.steps,
            "data_wait_fraction": w.data_wait_s / w.step_time_s if w.step_time_s > 0 else 0.0,
            "samples_per_s": self.samples_per_step * w.steps / w.step_time_s if w.step_time_s > 0 else 0.0,
            "skipped_steps": w.skipped, "skipped_total": self.totals.skipped,
            "peak_gpu_mem_mib": (torch.cuda.max_memory_allocated(self.device) / 2**20
                                 if self.device.type == "cuda" else None),
        }
        num = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
        mem = f"{record['peak_gpu_mem_mib']:.0f} MiB" if record["peak_gpu_mem_mib"] is not None else "n/a (CPU)"
        log.info("step %d/%d | loss %s (ot %s, vel %s) | lr %.2e | grad norm %s | step %.1f ms, data-wait "
                 "%.1f ms (%.1f%%) | %.0f samples/s | skipped %d | peak GPU mem %s", record["step"], self.cfg.steps,
                 num(record["loss"], ".4f"), num(record["loss_ot"], ".4f"), num(record["loss_vel"], ".4f"),
                 record["lr"], num(record["grad_norm"], ".3f"), 1e3 * record["step_time_s"],
                 1e3 * record["data_wait_s"], 100 * record["data_wait_fraction"], record["samples_per_s"], w.skipped,
                 mem)
        append_line(self.cfg.metrics_path, json.dumps(record))
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in record.items() if v is not None}, step=record["step"])
            except Exception as err:  # noqa: BLE001 - losing the dashboard must not stop training
                log.warning("wandb: logging failed (%s); continuing without it", err)
                self.wandb = None

    def log_video(self, step: int, path: Path, caption: str = "") -> None:
        """Send an MP4 to wandb as the `sample` video of `step` (when wandb is on)."""
        if self.wandb is None:
            return
        try:
            import wandb

            self.wandb.log({"sample": wandb.Video(str(path), format="mp4", caption=caption)}, step=step)
        except Exception as err:  # noqa: BLE001 - losing the dashboard must not stop training
            log.warning("wandb: logging the sample video failed (%s); continuing without it", err)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self.flush()
        self._stack.close()
        if self.wandb is not None:
            run_dir = Path(self.wandb.dir).parent  # .../wandb/offline-run-<time>-<id>
            with contextlib.suppress(Exception):
                if summary:
                    self.wandb.summary.update(summary)
                self.wandb.finish()
            if self.cfg.resolved_wandb_mode == "offline":
                log.info("wandb: offline run written to %s (upload it with `wandb sync %s`)", run_dir, run_dir)


def append_line(path: Path, line: str) -> None:
    """Append `line` and its newline to `path` with one write (O_APPEND): a kill leaves the file whole
    up to a torn tail of this one line, never a line cut in the middle of the file."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:  # a regular file takes it all at once; a short write (a signal, a full disk) goes on
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after `step` (a resumed run recomputes them; keeps the file one record per step),
    then rewrite the file atomically (a kill during the rewrite leaves the old file).

    A torn last line (the run was killed while appending it) is dropped with a warning. A line that is
    not a record anywhere else is damage that no kill of ours makes (a disk, an editor): it is named and
    dropped, and the resume goes on, because the log is derived from training, never read back by it,
    while the checkpoint, which the resume does need, is intact; stopping would cost the run over a line.
    """
    if not path.exists():
        return
    lines = path.read_bytes().split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the newline that ends the last whole line
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record_step = json.loads(line)["step"]
            if not isinstance(record_step, int):
                raise TypeError(f"step {record_step!r}")
        except (ValueError, TypeError, KeyError) as err:  # UnicodeDecodeError is a ValueError
            if not line.strip():
                continue
            what = f"{line[:80].decode(errors='replace')!r}{'...' if len(line) > 80 else ''}"
            if number == len(lines):
                log.warning("%s: dropped its torn last line %d (a run killed while writing it): %s", path, number,
                            what)
            else:
                log.warning("%s: line %d is not a metrics record (%s: %s), damage a kill does not cause: dropped, "
                            "the resume goes on", path, number, type(err).__name__, what)
            continue
        if record_step <= step:
            kept.append(line + b"\n")
    write_atomic(path, lambda f: f.writelines(kept))


def _start_wandb(cfg: TrainConfig, run_config: dict[str, Any], run_id: str | None) -> Any:
    """A wandb run, or None (disabled, or wandb missing / failing to start: one warning, training goes on)."""
    mode = cfg.resolved_wandb_mode
    if mode == "disabled":
        return None
    try:
        import wandb

        run = wandb.init(project=cfg.wandb_project or "dali-float", mode=mode, dir=str(cfg.output_dir),
                         config=run_config, id=run_id, resume="allow" if run_id else None)
    except Exception as err:  # noqa: BLE001 - import or init failure: warn once, train anyway
        log.warning("wandb could not start (%s: %s); training goes on without it",
                    type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
        return None
    log.info("wandb: %s run %s (project %s)", mode, run.id, cfg.wandb_project or "dali-float")
    return run


class SampleLog:
    """Optional per-rank trace (--log_samples): `step<TAB>clip_id<TAB>window_start` per sample, then the
    final weights' digest; how one checks that ranks read disjoint shards and end as equal replicas."""

    def __init__(self, path: Path | None):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a") if path is not None else None

    def write(self, step: int, clip_ids: list[str], window_starts: torch.Tensor) -> None:
        if self._file is not None:
            starts = window_starts.tolist()  # a device-to-host copy: only when asked for
            self._file.writelines(f"{step}\t{c}\t{s}\n" for c, s in zip(clip_ids, starts))

    def close(self, last_line: str = "") -> None:
        if self._file is not None:
            if last_line:
                self._file.write(last_line + "\n")
            self._file.close()
