"""`bench/compare.py --scale N`: the cache and the loaders at 1,000 clips and at N, in one run.

For each size: a data root of N tiny source files (a few bytes each, in folders of 1,000, so that
discovery and the up-to-date check run for real), a cache of N clips of 100 frames written through
the real writer (cache_store.ShardWriter: shards, journal, groups; then the merge and the training
view, as a run ends) with random features, then, each in a process of its own: `preprocess.py
status`, an up-to-date rerun of `preprocess.py`, `preprocess.py verify`, and the torch and dali
loaders (cache open, first batch, samples/s, peak RSS; the copy ceiling beside them). The JSON:
`scale.<clips>.{write_clips_per_s, files, bytes, status_s, rerun_s, verify_s, open_s, first_batch_s}`
and `scale.<clips>.<loader>.{samples_per_s, peak_rss_bytes}`, plus the ratios N vs 1,000.

The disk it needs and the time it takes are computed and logged before anything is written (and
the time again once the 1,000-clip size has measured this machine's write rate).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dali_float.cache import format as cf
from dali_float.cache import view as cache_view
from dali_float.bench import probes
from dali_float.bench.machine import load_average, machine_info
from dali_float.cache.index import ClipIndex
from dali_float.cache.store import GROUP_CLIPS, ShardWriter, writer_name
from dali_float.config import get_preset
from dali_float.errors import UsageError
from dali_float.progress import progress_bar

log = logging.getLogger(__name__)

BASE_CLIPS = 1000
FRAMES_PER_CLIP = 100
FILES_PER_FOLDER = 1000
LOADERS = ("torch", "dali")
# Measured besides (not a target): torch with worker processes, whose reads overlap.
EXTRA = {"torch_workers2": {"kind": "torch", "num_workers": 2}}
# For the estimate before anything is measured, from the million-clip runs on 2 busy CPU cores
# (docs/bench/scale1000000*.json; the write rate is refined after the 1,000-clip size).
_ASSUMED_WRITE_CLIPS_PER_S = 1000.0
_ASSUMED_SOURCE_FILES_PER_S = 15000.0
_ASSUMED_VERIFY_BYTES_PER_S = 200e6
_ASSUMED_DELETE_FILES_PER_S = 2000.0  # removing the N-clip data root afterwards (unless --keep)
_FIXED_S_PER_SIZE = 200.0  # status, rerun, the loader probes: process starts and timed runs
_SOURCE_FILE_BYTES = 4096  # what a file of a few bytes takes on disk (one block)
_INDEX_BYTES_PER_CLIP = 400  # index row and its b-tree share, journal and training-view row


class Corpus(NamedTuple):
    """What build_size made: the data root of tiny source files and the cache of their clips."""
    data_root: Path
    cache_dir: Path
    layout: cf.CacheLayout
    header: cf.CacheHeader
    ids: list[str]


def disk_needed(clips: int, preset) -> int:
    return clips * (cf.record_bytes(preset, FRAMES_PER_CLIP) + _INDEX_BYTES_PER_CLIP + _SOURCE_FILE_BYTES)


def expected_seconds(clips: int, preset, write_clips_per_s: float, keep: bool = False) -> float:
    record = cf.record_bytes(preset, FRAMES_PER_CLIP)
    return (clips / write_clips_per_s + clips / _ASSUMED_SOURCE_FILES_PER_S
            + clips * record / _ASSUMED_VERIFY_BYTES_PER_S + _FIXED_S_PER_SIZE
            + (0 if keep or clips == BASE_CLIPS else clips / _ASSUMED_DELETE_FILES_PER_S))


def _write_sources(data_root: Path, clips: int, progress: bool) -> list[str]:
    """N files of a few bytes named like videos (discovery only looks at names, the up-to-date check at
    size and mtime); returns their clip ids in order."""
    ids = []
    for i in progress_bar(range(clips), desc="source files", unit="file", disable=not progress, leave=False):
        folder = data_root / f"d{i // FILES_PER_FOLDER:05d}"
        if i % FILES_PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        name = f"c{i:07d}.mp4"
        (folder / name).write_bytes(b"clip %d\n" % i)
        ids.append(f"{folder.name}/{name}")
    return ids


def _write_cache(layout: cf.CacheLayout, header: cf.CacheHeader, data_root: Path, ids: list[str], preset,
                 progress: bool, seed: int, group_clips: int = GROUP_CLIPS) -> float:
    """The cache of `ids` through the real writer; returns the seconds it took (writing, merge, export)."""
    layout.create(header)
    rng = np.random.default_rng(seed)
    t = FRAMES_PER_CLIP
    # Random features, cheaply: every clip takes random slices of one random pool.
    pool = rng.standard_normal((1 << 16, preset.motion_dim + preset.audio_feature_dim), dtype=np.float32)
    coefficients = rng.standard_normal((1 << 12, preset.motion.num_coefficients), dtype=np.float32)
    emotion = rng.dirichlet(np.ones(preset.emotion_dim), size=1024).astype(np.float32)
    starts = rng.integers(0, len(pool) - t, size=len(ids))
    start = time.perf_counter()
    with ShardWriter(layout, preset, writer_name("scale"), group_clips=group_clips) as writer:
        bar = progress_bar(ids, desc="writing clips", unit="clip", disable=not progress, leave=False)
        for i, clip_id in enumerate(bar):
            rows = pool[starts[i]:starts[i] + t]
            c = int(starts[i]) % (len(coefficients) - t)
            features = cf.ClipFeatures(motion_latents=rows[:, cf.motion_columns(preset)],
                                       audio_features=rows[:, cf.audio_columns(preset)],
                                       motion_coefficients=coefficients[c:c + t], identity=rows[0, :preset.motion_dim],
                                       emotion=emotion[i % len(emotion)])
            path = data_root / clip_id
            st = path.stat()
            entry = cf.ClipEntry(clip_id=clip_id, source_path=str(path), size_bytes=st.st_size,
                                 mtime_ns=st.st_mtime_ns, content_hash="", status=cf.STATUS_CACHED, clip_uid=i,
                                 fps=float(preset.timing.fps), decoder="synthetic", crop="center")
            writer.write(entry, features)
    with ClipIndex(layout) as index:
        index.merge_journals()
        cache_view.export(layout, index, preset, header.fingerprint)
    return time.perf_counter() - start


def _command(args: list[str], timeout_s: float) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of `python preprocess.py ARGS` in a fresh process (what a user waits for)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(probes.REPO / "preprocess.py"), *args], cwd=probes.REPO,
                          capture_output=True, text=True, timeout=timeout_s,
                          env=dict(os.environ, PYTHONPATH=str(probes.REPO)))
    return time.perf_counter() - t0, done


def build_size(clips: int, work: Path, preset, fp_parts: tuple[str, dict, str], progress: bool, seed: int,
               out: dict[str, Any]) -> Corpus:
    """The data root (`work`/data<clips>) and the cache (`work`/cache<clips>) of `clips` clips, made anew;
    their timings, files and bytes go into `out`."""
    fp, models, framing = fp_parts
    data_root, cache_dir = work / f"data{clips}", work / f"cache{clips}"
    for d in (data_root, cache_dir):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    ids = _write_sources(data_root, clips, progress)
    out["source_files_s"] = time.perf_counter() - t0
    layout = cf.CacheLayout(cf.cache_root(cache_dir, preset, fp))
    header = cf.CacheHeader(fingerprint=fp, preset_name=preset.name, preset=preset.to_dict(), models=models,
                            framing=framing, data_root=str(data_root.resolve()))
    seconds = _write_cache(layout, header, data_root, ids, preset, progress, seed)
    files = [p for p in layout.root.rglob("*") if p.is_file()]
    out.update(write_s=seconds, write_clips_per_s=clips / seconds, files=len(files),
               bytes=sum(p.stat().st_size for p in files))
    log.info("%d clips written in %.1f s (%.0f clips/s): %d files, %.2f GB", clips, seconds, clips / seconds,
             len(files), out["bytes"] / 1e9)
    return Corpus(data_root, cache_dir, layout, header, ids)


def measure_size(clips: int, work: Path, preset, fp_parts: tuple[str, dict, str], timing: dict[str, Any],
                 batch_size: int, progress: bool, seed: int) -> dict[str, Any]:
    fp = fp_parts[0]
    out: dict[str, Any] = {"clips": clips, "frames_per_clip": FRAMES_PER_CLIP, "load_average_start": load_average()}
    data_root, cache_dir, layout, header, ids = build_size(clips, work, preset, fp_parts, progress, seed, out)
    seconds = out["write_s"]
    if clips == BASE_CLIPS:  # the fixed cost of a commit: the same clips with one commit (two fsyncs) per clip
        other = cf.CacheLayout(work / "commit_per_clip" / layout.root.name)
        per_clip = _write_cache(other, header, data_root, ids, preset, progress, seed, group_clips=1)
        out.update(write_commit_per_clip_clips_per_s=clips / per_clip,
                   commit_s_per_clip=max(0.0, (per_clip - seconds) / clips))
        shutil.rmtree(work / "commit_per_clip", ignore_errors=True)
        log.info("with a commit per clip: %.0f clips/s (%.2f ms more per clip)", clips / per_clip,
                 1e3 * out["commit_s_per_clip"])
    common = ["--preset", preset.name, "--data_root", str(data_root), "--cache_dir", str(cache_dir), "--crop", "center"]
    limit = 600 + clips / 500
    out["status_s"], done = _command(["status", "--json", *common], limit)
    status = json.loads(done.stdout) if done.returncode == 0 else {}
    out["status_ok"] = status.get("clips", {}).get("cached") == clips
    out["rerun_s"], done = _command([*common, "--no_progress"], limit)
    out["rerun_ok"] = done.returncode == 0 and f"{clips} up to date" in done.stderr
    out["verify_s"], done = _command(["verify", "--no_progress", *common], limit + clips / 200)
    out["verify_ok"] = done.returncode == 0
    for key in ("status", "rerun", "verify"):
        if not out[f"{key}_ok"]:
            log.error("%s at %d clips did not do what it should: see the JSON", key, clips)
    log.info("%d clips: status %.1f s, up-to-date rerun %.1f s, verify %.1f s", clips, out["status_s"],
             out["rerun_s"], out["verify_s"])
    spec = {"preset": preset.name, "sources": {}, "cache_dir": str(cache_dir), "fingerprint": fp, "device": "cpu",
            "batch_size": batch_size, "seed": seed, "timing": timing}
    # Each measurement draws from a seed of its own: at a size larger than the page cache, one that read the
    # windows another reads next would hand it a warm cache (found in the first runs: the ceiling, run
    # first with the loaders' seed, had read the torch loader's windows). The copy ceiling runs last, over
    # fresh positions (more than its runs read).
    configs = {kind: {"kind": kind, "num_workers": 0} for kind in LOADERS} | EXTRA
    for number, (name, config) in enumerate(configs.items()):
        result = probes.run_probe({**spec, "probe": "loader", "num_threads": 1, **config, "seed": seed + number})
        out[name] = {k: result.get(k) for k in ("samples_per_s", "spread", "peak_rss_bytes", "open_s", "first_batch_s",
                                                 "read_strategy", "disk_read_bytes", "error") if k in result}
        log.info("%d clips, %s: %s samples/s, peak RSS %.0f MiB, open %.2f s, first batch %.2f s, %.0f MB from disk",
                 clips, name, f"{result.get('samples_per_s', float('nan')):.0f}",
                 result.get("peak_rss_bytes", 0) / 2**20, result.get("open_s", float("nan")),
                 result.get("first_batch_s", float("nan")), result.get("disk_read_bytes", 0) / 1e6)
    ceiling = probes.run_probe({**spec, "probe": "ceiling", "positions": 1 << 18, "seed": seed + len(configs)})
    out["ceiling"] = {k: ceiling.get(k) for k in ("samples_per_s", "spread", "peak_rss_bytes", "error") if k in ceiling}
    out["open_s"], out["first_batch_s"] = out["dali"].get("open_s"), out["dali"].get("first_batch_s")
    out["load_average_end"] = load_average()
    return out


def ratios(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    def r(a, b):
        return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    out = {k: r(large.get(k), small.get(k)) for k in ("write_clips_per_s", "files", "bytes", "status_s", "rerun_s",
                                                       "verify_s", "open_s", "first_batch_s")}
    for kind in (*LOADERS, *EXTRA, "ceiling"):
        out[kind] = {k: r(large.get(kind, {}).get(k), small.get(kind, {}).get(k))
                     for k in ("samples_per_s", "peak_rss_bytes")}
    return out


def scale_targets(small: dict[str, Any], large: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #12's targets, judged on the run (N against 1,000 clips in the same run)."""
    q = ratios(small, large)
    n = large["clips"]
    rows = []

    def add(name: str, value: Any, met: bool | None) -> None:
        rows.append({"target": name, "measured": value, "met": met})

    for kind in LOADERS:
        v = q[kind]["samples_per_s"]
        add(f"{kind} samples/s at N >= 80% of 1,000", v, None if v is None else v >= 0.8)
        v = q[kind]["peak_rss_bytes"]
        add(f"{kind} peak RSS at N <= 1.2x 1,000", v, None if v is None else v <= 1.2)
    v = (large.get("open_s") or 0) + (large.get("first_batch_s") or 0)
    add("cache open + first batch < 10 s (dali)", v, v < 10)
    add("up-to-date rerun < 60 s", large["rerun_s"], large["rerun_s"] < 60 and large["rerun_ok"])
    add("status < 10 s", large["status_s"], large["status_s"] < 10 and large["status_ok"])
    fixed = 8
    add(f"files < 1 per 1,000 clips + {fixed}", large["files"], large["files"] < n / 1000 + fixed)
    return rows


