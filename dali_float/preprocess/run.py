"""`run_preprocessing`: recover the cache, plan, process the pending clips, merge the journals, report.

Order of a run (the same on every torchrun rank):

    1. rank 0: create the folder, merge the journals and cut the shard tails a killed run left,
       check the cheap invariants, update touched rows (the index every rank plans from) -- barrier
    2. every rank: reconcile sources with the index, make tasks (stable uids), probe them,
       take its share (deterministic split by duration), run it on its local workers, which take
       its clips from one queue as each becomes free (plan.ClipQueue: longest video first)
                                                                             -- barrier
    3. rank 0: merge the journals, drop rows of vanished sources, export the training view
                                                                             -- barrier (readers may open the cache)

Every worker process writes its own shards and journal (cache_store.ShardWriter); only rank 0's
parent process writes index.sqlite and the training view, holding the cache's writer lock
(cache.lock) from before step 1 to after step 3.

Clips always run in worker processes that the parent watches (one with `--workers 1`). The parent hands
them out one at a time to whichever worker asks (worker.TaskFeed), so a worker stuck on a long clip does
not hold a list of others while its neighbours run dry. A clip that kills its process (the out-of-memory
killer, a decoder crash) costs that clip only. It is tried once
more in a fresh worker, and recorded `failed` with the signal if it kills that one too. Workers die
with their parent (PR_SET_PDEATHSIG and a pipe they watch), and are started from a fork server
(multiprocessing "forkserver"), never forked from this process, which may run threads (DALI, OpenMP).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch

from dali_float.cache import format as cf
from dali_float import errors, media
from dali_float.cache import view as cache_view
from dali_float.cache.index import ClipIndex, read_entries
from dali_float.cache.lock import WriterLock
from dali_float.cache.store import ShardWriter, dead_bytes, trim_shards, writer_name
from dali_float.cli import cores_per_local_rank, this_command
from dali_float.errors import Interrupted, NoSourcesError, UsageError
from dali_float.interrupts import Interrupts, Stopped
from dali_float.paths import printable
from dali_float.preprocess import plan
from dali_float.preprocess.options import (PreprocessOptions, PreprocessResult, cache_identity, new_header,
                                           preprocess_command, rank_and_world, worker_devices)
from dali_float.forkserver import worker_context
from dali_float.preprocess.worker import STAGES, ClipLimits, worker_main
from dali_float.progress import progress_bar, redirect_logging

log = logging.getLogger(__name__)

# A rank may wait for the others for as long as preprocessing a large data set takes.
_BARRIER_TIMEOUT = datetime.timedelta(days=7)
_POLL_S = 0.5  # how often the parent checks that its workers are alive while none reports
_BARREN_DEATHS = 3  # a worker slot whose processes die this often in a row, none finishing a clip, stops the run
_STOP_WAIT_S = 20.0  # how long stopped workers get to commit and exit (Slurm's KillWait is 30 s by default)


def run_preprocessing(options: PreprocessOptions) -> PreprocessResult:
    """Bring the cache of (preset, weights) up to date with the videos under `options.data_root`.

    A quick no-op ("N up to date") when nothing changed: nothing is built, nothing rewritten.
    Raises UsageError / CheckpointError (exit 2) for a bad path, GPU list or weights; a clip that
    cannot be used only becomes a failed or skipped entry (result.exit_code 1 if any failed).

    SIGINT or SIGTERM stops the run: before any clip is processed at once; during the work, the workers
    stop (the clips in flight are lost, every finished one is committed), the journals are merged and the
    training view exported as at the end of a run. Then Interrupted (exit 130 / 143), one line saying what
    is saved and the command to continue.
    """
    with Interrupts() as stop:
        try:
            result, done, pending = _run(options, stop)
        except Stopped:
            raise Interrupted(f"interrupted by {stop.signal_name} before any clip was processed: nothing was "
                              f"changed; continue with: {this_command()}", stop.exit_code) from None
    if stop.requested:
        cached = result.counts.get(cf.STATUS_CACHED, 0)
        raise Interrupted(f"interrupted by {stop.signal_name}: the {done} clip(s) this run finished are saved (the "
                          f"cache holds {cached} cached clip(s)); {pending} clip(s) are left; continue with: "
                          f"{this_command()}", stop.exit_code)
    return result


def _run(options: PreprocessOptions, stop: Interrupts) -> tuple[PreprocessResult, int, int]:
    """run_preprocessing's work: (result, clips this rank finished, clips of its share left when stopped)."""
    start = time.perf_counter()
    preset = options.preset
    devices = worker_devices(options)  # before anything slow: --gpus this machine lacks is exit 2 at once
    rank, world = rank_and_world()
    if Path(options.cache_dir).exists() and not Path(options.cache_dir).is_dir():
        raise UsageError(f"--cache_dir {options.cache_dir} is a file, not a folder")
    fp, model_ids, framing = cache_identity(preset, options.sources, options.crop)
    layout = cf.CacheLayout(cf.cache_root(options.cache_dir, preset, fp))
    if options.read_only_ok and _read_only(layout):
        return _use_as_it_is(fp, layout, time.perf_counter() - start), 0, 0
    # UsageError when the folder (or the segments file) does not exist or a segment row is malformed;
    # EnvironmentProblem when a folder cannot be listed (before anything is changed or dropped)
    with stop.abortable():  # listing a million files takes a while; nothing is written yet
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

    with _process_group(world) as barrier, contextlib.ExitStack() as held:
        if rank == 0:  # the one writer of index.sqlite holds the cache's writer lock until the view is out
            held.enter_context(WriterLock(layout.root, options.lock_timeout_s))
            snapshot, rec = plan.recover(layout, header, sources, options.force, options.retry_failed)
        barrier()
        if rank != 0:
            snapshot = plan.Snapshot.read(layout, options.retry_failed)
            rec = plan.reconcile(sources, snapshot.rows, snapshot.damaged, options.force, snapshot.retry)
        tasks, share = plan.make_tasks(sources, rec, snapshot), []
        if tasks:
            try:
                with stop.abortable():  # probing writes nothing: a signal ends it at once
                    plan.probe_tasks(tasks, progress=options.progress and rank == 0)
                share = plan.balance(tasks, world)[rank]
            except Stopped:
                pass  # nothing processed; the view is still exported below (recovery may have merged journals)
            if world > 1:
                log.info("rank %d of %d: %d of %d pending clip(s)", rank, world, len(share), len(tasks))
            _run_share(share, devices, options, layout, stats, rank, stop)
        barrier()
        if rank == 0:
            _finish(layout, rec, preset, fp, options)
        barrier()  # the index and the training view are on disk before any rank returns (and opens the cache)
        with ClipIndex.open_readonly(layout) as index:
            result = _result(fp, layout, index, rec, stats, time.perf_counter() - start, options.drop_gone)

    if rank == 0:
        _log_summary(result, rec, len(tasks), options)
    done = sum(stats.processed.values())
    return result, done, max(0, len(share) - done)


