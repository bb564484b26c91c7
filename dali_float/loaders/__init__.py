"""The three loaders of the batch contract, behind one interface (`WindowLoader`).

  naive  per-sample decode + inference, the community code's way (no cache)      loaders.naive
  torch  cached windows through torch.utils.data (pread, workers, pinned memory)  loaders.torch_loader
  dali   cached windows through a DALI pipeline (no Python per sample)            loaders.dali_loader
         (its resident strategy holds each rank's clips in memory)               loaders.resident

Sampling (what a sample and an epoch are, sharding) is shared: loaders.sampling.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from dali_float.config import Preset
from dali_float.errors import UsageError
from dali_float.loaders.base import LoaderOptions, WindowItem, WindowLoader, batch_from_windows
from dali_float.loaders.cached import TrainingCache
from dali_float.loaders.sampling import EPOCH_POLICIES, REF_RULES, RequestStream, WindowRequest

LOADER_KINDS = ("dali", "torch", "naive")

__all__ = ["EPOCH_POLICIES", "LOADER_KINDS", "LoaderOptions", "REF_RULES", "RequestStream", "TrainingCache",
           "WindowItem", "WindowLoader", "WindowRequest", "batch_from_windows", "open_loader"]


def open_loader(kind: str, preset: Preset, options: LoaderOptions, *, cache: TrainingCache | None = None,
                data_root: Path | None = None, encoders=None, crop: str = "face",
                segments: Path | None = None, agree: Callable[[bool], bool] | None = None) -> WindowLoader:
    """The loader `kind`: `dali`/`torch` read `cache`; `naive` reads `data_root` (its videos, or the clips
    of `segments`) with `encoders`, framing them by `crop` as preprocessing does. agree (dali, under
    torchrun): whether a statement holds on every rank, for the ranks to choose one read strategy."""
    if kind == "dali":
        from dali_float.loaders.dali_loader import DaliWindowLoader

        return DaliWindowLoader(_need(cache, kind), options, agree=agree)
    if kind == "torch":
        from dali_float.loaders.torch_loader import TorchWindowLoader

        return TorchWindowLoader(_need(cache, kind), options)
    if kind == "naive":
        from dali_float.loaders.naive import NaiveWindowLoader

        if data_root is None or encoders is None:
            raise ValueError("the naive loader needs data_root and encoders")
        return NaiveWindowLoader(data_root, preset, encoders, options, crop=crop, segments=segments)
    raise UsageError(f"--loader {kind!r} is not one of {', '.join(LOADER_KINDS)}")


def _need(cache: TrainingCache | None, kind: str) -> TrainingCache:
    if cache is None:
        raise ValueError(f"the {kind} loader reads a feature cache: pass cache=TrainingCache.open(...)")
    return cache
