"""`preprocess.py status | show | verify | clear`: look at, check and delete a feature cache. Nothing here
writes features; `status`, `show` and `verify` change nothing on disk, `clear` deletes only with confirm=True."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from dali_float import cache_format as cf
from dali_float.config import Preset
from dali_float.errors import UsageError
from dali_float.models import ModelSources
from dali_float.preprocess import plan
from dali_float.preprocess.options import cache_identity

log = logging.getLogger(__name__)


def _folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def cache_status(data_root: Path, cache_dir: Path, preset: Preset, sources: ModelSources, crop: str,
                 segments: Path | None = None) -> dict[str, Any]:
    """One JSON-ready dict describing the cache of (preset, weights) against the videos in data_root.

    clips: cached / failed / skipped (entries whose source is unchanged), stale (source changed since,
    or a cached entry whose arrays are gone), pending (source found, no entry), missing_source (entry
    whose source is gone; the next run drops it). failures: [{clip, error}], skipped: [{clip, reason}].
    Reads the entries on disk (the truth), not manifest.json; hashes only sources whose mtime alone moved.
    """
    fp, _, _ = cache_identity(preset, sources, crop)
    layout = cf.CacheLayout(cf.cache_root(cache_dir, preset, fp))
    found = plan.discover_sources(data_root, segments)
    entries = layout.read_entries()
    rec = plan.reconcile(found, entries, layout)
    fresh = [entries[cid] for cid in rec.up_to_date]
    stale = sorted(cid for cid, why in rec.pending.items() if why != plan.NEW)
    pending = sorted(cid for cid, why in rec.pending.items() if why == plan.NEW)
    by_status = {s: [e for e in fresh if e.status == s] for s in cf.STATUSES}
    return {
        "fingerprint": fp,
        "preset": preset.name,
        "crop": crop,
        "cache_dir": str(cache_dir),
        "cache_root": str(layout.root),
        "data_root": str(data_root),
        "exists": layout.root.exists(),
        "manifest": layout.manifest_path.exists(),
        "bytes": _folder_bytes(layout.root),
        "sources": len(found),
        "clips": {
            "cached": len(by_status[cf.STATUS_CACHED]),
            "failed": len(by_status[cf.STATUS_FAILED]),
            "skipped": len(by_status[cf.STATUS_SKIPPED]),
            "stale": len(stale),
            "pending": len(pending),
            "missing_source": len(rec.gone),
        },
        "cached_frames": sum(e.num_frames for e in by_status[cf.STATUS_CACHED]),
        "failures": [{"clip": e.clip_id, "error": e.reason} for e in by_status[cf.STATUS_FAILED]],
        "skipped": [{"clip": e.clip_id, "reason": e.reason} for e in by_status[cf.STATUS_SKIPPED]],
        "stale_clips": stale,
        "pending_clips": pending,
        "missing_source_clips": [e.clip_id for e in rec.gone],
        "other_caches": sorted(p.name for p in _cache_folders(cache_dir) if p != layout.root),
    }


def format_status(status: dict[str, Any]) -> list[str]:
    """The status as a few human-readable lines."""
    c = status["clips"]
    lines = [f"cache {status['cache_root']} ({'exists' if status['exists'] else 'not built yet'}, "
             f"{status['bytes'] / 1e6:.1f} MB; fingerprint {status['fingerprint'][:12]})",
             f"{status['sources']} source video(s) under {status['data_root']}",
             f"cached {c['cached']} ({status['cached_frames']} frames), failed {c['failed']}, skipped {c['skipped']}, "
             f"stale {c['stale']}, pending {c['pending']}, source gone {c['missing_source']}"]
    lines += [f"  failed  {f['clip']}: {f['error']}" for f in status["failures"]]
    lines += [f"  skipped {s['clip']}: {s['reason']}" for s in status["skipped"]]
    if c["stale"] or c["pending"] or c["missing_source"]:
        lines.append("run `python preprocess.py` (same flags) to bring it up to date")
    return lines


def verify_cache(cache_dir: Path, preset: Preset, sources: ModelSources, crop: str) -> dict[str, Any]:
    """cache_format.verify over the cache of (preset, weights, crop): {fingerprint, cache_root, ok, problems}.

    CacheError (exit 2) when there is no such cache or it has no manifest yet.
    """
    fp, _, _ = cache_identity(preset, sources, crop)
    layout = cf.CacheLayout(cf.cache_root(cache_dir, preset, fp))
    if not layout.root.exists():
        raise cf.CacheError(f"no feature cache {layout.root}: run `python preprocess.py` first")
    problems = cf.verify(layout, preset)
    return {"fingerprint": fp, "cache_root": str(layout.root), "ok": not problems, "problems": problems,
            "clips": len(layout.read_entries())}


def show_clip(clip_id: str, cache_dir: Path, preset: Preset, sources: ModelSources, crop: str) -> dict[str, Any]:
    """One clip's entry in the cache of (preset, weights, crop), JSON-ready, with its cached files' shapes.

    Keys: every entry field (status, reason, source, decoder, source size and fps, frames, segment,
    crop, crop_box [x0, y0, x1, y1] in source pixels (past the frame where it was padded), faces seen,
    per-stage seconds, ...), plus cache_root and files {stream: {path, dtype, shape, bytes}}.
    CacheError (exit 2) when there is no such cache; UsageError (exit 2) when it holds no such clip.
    """
    fp, _, _ = cache_identity(preset, sources, crop)
    layout = cf.CacheLayout(cf.cache_root(cache_dir, preset, fp))
    if not layout.root.exists():
        raise cf.CacheError(f"no feature cache {layout.root}: run `python preprocess.py` first (same flags)")
    entries = layout.read_entries()
    entry = entries.get(clip_id)
    if entry is None:
        near = sorted(c for c in entries if clip_id in c or c in clip_id)[:3] or sorted(entries)[:3]
        raise UsageError(f"no clip {clip_id!r} in {layout.root} ({len(entries)} clips; e.g. {', '.join(near)}); "
                         f"`python preprocess.py status --json` lists them")
    shown: dict[str, Any] = {"cache_root": str(layout.root), **entry.to_dict(), "files": {}}
    for stream in cf.STREAMS:
        path = layout.stream_path(entry.key, stream)
        if not path.exists():
            continue
        try:
            array = np.load(path, mmap_mode="r")
            shown["files"][stream.name] = {"path": str(path), "dtype": str(array.dtype), "shape": list(array.shape),
                                           "bytes": path.stat().st_size}
        except (OSError, ValueError) as err:
            shown["files"][stream.name] = {"path": str(path), "error": str(err)}
    return shown


def format_clip(shown: dict[str, Any]) -> list[str]:
    """`show` as a few human-readable lines."""
    lines = [f"{shown['clip_id']}: {shown['status']}" + (f" ({shown['reason']})" if shown.get("reason") else "")]
    segment = shown.get("segment_s")
    lines.append(f"  source    {shown['source_path']}" + (f" [{segment[0]:g} s, {segment[1]:g} s)" if segment else ""))
    lines.append(f"  video     {shown.get('source_width', 0)}x{shown.get('source_height', 0)} at "
                 f"{shown.get('source_fps', 0):.3f} fps, decoder {shown.get('decoder') or '-'}; "
                 f"{shown['num_frames']} frames at {shown.get('fps', 0):g} fps")
    box = shown.get("crop_box") or []
    faces = f", {shown['faces_seen']} face(s) seen on {shown['detect_frames']} sampled frames" \
        if shown.get("crop") == "face" else ""
    lines.append(f"  crop      {shown.get('crop') or '-'} {[round(v, 1) for v in box] if box else ''}{faces}")
    stages = shown.get("stage_seconds") or {}
    if stages:
        lines.append("  seconds   " + ", ".join(f"{k} {v:.3f}" for k, v in stages.items()))
    for name, f in shown["files"].items():
        lines.append(f"  {name:<9} " + (f"{f['dtype']}{f['shape']} {f['path']}" if "shape" in f else f"{f['path']}: "
                                           f"{f['error']}"))
    return lines


def _cache_folders(cache_dir: Path) -> list[Path]:
    """Folders of cache_dir that are feature caches (hold cache.json): nothing else is ever deleted."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    return sorted(p for p in cache_dir.iterdir() if p.is_dir() and (p / "cache.json").is_file())


def clear_cache(cache_dir: Path, preset: Preset, sources: ModelSources, crop: str, confirm: bool = False,
                all_caches: bool = False) -> list[Path]:
    """Delete the cache folder of (preset, weights, crop), or every cache folder in cache_dir (`all_caches`).

    Without `confirm` only logs what it would delete. Returns the folders (deleted or to delete).
    """
    if all_caches:
        targets = _cache_folders(cache_dir)
    else:
        fp, _, _ = cache_identity(preset, sources, crop)
        root = cf.cache_root(cache_dir, preset, fp)
        targets = [root] if root.exists() else []
    if not targets:
        log.info("nothing to delete in %s", cache_dir)
        return []
    for root in targets:
        size = _folder_bytes(root)
        if confirm:
            shutil.rmtree(root)
            log.info("deleted %s (%.1f MB)", root, size / 1e6)
        else:
            log.info("would delete %s (%.1f MB)", root, size / 1e6)
    if not confirm:
        log.info("nothing deleted: add --confirm to delete %s", "them" if len(targets) > 1 else "it")
    return targets

