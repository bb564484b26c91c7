"""Sample videos during training (`--sample_every N`, rank 0): what the motion model has learned, as a talking head.

Every N steps the current weights (the EMA when the run keeps one) generate the motion of a fixed clip
of the data set and FLOAT's motion decoder draws it: the first SAMPLE_SECONDS of the first cached clip
(sorted by id), its cached audio features, emotion, identity and first frame (with its cached crop),
and the same noise every time (the run's seed), so two samples differ only by what was learned. Written
to `<output_dir>/samples/step_XXXXXXXX.mp4` (the checkpoints' 8 digits) with the clip's sound, and sent to wandb as a video when
wandb is on. The decoder's weights are `motion_autoencoder.dec.*` of the run's --motion_ckpt (float.pth),
a random init otherwise (said loudly: the frames are then not a face).

The set-up (decoder, motion encoder, the reference's features) happens at the first sample; its time
and every sample's are logged with their share of the training time since the previous sample.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from dali_float.config import Preset
from dali_float.errors import DaliFloatError, UsageError
from dali_float.models import FloatMotionModel, build_decoder, build_motion_encoder
from dali_float.training.checkpoint import step_name
from dali_float.training.config import TrainConfig
from dali_float.training.data import DataSource
from dali_float.training.optim import EMA, with_ema_weights

log = logging.getLogger("dali_float.training")

SAMPLE_SECONDS = 4.0  # length of a sample video: two 50-frame chunks, so the continuation shows


def default_sample_every(device: torch.device) -> int:
    """--sample_every when not given: every 1000 steps on a GPU; off on the CPU, where it costs more than
    a few percent (docs/BENCHMARKS.md, "Rendering"; 2 busy cores): with `tiny` a sample takes ~15 training
    steps and the first one ~52 with its set-up, 5 % of the default 1000-step run; with `float` the
    decoder draws ~0.2 frames/s end to end, ~8 minutes for one 4 s sample."""
    return 1000 if device.type == "cuda" else 0


class SampleVideos:
    """Renders the run's sample videos; `maybe_render(step, ...)` after every optimiser step (rank 0)."""

    def __init__(self, cfg: TrainConfig, preset: Preset, source: DataSource, device: torch.device, every: int):
        self.cfg, self.preset, self.source, self.device, self.every = cfg, preset, source, device, every
        self.folder = Path(cfg.output_dir) / "samples"
        self.times: list[float] = []  # wall time of each sample (s), the first one's set-up included
        self._renderer = None
        self._reference = self._speech = None
        self._last_time = time.perf_counter()

    @classmethod
    def start(cls, cfg: TrainConfig, preset: Preset, source: DataSource, device: torch.device,
              is_main: bool) -> SampleVideos | None:
        """The sampler of this run, or None: not rank 0, off (0), or (default setting) no cache to sample from."""
        every = cfg.sample_every if cfg.sample_every is not None else default_sample_every(device)
        if not is_main or every == 0:
            return None
        if source.cache is None:
            if cfg.sample_every is None:
                log.info("no sample videos with --loader naive (they are rendered from the feature cache)")
                return None
            raise UsageError("--sample_every renders from the feature cache, which --loader naive does not use: "
                             "train with --loader dali or torch, or drop --sample_every")
        log.info("sample videos every %d steps into %s", every, Path(cfg.output_dir) / "samples")
        return cls(cfg, preset, source, device, every)

    def maybe_render(self, step: int, model: FloatMotionModel, ema: EMA | None, monitor) -> Path | None:
        """Render the sample of `step` when it is due; a failure is logged once and stops the samples."""
        if self.every == 0 or step % self.every:
            return None
        since = time.perf_counter() - self._last_time
        start = time.perf_counter()
        try:
            path = self._render(step, model, ema)
        except DaliFloatError as err:  # e.g. the clip's source video is gone: training goes on
            log.warning("no more sample videos: %s", err)
            self.every = 0
            return None
        spent = time.perf_counter() - start
        self.times.append(spent)
        self._last_time = time.perf_counter()
        log.info("sample video %s in %.1f s (%.1f%% of the %.0f s since the last one)", path, spent,
                 100 * spent / max(since, 1e-9), since)
        monitor.log_video(step, path, caption=f"step {step}: {self._reference.description}")
        return path

    def _render(self, step: int, model: FloatMotionModel, ema: EMA | None) -> Path:
        from dali_float import render
        from dali_float.sampler import read_clip

        if self._renderer is None:  # first sample: the decoder, the fixed reference and speech
            sampling = FloatMotionModel(self.preset).to(self.device).eval().requires_grad_(False)
            self._renderer = render.Renderer(sampling, build_decoder(self.preset, self.cfg.motion_ckpt, self.device))
            clip = read_clip(self.source.cache, self.source.cache.clip_id(0))
            encoder = build_motion_encoder(self.preset, self.cfg.motion_ckpt, self.device)
            self._reference = render.reference_from_clip(clip, encoder, self.preset, self.device)
            frames = int(SAMPLE_SECONDS * self.preset.timing.fps)
            self._speech = render.speech_from_clip(clip, frames, self.device, self.preset.timing.fps)
        weights = with_ema_weights(model.state_dict(), ema.state_dict() if ema is not None else None)
        self._renderer.model.load_state_dict(weights)
        out = self.folder / step_name(step, ".mp4")
        self._renderer.render(self._reference, self._speech, out, seed=self.cfg.seed, progress=False)
        return out