def run_scale(clips: int, work: Path, batch_size: int = 8, progress: bool = True, seed: int = 0,
              keep: bool = False) -> dict[str, Any]:
    """Measure BASE_CLIPS and `clips` (see the module docstring); the JSON-ready results."""
    from dali_float.models import ModelSources
    from dali_float.preprocess.options import cache_identity

    if clips < BASE_CLIPS:
        raise UsageError(f"--scale {clips}: give at least {BASE_CLIPS} clips (the size it is compared with)")
    preset = get_preset("tiny")
    sizes = sorted({BASE_CLIPS, clips})
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    need = sum(disk_needed(n, preset) for n in sizes)
    free = shutil.disk_usage(work).free
    started = time.perf_counter()
    machine = machine_info()
    log.info("--scale %d: caches of %s clips (%d frames each, tiny preset) in %s: needs about %.1f GB of disk "
             "(%.1f GB free) and about %.0f min on 2 busy CPU cores (estimate; refined after the first size)",
             clips, " and ".join(f"{n:,}" for n in sizes), FRAMES_PER_CLIP, work, need / 1e9, free / 1e9,
             sum(expected_seconds(n, preset, _ASSUMED_WRITE_CLIPS_PER_S, keep) for n in sizes) / 60)
    if need > 0.95 * free:
        raise UsageError(f"--scale {clips} needs about {need / 1e9:.1f} GB in {work}, {free / 1e9:.1f} GB are free: "
                         f"give a smaller N or another --cache_dir")
    fp_parts = cache_identity(preset, ModelSources(), "center")
    from dali_float.loaders.plugin import load_window_reader

    load_window_reader()  # built here if needed, not inside the first dali measurement
    timing = {"warmup_batches": 20, "warmup_s": 1.0, "runs": 5, "run_s": 2.0, "min_batches": 3}
    results: dict[str, Any] = {"kind": "scale", "machine": machine, "preset": preset.name, "batch_size": batch_size,
                               "frames_per_clip": FRAMES_PER_CLIP, "timing": timing, "scale": {}}
    for n in sizes:
        results["scale"][str(n)] = measure_size(n, work, preset, fp_parts, timing, batch_size, progress, seed)
        if n == BASE_CLIPS and clips > n:
            rate = results["scale"][str(n)]["write_clips_per_s"]
            log.info("measured %.0f clips/s at %d clips: %d clips should take about %.0f min more", rate, n, clips,
                     expected_seconds(clips, preset, rate, keep) / 60)
        if not keep and n != BASE_CLIPS:
            shutil.rmtree(work / f"data{n}", ignore_errors=True)
            shutil.rmtree(work / f"cache{n}", ignore_errors=True)
    small, large = results["scale"][str(BASE_CLIPS)], results["scale"][str(clips)]
    results["ratios"] = ratios(small, large)
    results["targets"] = scale_targets(small, large)
    results["elapsed_s"] = time.perf_counter() - started
    results["errors"] = [f"{n} {k}" for n, r in results["scale"].items() for k in ("status_ok", "rerun_ok", "verify_ok")
                         if not r.get(k)] + [f"{n} {kind}: {r[kind]['error']}" for n, r in results["scale"].items()
                                             for kind in (*LOADERS, *EXTRA, "ceiling") if r.get(kind, {}).get("error")]
    return results


