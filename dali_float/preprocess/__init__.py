"""Preprocessing: source videos -> the feature cache, every model run once per clip.

  options  what a run is asked (PreprocessOptions), what it reports (PreprocessResult), the fingerprint
  plan     sources vs entries on disk (up to date / pending / gone), stable uids, the ranks' balanced shares,
           the queue a rank's workers take clips from (longest video first)
  worker   one clip -> features -> entry (ClipProcessor), and the spawned worker process
  run      run_preprocessing: recover, plan, run workers (or torchrun ranks), merge, training view, summary
  manage   status / plan (a dry run) / show / verify [--repair] / compact / migrate / clear

    from dali_float.preprocess import PreprocessOptions, run_preprocessing
    result = run_preprocessing(PreprocessOptions(data_root, cache_dir, preset, sources))
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dali_float.preprocess.manage import (cache_status, clear_cache, compact_cache, format_clip, format_plan,
                                          format_status, migrate_cache, plan_run, show_clip, verify_cache)
from dali_float.preprocess.options import (PreprocessOptions, PreprocessResult, cache_fingerprint, default_cache_dir,
                                           default_data_root)

if TYPE_CHECKING:
    from dali_float.preprocess.run import run_preprocessing


def __getattr__(name: str) -> Any:
    # run (and its workers) import torch; status, plan, show and verify do not need it (PEP 562).
    if name == "run_preprocessing":
        from dali_float.preprocess.run import run_preprocessing

        return run_preprocessing
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["PreprocessOptions", "PreprocessResult", "cache_fingerprint", "cache_status", "clear_cache", "compact_cache",
           "default_cache_dir", "default_data_root", "format_clip", "format_plan", "format_status", "migrate_cache",
           "plan_run", "run_preprocessing", "show_clip", "verify_cache"]
