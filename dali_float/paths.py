"""Where dali-float keeps generated things by default (demo corpus, feature caches, runs)."""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """$DALI_FLOAT_HOME, else ~/.cache/dali_float."""
    return Path(os.environ.get("DALI_FLOAT_HOME", Path.home() / ".cache" / "dali_float")).expanduser()


def default_cache_dir() -> Path:
    return home() / "features"


def default_output_dir() -> Path:
    return Path("runs") / "latest"
