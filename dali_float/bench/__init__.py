"""Benchmarks: every way this project feeds FLOAT training, measured in one run (`bench/compare.py`).

  probes    measurements that each run in a process of their own (loaders, ceiling, training, decode)
  measure   what the probes measure with (memory, timing) and the pieces they share
  compare   the plan (quick / full, CPU / GPU), running it, the figures, ratios and targets
  machine   the machine the figures come from (CPU, GPU, driver, versions, load)
  report    the markdown tables printed on stdout
  plot      the comparison as a PNG

    from dali_float.bench import BenchOptions, run_benchmark, format_table
    results = run_benchmark(BenchOptions(quick=True))
"""
from __future__ import annotations

import importlib
from typing import Any

# Imported on first use (PEP 562): `python -m dali_float.bench.probes` must not find its own module
# already imported by this package (runpy warns, and the probe would run a second copy).
_LAZY = {"BenchOptions": "compare", "run_benchmark": "compare", "format_table": "report", "plot_results": "plot"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