def _read_only(layout: cf.CacheLayout) -> bool:
    """The cache exists, holds a training view, and this process cannot write its folder."""
    if not layout.training_path.exists():
        return False
    try:
        read_only_mount = bool(os.statvfs(layout.root).f_flag & os.ST_RDONLY)
    except OSError:
        return False
    return read_only_mount or not os.access(layout.root, os.W_OK)


def _use_as_it_is(fp: str, layout: cf.CacheLayout, wall_s: float) -> PreprocessResult:
    """A cache that cannot be written, for a reader that may use it as it is (train.py)."""
    log.warning("the feature cache %s cannot be written (a read-only mount or no permission): using it as it is, "
                "without checking it against the videos", layout.root)
    with ClipIndex.open_readonly(layout) as index:
        return _result(fp, layout, index, plan.Reconciliation(), _RunStats(), wall_s, False)


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
    with ClipIndex.open_readonly(layout) as index:
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
    """Two progress bars (clips; frames with frames/s) fed by every worker of this process."""

    def __init__(self, tasks: list[plan.ClipTask], fps: int, enabled: bool, stats: _RunStats) -> None:
        self.stats = stats
        self.expected = {t.clip_id: media.num_frames_at_fps(t.duration_s, fps) for t in tasks}
        self.reported: dict[str, int] = defaultdict(int)
        self.current: dict[int, str] = {}
        self.clips = progress_bar(total=len(tasks), desc="clips", unit="clip", position=0, disable=not enabled)
        self.frames_bar = progress_bar(total=sum(self.expected.values()), desc="frames", unit="frame", position=1,
                                       disable=not enabled, smoothing=0.1)

    def start(self, worker: int, clip_id: str) -> None:
        self.current[worker] = clip_id
        self.clips.set_postfix_str(clip_id[-40:], refresh=False)

    def frames(self, worker: int, n: int) -> None:
        self.reported[self.current.get(worker, "")] += n
        self.frames_bar.update(n)

    def done(self, worker: int, entry: cf.ClipEntry) -> None:
        if self.current.get(worker) == entry.clip_id:  # a worker may have started the next clip already
            del self.current[worker]
        self.stats.add(entry)
        if entry.status != cf.STATUS_CACHED:  # its frames will never come: shrink the frame total
            self.frames_bar.total -= max(0, self.expected.get(entry.clip_id, 0) - self.reported[entry.clip_id])
            self.frames_bar.refresh()
        self.clips.update(1)

    def close(self) -> None:
        self.frames_bar.close()
        self.clips.close()


