"""Where the trainer's batches come from: the feature cache (made or refreshed first) or, for `naive`, the videos.

`prepare_data` runs preprocessing for the cached loaders on every start: it is the one authority on
what is up to date (new, changed or damaged clips, other weights) and a quick no-op ("N up to date")
when nothing changed. Under torchrun every rank calls it: `run_preprocessing` is rank-aware (rank 0
recovers and plans, the ranks split the pending clips, all meet at its barriers), so no rank opens
the cache before it is complete. `open_training_loader` then gives this rank its shard.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from dali_float.cache import format as cf
from dali_float.config import Preset
from dali_float.errors import UsageError
from dali_float.loaders import LoaderOptions, TrainingCache, WindowLoader, open_loader
from dali_float.models import Encoders, build_encoders
from dali_float.training.config import TrainConfig
from dali_float.training.distributed import Distributed

log = logging.getLogger(__name__)


@dataclass
class DataSource:
    """What a loader reads: a cache (dali, torch) or a data root with encoders (naive); and the features'
    fingerprint (preset + encoder weights), which every checkpoint records."""

    fingerprint: str
    cache: TrainingCache | None = None
    data_root: Path | None = None
    encoders: Encoders | None = None
    crop: str = "face"  # naive: how it frames the videos (the cache's framing is in its fingerprint)
    segments: Path | None = None  # naive: the clip segments, as preprocessing reads them

    @classmethod
    def from_cache(cls, cache: TrainingCache) -> DataSource:
        return cls(fingerprint=cache.fingerprint, cache=cache)

    def describe(self) -> str:
        return str(self.cache.root) if self.cache is not None else f"{self.data_root} (no cache: naive loader)"


def preprocess_command(cfg: TrainConfig) -> str:
    """The preprocess.py command for this run's data and weights (named in cache errors)."""
    from dali_float.preprocess.options import preprocess_command as command

    return command(cfg.data_root, cfg.resolved_cache_dir, cfg.preset, cfg.resolved_crop, cfg.segments, cfg.sources)


def check_data_arguments(cfg: TrainConfig) -> None:
    """UsageError (one line) for a data root, segments file or weights flag that cannot be used: checked before
    the run folder or a cache folder is made. A data root may be one video file (a corpus of one clip), as
    for preprocess.py."""
    from dali_float.preprocess.options import check_sources

    if cfg.data_root is not None and not Path(cfg.data_root).exists():
        raise UsageError(f"--data_root {cfg.data_root} does not exist")
    check_sources(cfg.sources)


def prepare_data(cfg: TrainConfig, preset: Preset, dist: Distributed) -> DataSource:
    """The data source for `cfg.loader`; preprocesses first (all ranks together) for the cached loaders."""
    from dali_float import preprocess as pp

    sources = cfg.sources
    check_data_arguments(cfg)
    data_root = Path(cfg.data_root) if cfg.data_root is not None else pp.default_data_root()
    if cfg.loader == "naive":
        if cfg.force_preprocess:
            log.info("--force_preprocess: the naive loader reads no cache; nothing to preprocess")
        return DataSource(fingerprint=pp.cache_fingerprint(preset, sources, cfg.resolved_crop), data_root=data_root,
                          encoders=build_encoders(preset, sources, dist.device), crop=cfg.resolved_crop,
                          segments=cfg.segments)
    options = pp.PreprocessOptions(
        data_root=data_root, cache_dir=cfg.resolved_cache_dir, preset=preset, sources=sources,
        crop=cfg.resolved_crop, segments=cfg.segments,
        force=cfg.force_preprocess, device=str(dist.device), progress=cfg.progress and dist.is_main,
        # A trainer never drops features (a half-mounted data root), and trains from a read-only cache as it is.
        drop_gone=False, read_only_ok=True, lock_timeout_s=cfg.lock_timeout_s)
    result = pp.run_preprocessing(options)
    if result.exit_code and dist.is_main:
        log.warning("%d clip(s) could not be preprocessed (listed above); training on the %d cached one(s)",
                    len(result.failures), result.counts.get(cf.STATUS_CACHED, 0))
    cache = TrainingCache.open(cfg.resolved_cache_dir, preset, result.fingerprint,
                               preprocess_command=preprocess_command(cfg))
    return DataSource.from_cache(cache)


def open_training_loader(cfg: TrainConfig, preset: Preset, source: DataSource, dist: Distributed) -> WindowLoader:
    """This rank's loader (its shard of every epoch). A batch larger than an epoch (a few short clips) takes
    several epochs in a row, so its clips repeat (each appearance with its own window): sampling with
    replacement, said in one warning line; every loader streams epochs end to end (loaders.sampling)."""
    options = LoaderOptions(
        batch_size=cfg.batch_size, seed=cfg.seed, ref_rule=cfg.ref, epoch_policy=cfg.epoch_policy,
        device=str(dist.device), shard_id=dist.rank, num_shards=dist.world_size, num_workers=cfg.num_workers,
        num_threads=cfg.num_threads, read_strategy=cfg.read_strategy, resident_reserve_gb=cfg.resident_reserve_gb,
        progress=cfg.progress and dist.is_main)

    def on_every_rank(holds: bool) -> bool:
        """Whether `holds` is true on every rank (a collective: the ranks pick one read strategy)."""
        return dist.sum([0.0 if holds else 1.0])[0] == 0

    loader = open_loader(cfg.loader, preset, options, cache=source.cache, data_root=source.data_root,
                         encoders=source.encoders, crop=source.crop, segments=source.segments,
                         agree=on_every_rank if dist.enabled else None)
    if cfg.batch_size > loader.samples_per_epoch and dist.is_main:
        log.warning("--batch_size %d is larger than the data: an epoch holds %d sample(s) per rank (%d rank(s), "
                    "--epoch_policy %s), so each batch spans %d epochs and its clips repeat (sampling with "
                    "replacement, each time with its own window); add clips to see more of your data per step",
                    cfg.batch_size, loader.samples_per_epoch, dist.world_size, cfg.epoch_policy,
                    -(-cfg.batch_size // loader.samples_per_epoch))
    return loader
