"""`run_preprocessing`: recover the cache, plan, process the pending clips, merge the journals, report.

Order of a run (the same on every torchrun rank):

    1. rank 0: create the folder, merge the journals and cut the shard tails a killed run left,
       check the cheap invariants, update touched rows (the index every rank plans from) -- barrier
    2. every rank: reconcile sources with the index, make tasks (stable uids), probe them,
       take its share (deterministic split by duration), run it on its local workers
                                                                             -- barrier
    3. rank 0: merge the journals, drop rows of vanished sources, export the training view
                                                                             -- barrier (readers may open the cache)

Every worker process writes its own shards and journal (cache_store.ShardWriter); only rank 0's
parent process writes index.sqlite and the training view.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import multiprocessing as mp
import queue as queue_module
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dali_float.cache import format as cf
from dali_float import media
from dali_float.cache import view as cache_view
from dali_float.cache.index import ClipIndex
from dali_float.cache.store import ShardWriter, dead_bytes, trim_shards, writer_name
from dali_float.cli import usable_cores
from dali_float.errors import CheckpointError, NoSourcesError, UsageError
from dali_float.preprocess import plan
from dali_float.preprocess.options import (PreprocessOptions, PreprocessResult, cache_identity, new_header,
                                           rank_and_world, worker_devices)
from dali_float.preprocess.worker import STAGES, ClipProcessor, run_tasks, worker_main

log = logging.getLogger(__name__)

# A rank may wait for the others for as long as preprocessing a large data set takes.
_BARRIER_TIMEOUT = datetime.timedelta(days=7)
_POLL_S = 0.5  # how often the parent checks that its workers are alive while none reports


def run_preprocessing(options: PreprocessOptions) -> PreprocessResult:
    """Bring the cache of (preset, weights) up to date with the videos under `options.data_root`.

    A quick no-op ("N up to date") when nothing changed: nothing is built, nothing rewritten.
    Raises UsageError / CheckpointError (exit 2) for a bad path, GPU list or weights; a clip that
    cannot be used only becomes a failed or skipped entry (result.exit_code 1 if any failed).
    """
    start = time.perf_counter()
    preset = options.preset
    devices = worker_devices(options)  # before anything slow: --gpus this machine lacks is exit 2 at once
    rank, world = rank_and_world()
    if Path(options.cache_dir).exists() and not Path(options.cache_dir).is_dir():
        raise UsageError(f"--cache_dir {options.cache_dir} is a file, not a folder")
    fp, model_ids, framing = cache_identity(preset, options.sources, options.crop)
    layout = cf.CacheLayout(cf.cache_root(options.cache_dir, preset, fp))
    # UsageError when the folder (or the segments file) does not exist or a segment row is malformed
    sources = plan.discover_sources(options.data_root, options.segments)
    if not options.force:
        _refuse_another_corpus(layout, Path(options.data_root), {s.clip_id for s in sources})
    if not sources:  # nothing to do is a mistake (a wrong folder), not a success: say so, touch nothing
        if options.segments is not None:
            raise NoSourcesError(f"the segments file {options.segments} lists no clip: add rows "
                                 f"video,start_s,end_s[,clip_name]")
        raise NoSourcesError(f"no video files ({', '.join(media.VIDEO_EXTENSIONS)}) under {options.data_root}: "
                             f"point --data_root at the folder that holds the videos")
    header = new_header(preset, fp, model_ids, framing, options.data_root)
    stats = _RunStats()
    if not options.force:
        layout.check_version()  # a version 1 cache: the command that converts it, on every rank

    with _process_group(world) as barrier:
        if rank == 0:
            snapshot, rec = plan.recover(layout, header, sources, options.force)
        barrier()
        if rank != 0:
            snapshot = plan.Snapshot.read(layout)
            rec = plan.reconcile(sources, snapshot.rows, snapshot.damaged, options.force)
        tasks = plan.make_tasks(sources, rec, snapshot)
        if tasks:
            plan.probe_tasks(tasks, progress=options.progress and rank == 0)
            share = plan.balance(tasks, world)[rank]
            if world > 1:
                log.info("rank %d of %d: %d of %d pending clip(s)", rank, world, len(share), len(tasks))
            _run_share(share, devices, options, layout, stats, rank)
        barrier()
        if rank == 0:
            _finish(layout, rec, preset, fp)
        barrier()  # the index and the training view are on disk before any rank returns (and opens the cache)
        with ClipIndex(layout) as index:
            result = _result(fp, layout, index, rec, stats, time.perf_counter() - start)

    if rank == 0:
        _log_summary(result, rec, len(tasks), options)
    return result


def _refuse_another_corpus(layout: cf.CacheLayout, data_root: Path, clip_ids: set[str]) -> None:
    """A cache holds one corpus: pointing it at another would drop every clip of the first.

    A data root that moved (or was edited) shares clip ids with the cache and is followed; one that
    shares none is another corpus, and is refused rather than replacing the cache.
    """
    try:
        recorded = layout.read_header().data_root
    except cf.CacheError:  # none yet, or another version: said elsewhere
        return
    if not recorded or Path(recorded) == data_root.resolve() or not layout.index_path.exists():
        return
    with ClipIndex(layout) as index:
        known = index.light_rows().keys()
    if known and not clip_ids & known:
        raise UsageError(f"the cache {layout.root} holds the features of {recorded}, not of --data_root {data_root}: "
                         f"give another --cache_dir (or --force_preprocess to rebuild it for {data_root})")


# --------------------------------------------------------------------------------------------------
# Running one rank's share on its local workers


@dataclasses.dataclass
class _RunStats:
    processed: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    frames: int = 0  # frames of clips cached by this run
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def add(self, entry: cf.ClipEntry) -> None:
        self.processed[entry.status] += 1
        if entry.status == cf.STATUS_CACHED:
            self.frames += entry.num_frames
            for stage, s in entry.stage_seconds.items():
                self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + float(s)


class _Progress:
    """Two tqdm bars (clips; frames with frames/s) fed by every worker of this process."""

    def __init__(self, tasks: list[plan.ClipTask], fps: int, enabled: bool, stats: _RunStats) -> None:
        self.stats = stats
        self.expected = {t.clip_id: media.num_frames_at_fps(t.duration_s, fps) for t in tasks}
        self.reported: dict[str, int] = defaultdict(int)
        self.current: dict[int, str] = {}
        self.clips = tqdm(total=len(tasks), desc="clips", unit="clip", position=0, disable=not enabled)
        self.frames_bar = tqdm(total=sum(self.expected.values()), desc="frames", unit="frame", position=1,
                               disable=not enabled, smoothing=0.1)

    def start(self, worker: int, clip_id: str) -> None:
        self.current[worker] = clip_id
        self.clips.set_postfix_str(clip_id[-40:], refresh=False)

    def frames(self, worker: int, n: int) -> None:
        self.reported[self.current.get(worker, "")] += n
        self.frames_bar.update(n)

    def done(self, worker: int, entry: cf.ClipEntry) -> None:
        self.current.pop(worker, None)
        self.stats.add(entry)
        if entry.status != cf.STATUS_CACHED:  # its frames will never come: shrink the frame total
            self.frames_bar.total -= max(0, self.expected.get(entry.clip_id, 0) - self.reported[entry.clip_id])
            self.frames_bar.refresh()
        self.clips.update(1)

    def close(self) -> None:
        self.frames_bar.close()
        self.clips.close()


class _LocalReporter:
    """Reporter of the in-process worker (worker id 0)."""

    def __init__(self, progress: _Progress) -> None:
        self.progress = progress

    def start(self, clip_id: str) -> None:
        self.progress.start(0, clip_id)

    def frames(self, n: int) -> None:
        self.progress.frames(0, n)

    def done(self, entry: cf.ClipEntry) -> None:
        self.progress.done(0, entry)


def _run_share(share: list[plan.ClipTask], devices: list[str], options: PreprocessOptions,
               layout: cf.CacheLayout, stats: _RunStats, rank: int) -> None:
    """Process this rank's clips: in this process with one worker, else in spawned worker processes."""
    if not share:
        return
    n = min(len(devices), len(share))
    progress = _Progress(share, options.preset.timing.fps, options.progress, stats)
    try:
        with logging_redirect_tqdm():
            if n == 1:
                processor = ClipProcessor(options.preset, options.sources, devices[0], options.frame_batch,
                                          crop=options.crop)
                with ShardWriter(layout, options.preset, writer_name(f"r{rank}w0")) as writer:
                    run_tasks(processor, writer, share, _LocalReporter(progress))
            else:
                _run_processes(plan.balance(share, n), devices[:n], options, layout, progress, rank)
    finally:
        progress.close()