def _run_share(share: list[plan.ClipTask], devices: list[str], options: PreprocessOptions,
               layout: cf.CacheLayout, stats: _RunStats, rank: int, stop: Interrupts) -> None:
    """Process this rank's clips in worker processes (one per device entry, at most one per clip)."""
    if not share or stop.requested:
        return
    n = min(len(devices), len(share))
    progress = _Progress(share, options.preset.timing.fps, options.progress, stats)
    try:
        with redirect_logging():
            _run_processes(share, devices[:n], options, layout, progress, rank, stop)
    finally:
        progress.close()


class _Worker:
    """One worker slot: the clips handed to its process and not done yet, its process, writer and pipes."""

    def __init__(self, slot: int):
        self.slot = slot
        self.remaining: dict[str, plan.ClipTask] = {}  # handed out, not reported done (in the order handed out)
        self.proc: mp.process.BaseProcess | None = None
        self.writer = ""  # the current process's shard writer / journal name
        self.lifeline = None  # our end of the pipe whose closing tells the worker we are gone
        self.inbox = None  # our end of the pipe its process reports on (one per process: see worker.PipeReporter)
        self.outbox = None  # our end of the pipe its clips go out on (worker.TaskFeed)
        self.closed = False  # its process closed that pipe (it is exiting or dead)
        # The clips its process is preparing or decoding (a lane each), in the order they started: what a
        # death of the process may be blamed on.
        self.decoding: dict[str, None] = {}
        self.finished = 0  # clips its current process finished
        self.started = False  # its current process started a clip
        self.barren_deaths = 0  # its processes that died in a row without finishing a clip


