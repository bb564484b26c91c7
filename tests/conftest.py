"""Shared test set-up: GPU marker handling, a per-session DALI_FLOAT_HOME, small helpers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    # Files holding slow tests first, each file's tests in their own order: with `-n 2 --dist loadfile`
    # (setup.sh test) both workers start on the long files and the short ones fill in at the end,
    # instead of one long file running alone last.
    slow_files = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.path not in slow_files)  # stable
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def dali_float_home(tmp_path_factory) -> Path:
    """Keep every generated corpus and cache of the test session in one temporary home."""
    home = Path(os.environ.get("DALI_FLOAT_TEST_HOME") or tmp_path_factory.mktemp("dali_float_home"))
    os.environ["DALI_FLOAT_HOME"] = str(home)
    return home
