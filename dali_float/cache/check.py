"""`verify`: the full check of a cache against its format. Every run does the cheap part
(cache_store.cheap_check: shard sizes against the index); this reads every record.

Per cached clip: its shard exists and holds the record, the record's CRC-32 is the one committed,
its parts are finite, it holds at least one window. Per cache: no temporary file, no unmerged
journal, no shard without a live record, the training view of the index's generation, pointing at
the same records. Problems come back as [{clip, problem}] ("" for the cache as a whole).

A reader: it writes nothing, holds the index only for short queries, and runs beside a writer. What a
writer in progress has on disk (journals, tails not cut yet) and what readers' leases keep (cache.lock)
is not damage; bytes that fail their check are damage only if the clip's row still points at them
when read again (a writer may have moved the clip meanwhile).
"""
from __future__ import annotations

import logging
import os

import numpy as np

from dali_float.cache import format as cf
from dali_float.atomic import TMP_MARKER
from dali_float.cache.index import ClipIndex
from dali_float.cache.lock import is_write_locked, leased_generations
from dali_float.cache.store import cheap_check
from dali_float.cache.view import read_view_header
from dali_float.config import Preset
from dali_float.errors import CacheError
from dali_float.progress import progress_bar

log = logging.getLogger(__name__)


def verify(layout: cf.CacheLayout, index: ClipIndex, preset: Preset, progress: bool = False) -> list[dict[str, str]]:
    problems: list[dict[str, str]] = []

    def cache_problem(text: str) -> None:
        problems.append({"clip": "", "problem": text})

    writer = is_write_locked(layout.root)
    if writer is None:  # a run in progress has journals and tails on disk by design
        for leftover in layout.root.rglob(f"*{TMP_MARKER}*"):
            cache_problem(f"temporary file left behind: {leftover} (the next run removes it)")
        for journal in layout.journals():
            cache_problem(f"journal {journal.name} is not merged (a run was killed; the next run merges it)")
        live = index.live_ends()
        protected, _ = leased_generations(layout.training_dir, None, delete=False)
        for path in layout.shard_files():
            size, kept = path.stat().st_size, protected.get(path.name, 0)
            if path.name not in live and not kept:
                cache_problem(f"shard {path.name} holds no live record (the next run removes it)")
            elif size > max(live.get(path.name, 0), kept) and path.name in live:
                cache_problem(f"shard {path.name} has {size - live[path.name]} bytes past its last live "
                              f"record (a killed writer's tail; the next run cuts it)")
    else:
        log.info("a writer is at work on %s (%s): what it has not finished yet is not checked", layout.root,
                 writer.get("command", "?"))
    damaged = cheap_check(layout, index)
    if writer is not None:  # a compaction may have moved a clip between the query and the stat
        damaged = {c: p for c, p in damaged.items() if _record_cut(layout, index, c)}
    problems.extend({"clip": c, "problem": p} for c, p in sorted(damaged.items()))
    problems.extend({"clip": c, "problem": p} for c, p in _check_view(layout, index, preset, writer is not None))

    window = preset.timing.window_frames
    total = index.counts()[cf.STATUS_CACHED]
    fds: dict[str, int] = {}
    try:
        records = progress_bar(index.records(), total=total, desc="verifying", unit="clip", disable=not progress,
                               leave=False)
        for clip_id, shard, offset, nbytes, crc, frames in records:
            if clip_id in damaged:
                continue
            found = list(_check_record(layout, fds, shard, offset, nbytes, crc, frames, preset, window))
            if found and not _still_there(index, clip_id, shard, offset, crc):
                continue  # a writer moved or dropped the clip while we read: not damage
            problems.extend({"clip": clip_id, "problem": p} for p in found)
    finally:
        for fd in fds.values():
            os.close(fd)
    return problems


def _record_cut(layout: cf.CacheLayout, index: ClipIndex, clip_id: str) -> bool:
    """The clip's record (as its row says now) lies past its shard's end or its shard is missing."""
    entry = index.entry(clip_id)
    if entry is None or entry.status != cf.STATUS_CACHED:
        return False
    try:
        return layout.shard_path(entry.shard).stat().st_size < entry.offset + entry.nbytes
    except FileNotFoundError:
        return True


def _still_there(index: ClipIndex, clip_id: str, shard: str, offset: int, crc: int) -> bool:
    entry = index.entry(clip_id)
    return entry is not None and entry.status == cf.STATUS_CACHED and (entry.shard, entry.offset, entry.checksum) \
        == (shard, offset, crc)


def _check_record(layout: cf.CacheLayout, fds: dict[str, int], shard: str, offset: int, nbytes: int, crc: int,
                  frames: int, preset: Preset, window: int):
    if frames < window:
        yield f"{frames} frames, fewer than one window ({window})"
    parts, expected = cf.record_layout(preset, frames)
    if nbytes != expected:
        yield f"its record is {nbytes} bytes, {frames} frames need {expected}"
        return
    if shard not in fds:
        try:
            fds[shard] = os.open(layout.shard_path(shard), os.O_RDONLY)
        except FileNotFoundError:
            yield f"its shard {layout.shard_path(shard)} is missing"
            return
    data = os.pread(fds[shard], nbytes, offset)
    if cf.checksum(data) != crc:
        yield f"bytes {offset}..{offset + nbytes} of shard {layout.shard_path(shard)} changed since they were " \
              f"written (CRC-32 mismatch)"
        return
    record = np.frombuffer(data, dtype=np.uint8)
    for part in cf.PARTS:
        start, n = parts[part.name]
        if not np.isfinite(record[start:start + n].view(part.dtype)).all():
            yield f"its {part.name} hold non-finite values"


def _check_view(layout: cf.CacheLayout, index: ClipIndex, preset: Preset, writer_active: bool = False):
    try:
        header = read_view_header(layout)
    except CacheError as err:
        yield "", str(err)
        return
    if header is None:
        yield "", "no training view (training.json): the next run writes it"
        return
    if header.get("generation") != index.generation:
        if writer_active:
            return  # the writer exports the new view when it is done
        yield "", f"the training view is of index generation {header.get('generation')}, the index is at " \
                  f"{index.generation}: the next run writes it again"
        return
    try:
        from dali_float.cache.view import TrainingView

        view = TrainingView(layout, header)
    except (OSError, ValueError, KeyError) as err:
        yield "", f"the training view is unreadable ({err}): run `python preprocess.py` to write it again"
        return
    names = [p.name for p in view.shards]
    # One query for every cached record, not one per clip (a million clips: seconds, not minutes).
    cached = {clip_id: (shard, offset, frames) for clip_id, shard, offset, _, _, frames in index.records()}
    for i in range(len(view)):
        row = view.rows[i]
        clip_id = view.clip_id(i)
        record = cached.get(clip_id)
        if record is None:
            yield clip_id, "in the training view but not cached in the index"
        elif record != (names[row["shard"]], int(row["offset"]), int(row["num_frames"])):
            yield clip_id, "the training view and the index disagree on its record"
