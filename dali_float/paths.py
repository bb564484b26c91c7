"""Where dali-float keeps generated things by default (demo corpus, feature caches, runs)."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

DEMO_VERSION = 1  # of the demo corpus dali_float.demo writes: each version in a folder of its own


def home() -> Path:
    """$DALI_FLOAT_HOME, else ~/.cache/dali_float."""
    return Path(os.environ.get("DALI_FLOAT_HOME", Path.home() / ".cache" / "dali_float")).expanduser()


def demo_corpus_dir() -> Path:
    """Where the demo corpus of this version lives: <home>/demo/v<DEMO_VERSION>."""
    return home() / "demo" / f"v{DEMO_VERSION}"


def default_cache_dir(data_root: Path | None = None) -> Path:
    """The feature caches of one corpus: $DALI_FLOAT_HOME/features/<folder name>-<hash of its path>.

    One folder per data root, so the caches of two corpora never meet (None: the demo corpus).
    """
    if data_root is None:
        data_root = demo_corpus_dir()
    resolved = Path(data_root).expanduser().resolve()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", resolved.name)[-40:] or "root"
    return home() / "features" / f"{slug}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"


def default_output_dir() -> Path:
    return Path("runs") / "latest"


def printable(name: str) -> str:
    """A file name or clip id as text any terminal takes: bytes that are not UTF-8 (surrogate escapes, as
    os.fsdecode gives them) shown as \\xNN, everything else as it is."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