def _run_processes(shares: list[list[plan.ClipTask]], devices: list[str], options: PreprocessOptions,
                   layout: cf.CacheLayout, progress: _Progress, rank: int) -> None:
    """One spawned process per share (CUDA cannot be forked); progress and entries come back on a Queue.

    A worker that dies (a decoder crash, the OOM killer) costs the clip it was on: that clip gets a
    failed entry, and a fresh worker takes over the rest of its share.
    """
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    threads = max(1, usable_cores() // len(shares))
    level = logging.getLogger("dali_float").getEffectiveLevel()
    remaining = {w: {t.clip_id: t for t in share} for w, share in enumerate(shares)}
    current: dict[int, str | None] = {}  # the clip each worker is on
    finished: dict[int, int] = {}  # clips each worker's current process has finished
    procs: dict[int, mp.process.BaseProcess] = {}

    def launch(w: int) -> None:
        tasks = list(remaining[w].values())
        procs[w] = ctx.Process(target=worker_main, name=f"preprocess-worker{w}", daemon=True,
                               args=(w, options.preset, options.sources, devices[w], options.frame_batch,
                                     options.crop, threads, str(layout.root), writer_name(f"r{rank}w{w}"), tasks,
                                     messages, level))
        current[w], finished[w] = None, 0
        procs[w].start()

    def handle(kind: str, w: int, payload) -> None:
        if kind == "start":
            current[w] = payload
            progress.start(w, payload)
        elif kind == "frames":
            progress.frames(w, payload)
        elif kind == "done":
            entry = cf.ClipEntry.from_dict(payload)
            remaining[w].pop(entry.clip_id, None)
            current[w] = None
            finished[w] += 1
            progress.done(w, entry)
        elif kind == "exit":
            procs.pop(w).join()
        elif kind == "fatal":
            error, message = payload
            raise {"CheckpointError": CheckpointError, "UsageError": UsageError,
                   "CacheError": UsageError}.get(error, RuntimeError)(message)

    for w in range(len(shares)):
        launch(w)
    parent: ShardWriter | None = None  # records the clips of workers that died (created when one does)
    try:
        while procs:
            try:
                handle(*messages.get(timeout=_POLL_S))
                continue
            except queue_module.Empty:
                pass
            for w, proc in list(procs.items()):
                if proc.is_alive():
                    continue
                # Messages it sent before dying may still be in the pipe: take them first.
                with contextlib.suppress(queue_module.Empty):
                    while True:
                        handle(*messages.get(timeout=_POLL_S))
                if w not in procs:  # its "exit" was among them
                    continue
                if current[w] is None and not finished[w] and remaining[w]:
                    raise RuntimeError(f"preprocessing worker {w} died ({_how(proc)}) before processing any "
                                       f"clip; run with --workers 1 -v to see why")
                if current[w] is not None:
                    if parent is None:
                        parent = ShardWriter(layout, options.preset, writer_name(f"r{rank}parent"), group_clips=1)
                    _worker_died(w, proc, current[w], remaining, parent, progress)
                if remaining[w]:
                    launch(w)  # a fresh process for the rest of its share
                else:
                    del procs[w]
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.join(timeout=10)
        if parent is not None:
            parent.close()


def _how(proc) -> str:
    code = proc.exitcode
    return f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"


def _worker_died(w: int, proc, clip_id: str, remaining: dict[int, dict[str, plan.ClipTask]],
                 writer: ShardWriter, progress: _Progress) -> None:
    """Record the clip a dead worker was on as failed (written here: the worker cannot any more)."""
    how = _how(proc)
    task = remaining[w].pop(clip_id)
    entry = task.new_entry(cf.STATUS_FAILED,
                           reason=f"the worker process died ({how}) while processing this clip; re-encode the "
                                  f"file or remove it")
    log.warning("worker %d died (%s) on %s; %d clip(s) of its share go to a new worker", w, how, clip_id,
                len(remaining[w]))
    progress.done(w, writer.write(entry))


# --------------------------------------------------------------------------------------------------
# torchrun: two barriers around the work (gloo, initialised from the environment)


@contextlib.contextmanager
def _process_group(world: int) -> Iterator:
    """A barrier() across torchrun ranks (a no-op for a single process).

    Uses the caller's process group if one exists (a new gloo group beside it: barriers on NCCL need
    a device), else creates a gloo group from the torchrun environment and destroys it afterwards.
    """
    if world <= 1:
        yield lambda: None
        return
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=_BARRIER_TIMEOUT)
        group = None
    else:
        group = dist.new_group(backend="gloo", timeout=_BARRIER_TIMEOUT)
    try:
        yield lambda: dist.barrier(group=group)
    finally:
        if created:
            dist.destroy_process_group()
        elif group is not None:
            dist.destroy_process_group(group)


