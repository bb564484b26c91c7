"""`preprocess.py status | show | verify | clear | compact`: look at, check, shrink and delete a feature cache.
Nothing here computes features; `status`, `show` and `verify` are readers: they change nothing on disk,
take no lock and work on a read-only cache (`verify --repair` marks the clips it found damaged, for the
run that re-does them, under the writer lock). `compact` and `clear` are writers (cache.lock); `clear`
deletes only with confirm=True, only folders that are caches, and never one a process is using."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from dali_float import media
from dali_float.cache import check as cache_check, format as cf, migrate as cache_migrate
from dali_float.cache import store as cache_store, view as cache_view
from dali_float.cache.index import ClipIndex, light_rows_of, read_entries
from dali_float.cache.lock import DEFAULT_TIMEOUT_S, WriterLock, is_write_locked, leased_generations, no_readers
from dali_float.config import Preset
from dali_float.errors import CacheBusy, UsageError
from dali_float.models import ModelSources
from dali_float.paths import printable
from dali_float.preprocess import plan
from dali_float.preprocess.options import cache_identity, preprocess_command

log = logging.getLogger(__name__)


def _folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def _folder_files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def cache_status(data_root: Path, cache_dir: Path, preset: Preset, sources: ModelSources, crop: str,
                 segments: Path | None = None) -> dict[str, Any]:
    """One JSON-ready dict describing the cache of (preset, weights) against the videos in data_root.

    clips: cached / failed / skipped (rows whose source is unchanged), stale (source changed since, or
    a cached clip whose record fails the cheap invariants: `damaged` says which), pending (source found,
    no row), missing_source (row whose source is gone; the next run drops it). failures: [{clip,
    error}], skipped: [{clip, reason}]. Reads the index and the shards' sizes (a journal a killed run
    left is counted with the index: its clips are done, the next run merges it; `from_journals` says how
    many rows came from there); hashes only sources whose mtime alone moved.
    """
    return _survey(data_root, cache_dir, preset, sources, crop, segments)[0]


@plan.gc_paused()  # a million index rows and sources: see gc_paused
def _survey(data_root: Path, cache_dir: Path, preset: Preset, sources: ModelSources, crop: str,
            segments: Path | None) -> tuple[dict[str, Any], list[plan.Source]]:
    """(cache_status's dict, the sources found): what status and plan both read."""
    fp, _, _ = cache_identity(preset, sources, crop)
    layout = cf.CacheLayout(cf.cache_root(cache_dir, preset, fp))
    layout.check_version()
    found = plan.discover_sources(data_root, segments)
    index = ClipIndex.open_existing(layout)
    if index is None:
        rows, damaged, bad = {}, {}, {}
    else:
        with index:
            rows, damaged = index.light_rows(), cache_store.cheap_check(layout, index)
            bad = {e.clip_id: e for e in index.entries(cf.STATUS_FAILED, cf.STATUS_SKIPPED)}
    # Journals a killed or stopped run left (merged by the next run, in this order, each row replacing the
    # index's): their clips are done.
    unmerged = {}
    for path in layout.journals() if layout.root.exists() else []:
        unmerged.update(light_rows_of(path))
        for entry in read_entries(path):
            bad.pop(entry.clip_id, None)
            if entry.status != cf.STATUS_CACHED:
                bad[entry.clip_id] = entry
    rows.update(unmerged)
    failures = sorted((e for e in bad.values() if e.status == cf.STATUS_FAILED), key=lambda e: e.clip_id)
    skipped = sorted((e for e in bad.values() if e.status == cf.STATUS_SKIPPED), key=lambda e: e.clip_id)
    rec = plan.reconcile(found, rows, damaged)
    stale = sorted(cid for cid, why in rec.pending.items() if why != plan.NEW)
    pending = sorted(cid for cid, why in rec.pending.items() if why == plan.NEW)
    cached = [r for r in map(rows.__getitem__, rec.up_to_date) if r.status == cf.STATUS_CACHED]
    # A row is up to date, pending or gone: so the few of the last two are looked in, not a set of a million ids.
    not_fresh = rec.pending.keys() | set(rec.gone)
    by_status = {cf.STATUS_FAILED: [e for e in failures if e.clip_id in rows and e.clip_id not in not_fresh],
                 cf.STATUS_SKIPPED: [e for e in skipped if e.clip_id in rows and e.clip_id not in not_fresh]}
    return {
        "fingerprint": fp,
        "preset": preset.name,
        "crop": crop,
        "cache_dir": str(cache_dir),
        "cache_root": str(layout.root),
        "data_root": str(data_root),
        "exists": layout.root.exists(),
        "index": layout.index_path.exists(),
        "bytes": _folder_bytes(layout.root),
        "files": _folder_files(layout.root),
        "sources": len(found),
        "clips": {
            "cached": len(cached),
            "failed": len(by_status[cf.STATUS_FAILED]),
            "skipped": len(by_status[cf.STATUS_SKIPPED]),
            "stale": len(stale),
            "pending": len(pending),
            "missing_source": len(rec.gone),
        },
        "cached_frames": sum(r.num_frames for r in cached),
        "from_journals": len(unmerged),
        "failures": [{"clip": e.clip_id, "error": e.reason} for e in by_status[cf.STATUS_FAILED]],
        "skipped": [{"clip": e.clip_id, "reason": e.reason} for e in by_status[cf.STATUS_SKIPPED]],
        "stale_clips": stale,
        "pending_clips": pending,
        "missing_source_clips": rec.gone,
        "damaged": [{"clip": c, "problem": p} for c, p in sorted(damaged.items())],
        "other_caches": sorted(p.name for p in _cache_folders(cache_dir)[0] if p != layout.root),
        "command": preprocess_command(data_root, cache_dir, preset.name, crop, segments, sources),
    }, found


def plan_run(data_root: Path, cache_dir: Path, preset: Preset, sources: ModelSources, crop: str,
             segments: Path | None = None, workers: int = 1, progress: bool = False) -> dict[str, Any]:
    """`preprocess.py plan`: what a run with these flags would do, doing none of it (nothing is written).

    The clips to do are the new, changed and damaged ones (as `status` counts them); their videos are probed
    for the frames at the preset's fps, and the disk they take is the format's record size of those frames
    (cache.format.record_layout). The time is estimated only from something measured: the per-stage seconds
    the cache's own clips recorded when they were made (one worker's), divided among `workers`; without any,
    there is no estimate. Clips that probing cannot read are counted apart (a run fails them)."""
    status, found = _survey(data_root, cache_dir, preset, sources, crop, segments)
    todo = set(status["pending_clips"]) | set(status["stale_clips"])
    tasks = [plan.ClipTask(s.clip_id, s.path, -1, s.size_bytes, s.mtime_ns, s.regular, s.span_s)
             for s in found if s.clip_id in todo]
    plan.probe_tasks(tasks, progress=progress)
    fps, window = preset.timing.fps, preset.timing.window_frames
    frames = {t.clip_id: media.num_frames_at_fps(t.duration_s, fps) for t in tasks if t.info is not None}
    usable = {c: n for c, n in frames.items() if n >= window}
    layout = cf.CacheLayout(Path(status["cache_root"]))
    measured = {"clips": 0, "frames": 0, "seconds": 0.0}
    if layout.index_path.exists():
        with ClipIndex.open_readonly(layout) as index:
            measured["clips"], measured["frames"], measured["seconds"] = index.stage_time()
    rate = measured["frames"] / measured["seconds"] if measured["seconds"] > 0 else None
    total = sum(usable.values())
    return {**{k: status[k] for k in ("fingerprint", "preset", "crop", "cache_root", "data_root", "sources")},
            "up_to_date": status["clips"]["cached"] + status["clips"]["failed"] + status["clips"]["skipped"],
            "to_do": len(tasks), "new": len(status["pending_clips"]), "changed_or_damaged": len(status["stale_clips"]),
            "unreadable": sorted(t.clip_id for t in tasks if t.info is None),
            "shorter_than_a_window": sorted(c for c, n in frames.items() if n < window),
            "frames": total, "video_seconds": total / fps,
            "disk_bytes": sum(cf.record_layout(preset, n)[1] for n in usable.values()),
            "bytes_per_frame": cf.record_layout(preset, 1000)[1] / 1000,
            "measured": {**measured, "frames_per_s_per_worker": rate},
            "workers": workers, "seconds": total / rate / workers if rate else None,
            "command": status["command"]}


def format_plan(planned: dict[str, Any]) -> list[str]:
    """`plan` as a few human-readable lines."""
    p, m = planned, planned["measured"]
    lines = [f"cache {p['cache_root']} (preset {p['preset']}, crop {p['crop']}, fingerprint {p['fingerprint'][:12]})",
             f"{p['sources']} clip(s) under {p['data_root']}: {p['up_to_date']} up to date, {p['to_do']} to do "
             f"({p['new']} new, {p['changed_or_damaged']} changed or damaged)"]
    if p["to_do"]:
        lines.append(f"to do: {p['frames']} frames ({p['video_seconds']:.1f} s of video at the preset's fps), "
                     f"{p['disk_bytes'] / 1e6:.1f} MB more on disk ({p['bytes_per_frame']:.0f} bytes per frame in "
                     f"the cache's record format)")
        for what, key in (("cannot be read (the run fails them)", "unreadable"),
                          ("are shorter than a training window (the run skips them)", "shorter_than_a_window")):
            if p[key]:
                lines.append(f"  {len(p[key])} clip(s) {what}: {', '.join(map(printable, p[key][:3]))}"
                             f"{' ...' if len(p[key]) > 3 else ''}")
        if p["seconds"] is not None:
            lines.append(f"time: about {p['seconds']:.0f} s with {p['workers']} worker(s), from what this cache's "
                         f"{m['clips']} clip(s) took when they were made ({m['frames_per_s_per_worker']:.0f} frames/s "
                         f"per worker; their machine and load, not necessarily this one's now)")
        else:
            lines.append("time: no estimate: this cache holds no clip whose preprocessing was measured yet (a run "
                         "logs its frames/s)")
        lines.append(f"run it: {p['command']}")
    return lines


def format_status(status: dict[str, Any]) -> list[str]:
    """The status as a few human-readable lines."""
    c = status["clips"]
    lines = [f"cache {status['cache_root']} ({'exists' if status['exists'] else 'not built yet'}, "
             f"{status['bytes'] / 1e6:.1f} MB in {status['files']} files; fingerprint {status['fingerprint'][:12]})",
             f"{status['sources']} source video(s) under {status['data_root']}",
             f"cached {c['cached']} ({status['cached_frames']} frames), failed {c['failed']}, skipped {c['skipped']}, "
             f"stale {c['stale']}, pending {c['pending']}, source gone {c['missing_source']}"]
    if status.get("from_journals"):
        lines.append(f"  ({status['from_journals']} of them are in journals not merged yet, of a run in progress or "
                     f"one that was stopped or killed: they are done, and the next run merges them into the index)")
    lines += [f"  failed  {printable(f['clip'])}: {printable(f['error'])}" for f in status["failures"]]
    lines += [f"  skipped {printable(s['clip'])}: {printable(s['reason'])}" for s in status["skipped"]]
    lines += [f"  damaged {printable(d['clip'])}: {d['problem']}" for d in status["damaged"]]
    if c["stale"] or c["pending"] or c["missing_source"]:
        lines.append(f"run `{status['command']}` to bring it up to date")
    return lines


def _existing_layout(cache_dir: Path, preset: Preset, sources: ModelSources, crop: str) -> tuple[str, cf.CacheLayout]:
    """(fingerprint, layout) of the cache of (preset, weights, crop); CacheError (exit 2) when there is
    none or it is of another format version (the message names the command that converts it)."""
    fp, _, _ = cache_identity(preset, sources, crop)
    layout = cf.CacheLayout(cf.cache_root(cache_dir, preset, fp))
    if not layout.root.exists():
        raise cf.CacheError(f"no feature cache {layout.root}: run `python preprocess.py` first (same flags)")
    layout.check_version()
    if not layout.index_path.exists():
        raise cf.CacheError(f"the cache {layout.root} has no index yet: run `python preprocess.py` (same flags)")
    return fp, layout


def verify_cache(cache_dir: Path, preset: Preset, sources: ModelSources, crop: str, repair: bool = False,
                 progress: bool = False, lock_timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """cache_check.verify over the cache of (preset, weights, crop): {fingerprint, cache_root, ok, problems,
    clips, repair}. With `repair`, the clips with problems are marked damaged in the index: the next
    run (which `preprocess.py verify --repair` starts) re-does exactly those.

    CacheError (exit 2) when there is no such cache or it has no index yet.
    """
    fp, layout = _existing_layout(cache_dir, preset, sources, crop)
    with ClipIndex.open_readonly(layout) as index:
        problems = cache_check.verify(layout, index, preset, progress=progress)
        bad = sorted({p["clip"] for p in problems if p["clip"]})
        clips = len(index)
    if repair and bad:
        with ClipIndex(layout, lock_timeout_s) as index:  # a writer: takes the cache's writer lock
            index.mark_damaged(bad)
    return {"fingerprint": fp, "cache_root": str(layout.root), "ok": not problems, "problems": problems,
            "clips": clips, "repair": bad if repair else []}


def compact_cache(cache_dir: Path, preset: Preset, sources: ModelSources, crop: str,
                  progress: bool = False, lock_timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Rewrite the shards holding records of re-done or removed clips (cache_store.compact), then the
    training view. Nothing else may write the cache meanwhile; a kill at any moment loses nothing."""
    fp, layout = _existing_layout(cache_dir, preset, sources, crop)
    with ClipIndex(layout, lock_timeout_s) as index:
        done = cache_store.compact(layout, index, progress=progress,
                                   export_view=lambda: cache_view.export(layout, index, preset, fp))
        cache_view.export(layout, index, preset, fp)  # when nothing moved: a view of the current generation
    log.info("compacted %d shard(s): %d live record(s) copied, %.1f MB reclaimed", done["shards"], done["records"],
             done["reclaimed_bytes"] / 1e6)
    return done


def migrate_cache(cache_dir: Path, preset: Preset, sources: ModelSources, crop: str,
                  progress: bool = False, lock_timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Convert the version 1 cache of (preset, weights, crop) in place (cache_migrate.migrate)."""
    fp, _, _ = cache_identity(preset, sources, crop)
    layout = cf.CacheLayout(cf.cache_root(cache_dir, preset, fp))
    if not layout.root.exists():
        raise cf.CacheError(f"no feature cache {layout.root} to migrate (check --cache_dir, --preset and the "
                            f"weights flags: they name the folder)")
    with WriterLock(layout.root, lock_timeout_s):
        return {"cache_root": str(layout.root), **cache_migrate.migrate(layout, preset, progress=progress)}


def show_clip(clip_id: str, cache_dir: Path, preset: Preset, sources: ModelSources, crop: str,
              preview: Path | None = None) -> dict[str, Any]:
    """One clip's entry in the cache of (preset, weights, crop), JSON-ready, with where its record is.

    Keys: every entry field (status, reason, source, decoder, source size and fps, frames, segment,
    crop, crop_box [x0, y0, x1, y1] in source pixels (past the frame where it was padded), faces seen,
    per-stage seconds, shard, offset, ...), plus cache_root and files {part: {path, offset, dtype,
    shape, bytes}} (the parts of its record in its shard).
    CacheError (exit 2) when there is no such cache; UsageError (exit 2) when it holds no such clip.
    `preview`: also write the clip's first frame with its crop drawn there, a PNG (preprocess.preview).
    """
    _, layout = _existing_layout(cache_dir, preset, sources, crop)
    with ClipIndex.open_readonly(layout) as index:
        entry = index.entry(clip_id)
        if entry is None:
            known = index.light_rows().keys()
            near = sorted(c for c in known if clip_id in c or c in clip_id)[:3] or sorted(known)[:3]
            raise UsageError(f"no clip {printable(clip_id)!r} in {layout.root} ({len(known)} clips; e.g. "
                             f"{', '.join(map(printable, near))}); "
                             f"`python preprocess.py status --json` lists them")
    shown: dict[str, Any] = {"cache_root": str(layout.root), **entry.to_dict(), "files": {}}
    if preview is not None:
        from dali_float.preprocess.preview import write_preview

        shown["preview"] = str(write_preview(entry, preview))
    if entry.status == cf.STATUS_CACHED:
        parts, _ = cf.record_layout(preset, entry.num_frames)
        for part in cf.PARTS:
            offset, n = parts[part.name]
            shown["files"][part.name] = {"path": str(layout.shard_path(entry.shard)), "offset": entry.offset + offset,
                                         "dtype": str(part.dtype), "shape": list(part.shape(preset, entry.num_frames)),
                                         "bytes": n}
    return shown


def format_clip(shown: dict[str, Any]) -> list[str]:
    """`show` as a few human-readable lines."""
    lines = [f"{printable(shown['clip_id'])}: {shown['status']}" +
             (f" ({printable(shown['reason'])})" if shown.get("reason") else "")]
    segment = shown.get("segment_s")
    lines.append(f"  source    {printable(shown['source_path'])}" +
                 (f" [{segment[0]:g} s, {segment[1]:g} s)" if segment else ""))
    turned = (f" (upright after a {shown['source_rotation_deg']} deg counter-clockwise turn)"
              if shown.get("source_rotation_deg") else "")
    lines.append(f"  video     {shown.get('source_width', 0)}x{shown.get('source_height', 0)}{turned} at "
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
        lines.append(f"  {name:<12} {f['dtype']}{f['shape']} {f['path']} at byte {f['offset']}")
    return lines


def _cache_folders(cache_dir: Path) -> tuple[list[Path], list[Path]]:
    """(caches, others) among the folders of cache_dir (a cache folder given as cache_dir: its parent's). A
    cache is a folder cf.is_cache_folder recognises; anything else is never deleted."""
    cache_dir = Path(cache_dir)
    if cf.is_cache_folder(cache_dir):
        cache_dir = cache_dir.parent
    if not cache_dir.is_dir():
        return [], []
    caches, others = [], []
    for p in sorted(cache_dir.iterdir()):
        if not p.is_dir():
            continue
        (caches if cf.is_cache_folder(p) else others).append(p)
    return caches, others


def clear_cache(cache_dir: Path, preset: Preset, sources: ModelSources, crop: str, confirm: bool = False,
                all_caches: bool = False) -> list[Path]:
    """Delete the cache folder of (preset, weights, crop), or every cache folder in cache_dir (`all_caches`).

    Without `confirm` only logs what it would delete. Returns the folders (deleted or to delete). A
    folder that is not a cache is listed and left; a cache that another process writes (its writer
    lock) or reads (a training process's lease) is refused with CacheBusy, naming who.
    """
    if all_caches:
        targets, others = _cache_folders(cache_dir)
        for folder in others:
            log.info("left %s: not a feature cache (no cache.json naming it)", folder)
    else:
        fp, _, _ = cache_identity(preset, sources, crop)
        root = cf.cache_root(cache_dir, preset, fp)
        targets = [root] if root.exists() else []
    if not targets:
        log.info("nothing to delete in %s", cache_dir)
        return []
    busy = []
    for root in targets:
        holder = is_write_locked(root)
        _, leased = leased_generations(root / "training", None, delete=False)
        if holder is not None:
            busy.append(f"{root.name} is being written by pid {holder.get('pid')} (`{holder.get('command', '?')}`)")
        elif leased:
            busy.append(f"{root.name} is being read by a training process (generation {leased[0]})")
    if busy:
        raise CacheBusy(f"not deleting: {'; '.join(busy)}; stop it and run the same command again")
    for root in targets:
        size = _folder_bytes(root)
        if confirm:
            # Held while deleting: a writer or reader that started since the check is refused, not cut off.
            with WriterLock(root, timeout_s=0), no_readers(root / "training"):
                shutil.rmtree(root)
            log.info("deleted %s (%.1f MB)", root, size / 1e6)
        else:
            log.info("would delete %s (%.1f MB)", root, size / 1e6)
    if not confirm:
        log.info("nothing deleted: add --confirm to delete %s", "them" if len(targets) > 1 else "it")
    return targets