def _run_processes(tasks: list[plan.ClipTask], devices: list[str], options: PreprocessOptions,
                   layout: cf.CacheLayout, progress: _Progress, rank: int, stop: Interrupts) -> None:
    """One worker process per device entry, taking `tasks` from one queue (plan.ClipQueue) as each asks;
    requests, progress and entries come back on a pipe of each process, clips go out on another.

    A worker that dies (a decoder crash, the OOM killer) costs at most the clips it had in flight: the
    clips its journal holds are done; those it was decoding (one per lane: --clips_in_flight) are each
    tried once more, marked to be decoded alone by whichever worker takes them, and one that kills that
    one too is recorded failed (with the signal); the clips it had been handed and not started go back
    to its slot, after them, first in line for the fresh process that takes its place. A death while no
    clip was being decoded (writing, committing) is no clip's fault; _BARREN_DEATHS in a row stop the run.
    A stop (`stop.requested`: SIGINT, SIGTERM) sends every worker SIGTERM: each abandons its clip in flight,
    commits the clips it finished and exits; none is started again. One that has not gone after
    _STOP_WAIT_S is killed (what it had not committed is lost, as with any kill).
    """
    ctx = worker_context()
    # Each worker gets its share of the threads this process may use (torch's setting: torchrun sets one
    # per rank), so that a clip's features do not depend on how many workers share the machine.
    threads = max(1, min(torch.get_num_threads(), cores_per_local_rank()) // len(devices))
    level = logging.getLogger("dali_float").getEffectiveLevel()
    queue = plan.ClipQueue(tasks)
    slots = [_Worker(w) for w in range(len(devices))]
    deaths: dict[str, int] = defaultdict(int)  # clip id -> worker processes it was on when they died
    running: dict[int, _Worker] = {}

    def launch(slot: _Worker) -> None:
        slot.writer = writer_name(f"r{rank}w{slot.slot}")
        watch, slot.lifeline = ctx.Pipe(duplex=False)
        if slot.inbox is not None:
            slot.inbox.close()  # the dead process's
        slot.inbox, outbox = ctx.Pipe(duplex=False)
        if slot.outbox is not None:
            slot.outbox.close()
        tasks_in, slot.outbox = ctx.Pipe(duplex=False)
        limits = ClipLimits(options.max_frame_pixels, options.max_clip_s)
        slot.proc = ctx.Process(target=worker_main, name=f"preprocess-worker{slot.slot}", daemon=True,
                                args=(slot.slot, options.preset, options.sources, devices[slot.slot],
                                      options.frame_batch, options.crop, threads, str(layout.root), slot.writer,
                                      tasks_in, outbox, level, watch, limits, options.clips_in_flight))
        slot.decoding, slot.finished, slot.closed, slot.started = {}, 0, False, False
        slot.proc.start()
        watch.close()  # the child has its copy; ours would keep the pipe open after we die
        outbox.close()  # the same: its end of file must mean that the worker is gone
        tasks_in.close()
        running[slot.slot] = slot

    def hand_out(slot: _Worker) -> None:
        """Answer the slot's request: its next clip (recorded as its own before it is sent), or None."""
        task = None if stop.requested else queue.take(slot.slot)
        if task is not None:
            slot.remaining[task.clip_id] = task
            log.debug("worker %d gets %s (%.2f s)", slot.slot, printable(task.clip_id), task.duration_s)
        try:
            slot.outbox.send(task)
        except OSError:  # it died meanwhile (BrokenPipeError): the clip is its slot's, given back with the rest
            pass

    def handle(kind: str, w: int, payload) -> None:
        slot = slots[w]
        if kind == "next":
            hand_out(slot)
        elif kind == "start":
            slot.decoding[payload] = None
            slot.started = True
            log.debug("worker %d (pid %d) on %s", w, slot.proc.pid, printable(payload))
            progress.start(w, payload)
        elif kind == "frames":
            progress.frames(w, payload)
        elif kind == "decoded":  # its lane is done with the clip: a death now is not its fault
            slot.decoding.pop(payload, None)
            log.debug("worker %d (pid %d) decoded %s", w, slot.proc.pid, printable(payload))
        elif kind == "done":
            entry = cf.ClipEntry.from_dict(payload)
            slot.remaining.pop(entry.clip_id, None)
            slot.decoding.pop(entry.clip_id, None)
            slot.finished += 1
            progress.done(w, entry)
        elif kind == "exit":
            running.pop(w).proc.join()
        elif kind == "fatal":
            error, message = payload
            raise (errors.by_name(error) or RuntimeError)(message)

    def receive(slot: _Worker) -> None:
        """One message of the slot's process, or note that it closed its pipe (the rest of a message cut by
        its death is dropped with it)."""
        try:
            message = slot.inbox.recv()
        except (EOFError, OSError):
            slot.closed = True
            return
        handle(*message)

    for slot in slots:
        launch(slot)
    parent: ShardWriter | None = None  # records the clips that killed their worker twice
    stopping_since: float | None = None
    try:
        while running:
            if stop.requested and stopping_since is None:
                stopping_since = time.monotonic()
                log.warning("%s: stopping the workers; every clip they finished is kept, the %d in flight are left "
                            "for the next run", stop.signal_name, sum(len(s.remaining) for s in running.values()))
                for slot in running.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(slot.proc.pid, signal.SIGTERM)
            if stopping_since is not None and time.monotonic() - stopping_since > _STOP_WAIT_S:
                log.warning("%d worker(s) did not stop within %.0f s: killed", len(running), _STOP_WAIT_S)
                for slot in running.values():
                    slot.proc.kill()
                    slot.proc.join(timeout=10)
                    _collect_committed(slot, layout, progress)
                running.clear()
                break
            open_inboxes = {s.inbox: s for s in running.values() if not s.closed}
            if open_inboxes:
                for conn in mp_connection.wait(list(open_inboxes), timeout=_POLL_S):
                    if open_inboxes[conn].slot in running:
                        receive(open_inboxes[conn])
            else:
                time.sleep(_POLL_S)
            for slot in [s for s in running.values() if not s.proc.is_alive()]:
                # Messages it sent before dying may still be in the pipe: take them first.
                while slot.slot in running and not slot.closed and slot.inbox.poll():
                    receive(slot)
                if slot.slot not in running:  # its "exit" was among them
                    continue
                _collect_committed(slot, layout, progress)  # finished, but its "done" was lost with it
                if stopping_since is not None:  # stopped (or died) while stopping: its clips wait for the next run
                    del running[slot.slot]
                    continue
                suspects = [c for c in slot.decoding if c in slot.remaining]  # not those its journal holds
                slot.barren_deaths = 0 if slot.finished else slot.barren_deaths + 1
                if (not slot.started or slot.barren_deaths >= _BARREN_DEATHS) and (slot.remaining or queue):
                    # The machine or a bug, not one clip (none kept dying alone): one line, exit 3.
                    raise errors.EnvironmentProblem(
                        f"preprocessing worker {slot.slot} died ({_how(slot.proc)}) "
                        + ("before processing any clip" if not slot.started else
                           f"{slot.barren_deaths} times in a row without finishing a clip")
                        + "; the clips it finished are kept; run with --workers 1 -v to see why")
                for clip_id in suspects:
                    deaths[clip_id] += 1
                    if deaths[clip_id] >= 2:  # the second time it was decoded alone: it is the cause
                        if parent is None:
                            parent = ShardWriter(layout, options.preset, writer_name(f"r{rank}parent"),
                                                 group_clips=1)
                        _worker_died(slot, clip_id, parent, progress)
                retried = [c for c in suspects if c in slot.remaining]
                for clip_id in retried:  # wherever it goes next, nothing decodes beside it
                    slot.remaining[clip_id] = dataclasses.replace(slot.remaining[clip_id], alone=True)
                if retried:
                    log.warning("worker %d died (%s) on %s; trying %s once more in a fresh worker, alone",
                                slot.slot, _how(slot.proc), ", ".join(retried),
                                "that clip" if len(retried) == 1 else "each of them")
                elif not suspects and (slot.remaining or queue):
                    log.warning("worker %d died (%s) between clips; a fresh worker takes its place", slot.slot,
                                _how(slot.proc))
                del running[slot.slot]
                # The clips it was decoding first (each decoded alone by whichever worker takes it).
                order = retried + [c for c in slot.remaining if c not in retried]
                queue.give_back(slot.slot, [slot.remaining[c] for c in order])
                slot.remaining.clear()
                if queue:
                    launch(slot)  # they go first to it, then it asks the queue as the others do
    finally:
        for slot in running.values():
            slot.proc.terminate()
        for slot in running.values():
            slot.proc.join(timeout=10)
        for slot in slots:
            if slot.lifeline is not None:
                slot.lifeline.close()
            if slot.inbox is not None:
                slot.inbox.close()
            if slot.outbox is not None:
                slot.outbox.close()
        if parent is not None:
            parent.close()


def _collect_committed(slot: _Worker, layout: cf.CacheLayout, progress: _Progress) -> None:
    """Clips of a dead worker that its journal holds: they are done (it died after committing them)."""
    path = layout.journal_path(slot.writer)
    if not path.exists():
        return
    collected = []
    for entry in read_entries(path, list(slot.remaining)):
        if slot.remaining.pop(entry.clip_id, None) is not None:
            slot.finished += 1
            progress.done(slot.slot, entry)
            collected.append(printable(entry.clip_id))
    if collected:
        log.debug("worker %d had committed %s before it died", slot.slot, " ".join(collected))


def _how(proc) -> str:
    code = proc.exitcode
    if code is not None and code < 0:
        try:
            return f"signal {-code}: {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _worker_died(slot: _Worker, clip_id: str, writer: ShardWriter, progress: _Progress) -> None:
    """Record the clip that killed its worker twice as failed (written here: the worker cannot).

    Killed by SIGKILL (the out-of-memory killer's signal) it is retried by the next run (`transient`):
    memory is a matter of the machine; any other death (a crash in a decoder) is the clip's."""
    how = _how(slot.proc)
    task = slot.remaining.pop(clip_id)
    oom = slot.proc.exitcode == -signal.SIGKILL
    hint = ("killed: out of memory? the next run tries it again; lower --max_clip_s or free memory" if oom
            else "re-encode the file or remove it")
    entry = task.new_entry(cf.STATUS_FAILED, transient=oom,
                           reason=f"the worker process died twice while processing this clip ({how}); {hint}")
    log.warning("worker %d died again (%s) on %s: recorded as failed; the run goes on", slot.slot, how, clip_id)
    progress.done(slot.slot, writer.write(entry))


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


def _finish(layout: cf.CacheLayout, rec: plan.Reconciliation, preset, fp: str, options: PreprocessOptions) -> None:
    """Merge the writers' journals, drop the rows of vanished sources (`options.drop_gone`), export the training
    view, then cut what is dead (only when the index changed: a rerun with nothing to do writes nothing).
    The view goes out before any byte is cut: a reader finds the old generation (leased, kept) or the new."""
    drop_gone = options.drop_gone
    command = lambda sub="": preprocess_command(options.data_root, options.cache_dir, preset.name,  # noqa: E731
                                                options.crop, options.segments, options.sources, sub)
    with ClipIndex(layout) as index:
        index.merge_journals()
        if rec.gone and drop_gone:
            index.delete(rec.gone)
        elif rec.gone:
            log.info("%d clip(s) whose source is gone are kept (training never drops features); `%s` drops them",
                     len(rec.gone), command())
        exported = cache_view.export(layout, index, preset, fp)
        trim_shards(layout, index)  # records of dropped clips at a shard's end: cut now, not next run
        if not exported:
            return
        dead = sum(dead_bytes(layout, index).values())
        if dead > 0.25 * sum(p.stat().st_size for p in layout.shard_files()):
            log.info("%.1f MB of the shards hold records of re-done or removed clips: `%s` reclaims them",
                     dead / 1e6, command("compact"))


def _result(fp: str, layout: cf.CacheLayout, index: ClipIndex, rec: plan.Reconciliation, stats: _RunStats,
            wall_s: float, dropped: bool) -> PreprocessResult:
    counts = index.counts()
    fresh = set(rec.pending)
    failures = [(e.clip_id, e.reason) for e in index.entries(cf.STATUS_FAILED)]
    skipped = [(e.clip_id, e.reason) for e in index.entries(cf.STATUS_SKIPPED)]
    kept_bad = [c for c, _ in failures + skipped if c not in fresh]
    return PreprocessResult(
        fingerprint=fp, cache_root=layout.root, counts=counts, processed=dict(stats.processed),
        up_to_date=len(rec.up_to_date), removed=len(rec.gone) if dropped else 0,
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
        log.info("skipped %s: %s", printable(clip_id), printable(reason))
    for clip_id, reason in result.failures:
        log.warning("failed %s: %s", printable(clip_id), printable(reason))
    if result.not_retried:
        log.info("%d failed/skipped clip(s) from earlier runs were not retried: their source is unchanged "
                 "(fix or replace the file, or pass --retry_failed)", result.not_retried)
    if result.total_frames:
        stages = ", ".join(f"{s} {result.stage_fps[s]:.0f}" for s in STAGES if s in result.stage_fps)
        log.info("%d frames in %.1f s (%.1f frames/s overall); frames/s per stage and worker: %s",
                 result.total_frames, result.wall_seconds, result.wall_fps, stages)