# --------------------------------------------------------------------------------------------------
# Finishing and reporting


def _finish(layout: cf.CacheLayout, rec: plan.Reconciliation, preset, fp: str) -> None:
    """Merge the writers' journals, drop the rows of vanished sources, export the training view
    (only when the index changed: a rerun with nothing to do writes nothing)."""
    with ClipIndex(layout) as index:
        index.merge_journals()
        index.delete(rec.gone)
        trim_shards(layout, index)  # records of dropped clips at a shard's end: cut now, not next run
        if not cache_view.export(layout, index, preset, fp):
            return
        dead = sum(dead_bytes(layout, index).values())
        if dead > 0.25 * sum(p.stat().st_size for p in layout.shard_files()):
            log.info("%.1f MB of the shards hold records of re-done or removed clips: `python preprocess.py "
                     "compact` (same flags) reclaims them", dead / 1e6)


def _result(fp: str, layout: cf.CacheLayout, index: ClipIndex, rec: plan.Reconciliation, stats: _RunStats,
            wall_s: float) -> PreprocessResult:
    counts = index.counts()
    fresh = set(rec.pending)
    failures = [(e.clip_id, e.reason) for e in index.entries(cf.STATUS_FAILED)]
    skipped = [(e.clip_id, e.reason) for e in index.entries(cf.STATUS_SKIPPED)]
    kept_bad = [c for c, _ in failures + skipped if c not in fresh]
    return PreprocessResult(
        fingerprint=fp, cache_root=layout.root, counts=counts, processed=dict(stats.processed),
        up_to_date=len(rec.up_to_date), removed=len(rec.gone),
        failures=failures, skipped=skipped,
        not_retried=len(kept_bad), total_frames=stats.frames, stage_seconds=dict(stats.stage_seconds),
        stage_fps={s: stats.frames / sec for s, sec in stats.stage_seconds.items() if sec > 0},
        wall_seconds=wall_s, wall_fps=stats.frames / wall_s if wall_s > 0 else 0.0,
    )