def format_scale(results: dict[str, Any]) -> str:
    """Markdown: one row per size, the ratios N vs 1,000, and the targets."""
    sizes = sorted(results["scale"], key=int)
    rows = [("write clips/s", "write_clips_per_s", "{:,.0f}"),
            ("write clips/s, a commit per clip", "write_commit_per_clip_clips_per_s", "{:,.0f}"),
            ("files", "files", "{:,}"),
            ("bytes", "bytes", "{:,}"), ("status s", "status_s", "{:.2f}"), ("up-to-date rerun s", "rerun_s", "{:.2f}"),
            ("verify s", "verify_s", "{:.1f}"), ("cache open s (dali)", "open_s", "{:.3f}"),
            ("first batch s (dali)", "first_batch_s", "{:.3f}")]
    lines = ["## Scale (tiny preset, 100 frames per clip)", "",
             "| | " + " | ".join(f"{int(n):,} clips" for n in sizes) + " | ratio |",
             "| --- | " + " | ".join("---" for _ in sizes) + " | --- |"]
    q = results.get("ratios", {})

    def fmt(fmt_: str, v: Any) -> str:
        return fmt_.format(v) if isinstance(v, (int, float)) else "-"

    for label, key, f in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(f, results["scale"][n].get(key)) for n in sizes)
                     + f" | {fmt('{:.2f}x', q.get(key))} |")
    for kind in (*LOADERS, *EXTRA, "ceiling"):
        for label, key, f in ((f"{kind} samples/s", "samples_per_s", "{:,.0f}"),
                              (f"{kind} peak RSS MiB", "peak_rss_bytes", "{:,.0f}"),
                              (f"{kind} MB read from disk", "disk_read_bytes", "{:,.0f}")):
            if key == "disk_read_bytes" and kind == "ceiling":
                continue
            values = [results["scale"][n].get(kind, {}).get(key) for n in sizes]
            if key in ("peak_rss_bytes", "disk_read_bytes"):
                values = [v / (2**20 if key == "peak_rss_bytes" else 1e6) if v is not None else None for v in values]
            lines.append(f"| {label} | " + " | ".join(fmt(f, v) for v in values)
                         + f" | {fmt('{:.2f}x', q.get(kind, {}).get(key))} |")
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    for t in results.get("targets", []):
        v = t["measured"]
        lines.append(f"| {t['target']} | {fmt('{:.3g}', v)} | {'yes' if t['met'] else 'no' if t['met'] is not None else '-'} |")
    return "\n".join(lines) + "\n"
