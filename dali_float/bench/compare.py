"""`bench/compare.py`: every way this project feeds FLOAT training, measured in one run on one machine.

    results = run_benchmark(BenchOptions(preset="tiny", quick=True))
    print(format_table(results))            # dali_float.bench.report

Order of a run: settings (quick or full, CPU or GPU) and the expected time, logged up front; the
cache (preprocessed with progress bars when it is not up to date); the page cache warmed; then one
subprocess per measurement (`probes.run_probe`): the copy ceilings, every loader configuration, a
short training run per loader (with the best configuration of each), the decode paths and audio,
the same frames as long and short clips (the clip-length probe), rendering (the motion decoder alone
and end to end from speech, both presets; what --sample_every costs in training); finally the cache's size against decoded frames, the ratios and the targets. Every figure goes into
one JSON-ready dict (see docs/BENCHMARKS.md for its keys).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from dali_float.cache import format as cf
from dali_float import paths
from dali_float.bench import probes
from dali_float.bench.figures import assemble, targets
from dali_float.bench.machine import load_average, machine_info
from dali_float.bench.plan import (LOADERS, BenchOptions, Job, best_job, clip_length_jobs, loader_jobs, make_settings,
                                   preprocess_jobs, render_jobs, resolve_device, sources_spec, train_jobs)
from dali_float.config import get_preset
from dali_float.errors import DaliFloatError, UsageError
from dali_float.progress import progress_bar, redirect_logging

log = logging.getLogger(__name__)

__all__ = ["BenchOptions", "run_benchmark"]


def _prepare(options: BenchOptions, preset: str, device: str, cache_dir: Path) -> dict[str, Any]:
    """The cache of `preset` up to date (preprocessing with progress bars when it is not)."""
    spec = {"probe": "prepare", "preset": preset, "sources": sources_spec(options.sources),
            "cache_dir": str(cache_dir), "device": device, "progress": options.progress,
            "data_root": str(options.data_root) if options.data_root else None, "crop": options.resolved_crop,
            "segments": str(options.segments) if options.segments else None}
    log.info("checking the %s feature cache in %s (the first run preprocesses the corpus)", preset, cache_dir)
    result = probes.run_probe(spec, show_stderr=True)
    if "error" in result:
        error = UsageError if result.get("exit_code") == UsageError.exit_code else DaliFloatError
        raise error(f"preparing the {preset} feature cache failed ({result['error']})")
    if not result["counts"].get("cached"):
        raise UsageError(f"no clip under {result['data_root']} could be preprocessed for {preset}")
    return result


def _framing_root(options: BenchOptions, settings) -> str | None:
    """Where --crop face is measured against --crop center: the user's videos, or (for the demo corpus,
    whose drawn heads are already framed) the raw-video corpus of real faces (written once)."""
    if not settings.preprocess_run:
        return None
    if options.data_root is not None:
        return str(options.data_root)
    from dali_float.faces_corpus import ensure_faces_corpus

    return str(ensure_faces_corpus())


def _clip_length_corpus(settings) -> Path:
    """The clip-length probe's corpus of this plan (quick or full), written once (bench/clip_lengths.py)."""
    from dali_float.bench.clip_lengths import FULL_PLAN, QUICK_PLAN, ensure_corpus

    return ensure_corpus(QUICK_PLAN if settings.quick else FULL_PLAN)


def warm_page_cache(cache_root: Path) -> int:
    """Read every shard once, so loaders and ceiling all read from memory; returns the bytes read."""
    total = 0
    for path in cf.CacheLayout(Path(cache_root)).shard_files():
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
    return total


def _run_jobs(jobs: list[Job], progress: bool, desc: str) -> None:
    """Run each job's probe in its own process, one after the other (a progress bar over the jobs)."""
    with redirect_logging():
        bar = progress_bar(jobs, desc=desc, unit="probe", disable=not progress, dynamic_ncols=True)
        for job in bar:
            bar.set_postfix_str(f"{job.name}: {job.label}", refresh=True)
            t0 = time.perf_counter()
            job.result = probes.run_probe(job.spec, timeout_s=max(600.0, 20 * job.expected_s))
            job.result["probe_seconds"] = time.perf_counter() - t0
            job.result["load_average_after"] = load_average()  # a busy shared machine shows here
            if not job.ok:
                log.error("%s %s (%s) failed: %s", job.section, job.name, job.label, job.result.get("error"))