def _log_summary(result: PreprocessResult, rec: plan.Reconciliation, num_tasks: int,
                 options: PreprocessOptions) -> None:
    log.info("feature cache %s (preset %s, fingerprint %s)", result.cache_root, options.preset.name,
             result.fingerprint[:12])
    if not num_tasks and not result.removed:
        log.info("%d up to date (nothing to do)", result.up_to_date)
    else:
        done = result.processed
        why = defaultdict(int)
        for reason in rec.pending.values():
            why[reason] += 1
        log.info("%d clip(s) processed (%s): %d cached, %d skipped, %d failed; %d up to date; %d removed "
                 "(source gone)", num_tasks, ", ".join(f"{n} {k}" for k, n in sorted(why.items())) or "none",
                 done.get(cf.STATUS_CACHED, 0), done.get(cf.STATUS_SKIPPED, 0), done.get(cf.STATUS_FAILED, 0),
                 result.up_to_date, result.removed)
    c = result.counts
    log.info("the cache holds %d cached, %d skipped, %d failed clip(s)", c.get(cf.STATUS_CACHED, 0),
             c.get(cf.STATUS_SKIPPED, 0), c.get(cf.STATUS_FAILED, 0))
    for clip_id, reason in result.skipped:
        log.info("skipped %s: %s", clip_id, reason)
    for clip_id, reason in result.failures:
        log.warning("failed %s: %s", clip_id, reason)
    if result.not_retried:
        log.info("%d failed/skipped clip(s) from earlier runs were not retried: their source is unchanged "
                 "(fix or replace the file, or pass --force_preprocess)", result.not_retried)
    if result.total_frames:
        stages = ", ".join(f"{s} {result.stage_fps[s]:.0f}" for s in STAGES if s in result.stage_fps)
        log.info("%d frames in %.1f s (%.1f frames/s overall); frames/s per stage and worker: %s",
                 result.total_frames, result.wall_seconds, result.wall_fps, stages)