def run_benchmark(options: BenchOptions) -> dict[str, Any]:
    """Measure everything (see the module docstring); returns the results dict written as JSON."""
    started = time.perf_counter()
    device = resolve_device(options.device)
    settings = make_settings(options, device)
    preset = get_preset(settings.preset)
    cache_dir = Path(options.cache_dir) if options.cache_dir else paths.default_cache_dir(options.data_root)
    machine = machine_info()
    log.info("machine: %s (%d usable cores)%s; load average %s", machine["cpu_model"], machine["usable_cores"],
             f", GPU {machine['gpu']['name']}" if machine["gpu"] else ", no GPU", machine["load_average_start"])
    load = machine["load_average_start"]
    if load and load[0] > 0.5 * machine["usable_cores"]:
        log.warning("the machine is busy (load average %.1f on %d cores): CPU figures will be lower and noisier "
                    "than on a quiet machine (recorded in the JSON)", load[0], machine["usable_cores"])
    if options.clip_lengths_only:
        return _clip_lengths_only(options, settings, machine, started)

    common_base = {"sources": sources_spec(options.sources), "cache_dir": str(cache_dir), "device": device,
                   "batch_size": settings.batch_size, "seed": settings.seed, "crop": options.resolved_crop,
                   "segments": str(options.segments) if options.segments else None}
    # Placeholders for the estimate; the real fingerprints come from the prepare step.
    estimate = sum(j.expected_s for j in loader_jobs(settings, common_base) + (
        [] if settings.strategies_only else train_jobs(settings, common_base, {})
        + preprocess_jobs(settings, common_base) + clip_length_jobs(settings, common_base, "")
        + render_jobs(settings, common_base, common_base)))
    log.info("%s run, preset %s, %s, batch %d: expected about %.1f min of measurements (estimate for 2 quiet CPU "
             "cores), plus preprocessing where the cache is not up to date (demo corpus on 2 CPU cores: ~1 min "
             "tiny, ~10 min float)", "quick" if settings.quick else "full", preset.name, device,
             settings.batch_size, estimate / 60)

    prepared = {name: _prepare(options, name, device, cache_dir) for name in dict.fromkeys(
        (settings.preset,) if settings.strategies_only else (settings.preset, settings.train_preset))}
    main = prepared[settings.preset]
    data_root = main["data_root"]
    common = {**common_base, "preset": settings.preset, "fingerprint": main["fingerprint"], "data_root": data_root}
    warmed = warm_page_cache(Path(main["cache_root"]))
    log.info("page cache warmed: %.1f MB of shards", warmed / 1e6)

    jobs = loader_jobs(settings, common)
    _run_jobs(jobs, options.progress, "loaders")
    if settings.strategies_only:
        return _results(settings, machine, jobs, prepared, cache_dir, options, started)
    best = {kind: best_job(jobs, kind) for kind in LOADERS}
    train_prep = prepared[settings.train_preset]
    train_common = {**common, "preset": settings.train_preset, "fingerprint": train_prep["fingerprint"]}
    if settings.train_preset != settings.preset:
        warm_page_cache(Path(train_prep["cache_root"]))
    later = (train_jobs(settings, train_common, best) + preprocess_jobs(settings, common, _framing_root(options, settings))
             + clip_length_jobs(settings, common, str(_clip_length_corpus(settings)))
             + render_jobs(settings, common, train_common))
    _run_jobs(later, options.progress, "training, preprocessing, rendering")
    return _results(settings, machine, jobs + later, prepared, cache_dir, options, started)


def _clip_lengths_only(options: BenchOptions, settings, machine: dict[str, Any], started: float) -> dict[str, Any]:
    """--clip_lengths_only: the clip-length probe alone (its own corpus: no cache to prepare)."""
    [job] = clip_length_jobs(settings, {"sources": sources_spec(options.sources)}, str(_clip_length_corpus(settings)))
    log.info("clip lengths: expected about %.1f min (estimate for 2 quiet CPU cores)", job.expected_s / 60)
    _run_jobs([job], options.progress, "clip lengths")
    machine["load_average_end"] = load_average()
    return {"kind": "clip_lengths", "machine": machine, "settings": settings.to_dict(),
            "clip_lengths": dict(job.result), "elapsed_s": time.perf_counter() - started,
            "errors": [] if job.ok else [f"clip_lengths: {job.result.get('error')}"]}


def _results(settings, machine: dict[str, Any], jobs: list[Job], prepared: dict[str, dict[str, Any]], cache_dir: Path,
             options: BenchOptions, started: float) -> dict[str, Any]:
    results = assemble(settings, machine, jobs, prepared, cache_dir, options.sources, options.resolved_crop)
    results["machine"]["load_average_end"] = load_average()
    results["elapsed_s"] = time.perf_counter() - started
    results["targets"] = targets(results)
    return results
