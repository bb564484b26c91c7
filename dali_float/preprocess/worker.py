"""Clips -> features -> cache entries (`ClipProcessor.stream`, `run_tasks`), and the worker process around it.

Per clip (a whole video or a segment of one), every model runs once:

    probe -> T = frames at 25 fps (of the segment), source frame of each tick
    audio:   prepare_clip_audio -> wav2vec2 over the WHOLE clip -> (T, A)   (the whole-clip convention)
    emotion: classifier / file name / uniform -> (E,)
    framing: one crop for the clip (media.framing: face detection on sampled frames, or the centre)
    decode:  FrameDecoder (DALI mixed/NVDEC on a GPU, DALI CPU for VP8/VP9/MJPEG, PyAV otherwise),
             cropped to the clip's window and resized in the same DALI graph, on the device
    motion:  fixed batches of `frame_batch` frames, shared by consecutive clips (preprocess.batches)
             -> r (T, F), lambda (T, M), s of frame 0 (F,)

Threads: everything up to the decoded frames runs on decode lanes (`clips_in_flight` threads, a decoder
each), the motion encoder on the main thread, writing and committing on a writer thread
(_BackgroundWrites): the stages overlap, and memory stays bounded (ClipProcessor.frames_bound).

A clip that cannot be used becomes a `failed` (MediaError, or a bug: its one line) or `skipped`
(ClipSkipped) entry and the run goes on; only UsageError and EnvironmentProblem (a problem of the whole
run: bad weights, a full disk) escape. A failure whose cause lies outside the clip (permission denied,
out of memory, an I/O error) is recorded `transient`: the next run tries the clip again.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import logging
import os
import queue
import signal
import stat
import threading
import time
import traceback
from contextlib import contextmanager
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

from dali_float.cache import format as cf
from dali_float import media
from dali_float.cache.store import ShardWriter
from dali_float.config import Preset
from dali_float.errors import ClipSkipped, DaliFloatError, EnvironmentProblem, MediaError, UsageError
from dali_float.hashing import sha256_file
from dali_float.interrupts import Interrupts, Stopped
from dali_float.models import ModelSources, MotionEncoding, build_encoders, emotion_vector, encode_motion
from dali_float.config import MAX_CLIP_S, MAX_FRAME_PIXELS
from dali_float.preprocess.batches import ClipRows, MotionBatches
from dali_float.preprocess.options import clips_in_flight_for, frame_batch_for
from dali_float.preprocess.plan import ClipTask

log = logging.getLogger(__name__)

STAGES = ("framing", "decode", "motion", "audio", "emotion")

_HAND_POLL_S = 0.1  # a lane waiting for room in a handoff looks for a stop this often
_COMMIT_POLL_S = 0.25  # the writer thread, idle, sees whether a group commit is due this often
_LANE_JOIN_S = 5.0  # at the end of a stream, how long a lane may take to finish the decoder run it is in


# OS errors that say something about the machine at that moment, not about the clip.
_TRANSIENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EIO, errno.ENOMEM, errno.EAGAIN, errno.EBUSY,
                               errno.ETIMEDOUT, errno.ESTALE, errno.EMFILE, errno.ENFILE, errno.EINTR,
                               errno.ENOLCK, errno.ENETDOWN, errno.EHOSTDOWN, errno.ENXIO})


def is_transient(err: BaseException) -> bool:
    """Whether a clip's failure came from outside the clip: out of memory (host or CUDA), or an OS error
    such as permission denied or I/O, anywhere in the exception's chain of causes."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
            return True
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
        err = err.__cause__ or err.__context__
    return False


@dataclass(frozen=True)
class ClipLimits:
    """A clip larger than these fails before it is decoded (PreprocessOptions.max_frame_pixels / max_clip_s)."""

    max_frame_pixels: int = MAX_FRAME_PIXELS
    max_clip_s: float = MAX_CLIP_S

    def check(self, path: Path, width: int, height: int, duration_s: float) -> None:
        if width * height > self.max_frame_pixels:
            raise MediaError(f"{path}: frames of {width}x{height} ({width * height / 1e6:.1f} MP) exceed "
                             f"--max_frame_pixels {self.max_frame_pixels}; downscale the video or raise the limit")
        if duration_s > self.max_clip_s:
            raise MediaError(f"{path}: the clip lasts {duration_s:.1f} s, more than --max_clip_s {self.max_clip_s:g} "
                             f"(wav2vec2's memory grows with the length squared); cut it into --segments or "
                             f"raise the limit")


def one_line(err: BaseException) -> str:
    """An exception as one line: its message with whitespace collapsed (its type if it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


class Reporter(Protocol):
    """Where a worker says what it is doing (progress bars in-process, a pipe from a worker process).
    Called from several threads (decode lanes: start, decoded; the writer: done; the encoder: frames)."""

    def start(self, clip_id: str) -> None:
        """A lane starts preparing and decoding the clip: a death from now on may be its fault."""

    def frames(self, n: int) -> None: ...

    def decoded(self, clip_id: str) -> None:
        """Its lane is done with the clip (its frames wait for the encoder): a death is no longer its fault."""

    def done(self, entry: cf.ClipEntry) -> None: ...


@dataclass
class _InFlight:
    """A clip whose frames are queued for the motion encoder: all it has but the motion features."""

    task: ClipTask
    entry: cf.ClipEntry
    rows: ClipRows
    seconds: dict[str, float]
    audio: np.ndarray
    emotion: np.ndarray


class _Cancelled(Exception):
    """The stream was closed (a stop, the end of a run): a lane drops the clip it is on."""


class _Handoff:
    """One clip taken by the stream, between the lane that prepares it and the main thread: its decoded
    chunks in order, then ("end", _InFlight) or ("error", exception). At most `depth` chunks wait here:
    a lane ahead of the encoder stops there (bounded memory)."""

    def __init__(self, task: ClipTask, entry: cf.ClipEntry, depth: int) -> None:
        self.task, self.entry = task, entry
        self.rows = ClipRows(task.clip_id)
        self.events: queue.Queue = queue.Queue(maxsize=depth)
        self.dropped = False  # the main thread gave up on it (its encoder batch failed): the lane stops
        self.lane: _Lane | None = None
        self.inline: Iterator[tuple[str, object]] | None = None  # its events, made by the main thread (no lanes)


class _Lane:
    """One decode lane: a thread with a frame decoder, a framer and per-video memos of its own. It
    prepares the clips it is given (hash, probe, audio, emotion, framing, decode), in order, while the
    main thread runs the motion encoder on what the lanes decoded before."""

    def __init__(self, processor: "ClipProcessor", index: int) -> None:
        self.index = index
        self.decoder = media.FrameDecoder(processor.preset.motion.input_size, processor.device,
                                          num_threads=processor.num_threads, keep_sources=True)
        self.framer = media.ClipFramer(processor.crop, processor.device)
        self.hash_memo: tuple[tuple[str, int, int], str] | None = None  # segments of one video share its hash
        self.track = media.TrackMemo()  # ... and its audio track, decoded and resampled once
        self.video: str | None = None  # the video of its last clip (what the memos and the decoder hold)
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()  # _Handoff, or None: the stream ended
        self.assigned = 0  # clips given to it and not finished by the main thread
        self.last_path: str | None = None  # the video of the clip given to it last (the main thread's view)
        self.given = 0  # when it was given a clip last (ClipProcessor._given then)
        self.handed_frames = 0  # frames it decoded that the main thread has not taken yet
        self.error: BaseException | None = None  # what ended its thread outside any clip
        self._lock = threading.Lock()

    def count_handed(self, n: int) -> None:
        with self._lock:
            self.handed_frames += n

    @property
    def frames_held(self) -> int:
        return self.decoder.frames_held + self.handed_frames

    def moving_to(self, path: str | None) -> None:
        """Let go of the last video's track and demux when the next clip is of another video (bounds them
        to one video's; `plan` orders the segments of a video together, the stream keeps them on one lane)."""
        if path != self.video:
            self.track.clear()
            self.decoder.release()
            self.video = path

    def reset(self) -> None:
        """After a stream (its thread gone): no video held, nothing given, a fresh queue for the next."""
        self.moving_to(None)
        self.jobs, self.assigned, self.last_path, self.given, self.handed_frames = queue.SimpleQueue(), 0, None, 0, 0

    def content_hash(self, task: ClipTask) -> str:
        """sha256 of the clip's video; "" when unreadable (probing says why, in one line)."""
        key = (task.path, task.size_bytes, task.mtime_ns)
        if self.hash_memo is None or self.hash_memo[0] != key:
            try:
                self.hash_memo = (key, sha256_file(Path(task.path)))
            except OSError:
                return ""
        return self.hash_memo[1]


class ClipProcessor:
    """The encoders and the decode lanes of one worker, on one device, reused for every clip.

    frame_batch: frames per motion-encoder call. Every call has exactly this many frames, made of the
    frames of consecutive clips (preprocess.batches); only the last batch of a run is padded with stale
    frames whose outputs are dropped. The encoder always sees one shape (one cuDNN plan on a GPU), and a
    clip's features are the same bytes whichever clips share its batches.
    clips_in_flight: decode lanes (threads, each with its own FrameDecoder): that many clips are prepared
    and decoded at once (NVDEC has several engines: an H100 has 7), while the main thread runs the motion
    encoder on the frames decoded before. 0: no lane thread, the main thread prepares, decodes and encodes
    in turn. Default: 8 on a GPU, 0 on the CPU (both stages compute on the same cores there).
    """

    def __init__(self, preset: Preset, sources: ModelSources, device: str | torch.device, frame_batch: int | None,
                 num_threads: int | None = None, crop: str = "face", limits: ClipLimits = ClipLimits(),
                 clips_in_flight: int | None = None) -> None:
        self.preset = preset
        self.limits = limits
        self.device = torch.device(device)
        self.crop = crop
        self.num_threads = num_threads
        self.frame_batch = int(frame_batch or frame_batch_for(str(self.device)))
        self.encoders = build_encoders(preset, sources, self.device)
        self._given = 0  # clips given to lanes so far
        lanes = clips_in_flight_for(str(self.device)) if clips_in_flight is None else int(clips_in_flight)
        # 0: no lane thread; the main thread prepares, decodes and encodes in turn (one lane's state)
        self.threaded = lanes > 0
        self.lanes = [_Lane(self, i) for i in range(max(1, lanes))]
        # Chunks a lane may hand over before the main thread takes them (then it waits): enough for its
        # next decoder run to overlap the encoder, few enough to bound memory (frames_bound).
        self.handoff_chunks = 2
        size = preset.motion.input_size
        # One batch buffer for the whole run: decoded chunks are copied in (device to device on a GPU).
        self._batch = torch.zeros((self.frame_batch, 3, size, size), dtype=self.decoder.out_dtype,
                                  device=self.device)
        self.batches: MotionBatches | None = None  # those of the last stream (its counters)

    @property
    def decoder(self) -> media.FrameDecoder:
        """The first lane's decoder (the only one with clips_in_flight=1)."""
        return self.lanes[0].decoder

    @property
    def frames_bound(self) -> int:
        """The most decoded frames held at once (MotionBatches.peak_frames_held), whatever the clips:
        the batch, and per lane its decoder's run, the chunks handed over and the one it is handing."""
        per_lane = self.decoder.chunk_frames * (self.decoder.batch_chunks + self.handoff_chunks + 1)
        return self.frame_batch + len(self.lanes) * per_lane

    # -- clips, never raising for a problem of a clip ----------------------------------------------

    def outcome(self, task: ClipTask, on_frames: Callable[[int], None] | None = None
                ) -> tuple[cf.ClipEntry, cf.ClipFeatures | None]:
        """One clip alone: its entry and features (None for a failed or skipped clip), not written yet."""
        ((_, entry, features),) = self.stream([task], on_frames)
        return entry, features

    def stream(self, tasks: Iterable[ClipTask], on_frames: Callable[[int], None] | None = None,
               on_decoding: Callable[[ClipTask], None] | None = None,
               on_decoded: Callable[[ClipTask], None] | None = None
               ) -> Iterator[tuple[ClipTask, cf.ClipEntry, cf.ClipFeatures | None]]:
        """Process `tasks` in order, their frames sharing the motion encoder's batches; yield each clip's
        (task, entry, features or None) once it is finished, in the order of `tasks`: a failed clip when
        its lane gives up, a cached one when the batch holding its last rows has run (the last ones when
        `tasks` ends).

        Clips in flight: at most one more than there are lanes is taken and not yet all queued into the
        batches; a lane keeps the segments of one video (its memos and open decoder serve them all).
        on_decoding(task) / on_decoded(task): a lane starts / ends preparing and decoding a clip (called
        on the lane's thread: what a death then could be blamed on); on_frames(n): after each encoder
        call (n valid rows). A task marked `alone` is decoded with nothing else decoding meanwhile (a clip
        a dead worker was decoding among others: a second death names it).
        A clip that fails while its frames are queued takes its rows out of the batch (the others keep
        theirs). Closing the generator early (a stop) abandons the clips in flight.
        """
        batches = self.batches = MotionBatches(self._batch, self._encode_batch, on_frames,
                                               upstream_held=lambda: sum(lane.frames_held for lane in self.lanes))
        waiting: deque[_InFlight] = deque()  # queued clips, in order; they finish in that order
        taken: deque[_Handoff] = deque()  # clips given to lanes whose frames are not all queued, in order
        cancel = threading.Event()
        threads = [threading.Thread(target=self._lane_loop, args=(lane, lane.jobs, cancel, on_decoding, on_decoded),
                                    name=f"decode-lane{lane.index}", daemon=True)
                   for lane in self.lanes if self.threaded]
        for thread in threads:
            thread.start()
        source, exhausted, held = iter(tasks), False, None  # held: taken from `tasks`, not given to a lane
        most_taken = len(self.lanes) + 1 if self.threaded else 1
        try:
            while True:
                while not exhausted and len(taken) < most_taken:
                    task = held if held is not None else next(source, None)
                    if task is None:
                        exhausted = True
                        break
                    if taken and (task.alone or taken[-1].task.alone):
                        held = task  # decoded alone: it waits until the clips before it are all in
                        break
                    held = None
                    entry = task.new_entry(cf.STATUS_FAILED, fps=float(self.preset.timing.fps), crop=self.crop)
                    job = _Handoff(task, entry, self.handoff_chunks)
                    lane = self._lane_for(task)
                    lane.assigned += 1
                    job.lane = lane
                    if self.threaded:
                        lane.jobs.put(job)
                    else:  # inline: this thread makes the clip's events as it takes them
                        job.inline = self._events(lane, job, on_decoding, on_decoded)
                    taken.append(job)
                if not taken:
                    break
                job = taken[0]
                kind, value = next(job.inline) if job.inline is not None else self._next_event(job, threads)
                if kind == "chunk":
                    job.lane.count_handed(-len(value))
                    if job.rows.error is None:
                        if value.is_cuda:  # made on the lane's stream, read on this one
                            value.record_stream(torch.cuda.current_stream(value.device))
                        batches.add(job.rows, value)  # runs the encoder on each batch filled
                        if job.rows.error is not None:
                            job.dropped = True  # the lane stops at its next chunk
                    yield from self._ready(waiting)
                    continue
                taken.popleft()
                job.lane.assigned -= 1
                if job.inline is not None:
                    job.inline.close()  # past its last event: its lane is done with it (on_decoded)
                if kind == "end" and job.rows.error is None:
                    job.rows.closed = True
                    waiting.append(value)
                else:
                    err = job.rows.error if job.rows.error is not None else value
                    if isinstance(err, (UsageError, EnvironmentProblem)):
                        raise err  # wrong for every clip (no CUDA, bad weights, a full disk): stop the run
                    batches.drop(job.rows)
                    self._record_failure(job.task, job.entry, err)
                    yield job.task, job.entry, None
                yield from self._ready(waiting)
            batches.flush()  # the run's only padded batch
            while waiting:
                yield self._finish(waiting.popleft())
        finally:
            cancel.set()
            for job in taken:
                if job.inline is not None:
                    job.inline.close()
            for lane in self.lanes:
                lane.jobs.put(None)
            deadline = time.monotonic() + _LANE_JOIN_S
            for thread in threads:  # one in a decoder run ends it, then sees the cancel
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
            for i, thread in itertools.zip_longest(range(len(self.lanes)), threads):
                if thread is not None and thread.is_alive():  # still busy: it keeps that lane; a new one here
                    self.lanes[i] = _Lane(self, i)
                else:
                    self.lanes[i].reset()

    def _lane_for(self, task: ClipTask) -> _Lane:
        """The lane given the task's video last (its next segment: one demux, hash and track for all),
        else the least busy one."""
        lane = next((lane for lane in self.lanes if lane.last_path == task.path), None)
        if lane is None:  # of the least busy, the one given a clip longest ago (its video is likely done)
            lane = min(self.lanes, key=lambda lane: (lane.assigned, lane.given))
        self._given += 1
        lane.last_path, lane.given = task.path, self._given
        return lane

    def _lane_loop(self, lane: _Lane, jobs: queue.SimpleQueue, cancel: threading.Event, on_decoding,
                   on_decoded) -> None:
        """A lane's thread: its clips, one after the other, event by event into their handoffs. An error
        outside any clip (a bug, CUDA failing) ends it with `lane.error` set: the main thread raises it."""
        try:
            stream = None
            if self.device.type == "cuda":  # the current device and stream are per thread
                torch.cuda.set_device(self.device)
                stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                while True:
                    job = jobs.get()
                    if job is None or cancel.is_set():
                        return
                    events = self._events(lane, job, on_decoding, on_decoded)
                    try:
                        for event in events:
                            self._hand(job, cancel, event)
                    except _Cancelled:
                        events.close()
                        return
        except BaseException as err:  # noqa: BLE001 - told to the main thread, which waits for this lane
            lane.error = err

    def _next_event(self, job: _Handoff, threads: list[threading.Thread]) -> tuple[str, object]:
        """The next event of the clip the main thread is on; a RuntimeError if its lane's thread died."""
        while True:
            try:
                return job.events.get(timeout=_HAND_POLL_S)
            except queue.Empty:
                if not threads[job.lane.index].is_alive():
                    raise RuntimeError(f"decode lane {job.lane.index} stopped "
                                       f"({type(job.lane.error).__name__}: {job.lane.error})") from job.lane.error

    def _events(self, lane: _Lane, job: _Handoff, on_decoding, on_decoded) -> Iterator[tuple[str, object]]:
        """A clip's events as its lane makes them: ("chunk", frames)..., then ("end", _InFlight) or
        ("error", exception); a clip whose rows the main thread dropped stops at its next chunk. The lane
        is done with the clip (on_decoded) before its last event goes out."""
        decoding = False

        def last(event: tuple[str, object]) -> tuple[str, object]:
            nonlocal decoding
            if decoding and on_decoded is not None:
                decoding = False
                on_decoded(job.task)
            return event

        try:
            lane.moving_to(job.task.path)
            if on_decoding is not None:
                on_decoding(job.task)
            decoding = True
            prepared = self._prepare(lane, job)
            while True:
                try:
                    chunk = next(prepared)
                except StopIteration as done:
                    yield last(("end", done.value))
                    return
                lane.count_handed(len(chunk))
                yield "chunk", chunk
                if job.dropped:
                    prepared.close()
                    yield last(("error", job.rows.error))
                    return
        except Exception as err:  # noqa: BLE001 - the main thread decides what it means (a stop goes through)
            yield last(("error", err))

    @staticmethod
    def _hand(job: _Handoff, cancel: threading.Event, event: tuple) -> None:
        _put(job.events, event, lambda: _Cancelled() if cancel.is_set() else None)

    def _ready(self, waiting: deque[_InFlight]) -> Iterator[tuple[ClipTask, cf.ClipEntry, cf.ClipFeatures | None]]:
        """The queued clips whose rows have all run (or failed), in order."""
        while waiting and (waiting[0].rows.complete or waiting[0].rows.error is not None):
            yield self._finish(waiting.popleft())

    def _record_failure(self, task: ClipTask, entry: cf.ClipEntry, err: BaseException) -> None:
        """Fill a failed or skipped clip's entry from its exception (one line)."""
        if isinstance(err, ClipSkipped):
            entry.status, entry.reason = cf.STATUS_SKIPPED, one_line(err)
            return
        entry.status, entry.transient = cf.STATUS_FAILED, is_transient(err)
        if isinstance(err, MediaError):
            entry.reason = one_line(err) + (" (the next run tries it again)" if entry.transient else "")
        else:  # a bug must cost one clip, not the run
            log.debug("failed to process %s", task.clip_id, exc_info=err)
            why = "the next run tries it again" if entry.transient else "a bug; run with -v"
            entry.reason = f"{type(err).__name__}: {one_line(err)} ({why})"
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # e.g. out of memory: give the next clip its chance
        log.debug("failed %s: %s", task.clip_id, entry.reason)  # the summary lists every failure

    def _prepare(self, lane: _Lane, job: _Handoff) -> Iterator[torch.Tensor]:
        """Everything of the clip but the motion features, on its lane: yields its decoded chunks and
        returns the _InFlight clip (StopIteration's value)."""
        task, entry, rows = job.task, job.entry, job.rows
        timing = self.preset.timing
        path = Path(task.path)
        _check_regular_file(path)
        entry.content_hash = lane.content_hash(task)
        info = task.info if task.info is not None else media.probe_video(path)
        entry.source_fps = float(info.source_fps)
        entry.source_width, entry.source_height = info.width, info.height
        entry.source_rotation_deg = info.rotation_deg
        span = task.span_s or (0.0, info.duration_s)
        self.limits.check(path, info.width, info.height, min(span[1], info.duration_s) - span[0])
        indices = media.clip_frame_indices(info, timing.fps, task.span_s)
        t = len(indices)
        entry.num_frames = t
        if t < timing.window_frames:
            raise ClipSkipped(f"{t} frames at {timing.fps} fps ({t / timing.fps:.2f} s), fewer than one "
                              f"{timing.window_frames}-frame training window")
        if info.audio_source is not None:
            entry.audio_source = "track" if Path(info.audio_source) == Path(info.path) else info.audio_source.name
        seconds = dict.fromkeys(STAGES, 0.0)
        entry.stage_seconds = seconds

        # Audio first: it is cheap and fails a clip (no audio, bad track) before the costly decode.
        # wav2vec2 runs per clip, never across clips: padding clips of different lengths to one batch would
        # change each clip's features (its attention and normalisation would see the padding).
        with self._stage(seconds, "audio"):
            start_s = task.span_s[0] if task.span_s else 0.0
            # (T * 640,) float32, normalised; a segment slices its video's track, decoded once (TrackMemo)
            wave = media.prepare_clip_audio(info, t, timing, start_s, track=lane.track)
            audio = self.encoders.audio.encode(wave[None].to(self.device), t)[0]  # whole clip -> (T, A)
            if not bool(torch.isfinite(audio).all()):
                raise MediaError(f"{path}: wav2vec2 features hold non-finite values (silent or broken audio "
                                 f"track?); check the audio or remove the clip")
            audio_np = audio.cpu().numpy()  # one device -> host copy per clip
        with self._stage(seconds, "emotion"):
            emotion = emotion_vector(self.encoders, wave[None], info.path)
        entry.emotion_source = self.encoders.sources.emotion

        # One crop for the whole clip (a per-frame crop would erase the head motion the latents carry).
        with self._stage(seconds, "framing"):
            crop = lane.framer.decide(info, lane.decoder, indices, timing.fps, self.preset.motion.input_size)
        for name, value in crop.to_entry().items():
            setattr(entry, name, value)

        chunks = iter(lane.decoder.decode(info, indices, window=crop.window))
        decoded = 0
        while True:
            with self._stage(seconds, "decode"):
                chunk = next(chunks, None)  # (n, 3, S, S) on self.device; NVDEC frames stay on the GPU
            if chunk is None:
                break
            decoded += len(chunk)
            yield chunk
        if decoded != t:
            raise MediaError(f"{info.path}: the decoder returned {decoded} frames, {t} were asked for; "
                             f"re-encode the clip or remove it")
        entry.decoder = lane.decoder.last_decoder or ""
        return _InFlight(task, entry, rows, seconds, audio_np, emotion)

    def _finish(self, clip: _InFlight) -> tuple[ClipTask, cf.ClipEntry, cf.ClipFeatures | None]:
        """A queued clip whose rows have all run: its features, checked (or its failure)."""
        entry, path = clip.entry, clip.task.path
        try:
            if clip.rows.error is not None:
                raise clip.rows.error
            latents, coefficients, identity = clip.rows.outputs()
            # One device -> host copy per stream per clip (a sync point on the GPU).
            features = cf.ClipFeatures(motion_latents=latents.cpu().numpy(), audio_features=clip.audio,
                                       motion_coefficients=coefficients.cpu().numpy(),
                                       identity=identity.cpu().numpy(), emotion=clip.emotion)
            try:
                features.check(self.preset)  # finite, float16 range, shapes: a failed clip, not a bad file
            except ValueError as err:
                raise MediaError(f"{path}: features rejected: {err}") from None
        except (UsageError, EnvironmentProblem):
            raise
        except Exception as err:  # noqa: BLE001 - this clip only
            self._record_failure(clip.task, entry, err)
            return clip.task, entry, None
        clip.seconds["motion"] += clip.rows.motion_s
        entry.stage_seconds = {k: round(v, 6) for k, v in clip.seconds.items()}
        return clip.task, entry, features

    # -- helpers -------------------------------------------------------------------------------------

    def _encode_batch(self, batch: torch.Tensor) -> MotionEncoding:
        out = encode_motion(self.encoders.motion, batch)  # always (frame_batch, 3, S, S)
        if self.device.type == "cuda":
            # This thread's stream only (the lanes' work goes on): the batch's time is its own.
            torch.cuda.current_stream(self.device).synchronize()
        return out

    @contextmanager
    def _stage(self, seconds: dict[str, float], name: str) -> Iterator[None]:
        """Add the wall time of the block to seconds[name]; on a GPU, wait for its kernels first (on this
        thread's stream: without it, the time of one stage would be billed to the next)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            seconds[name] += time.perf_counter() - start


def _check_regular_file(path: Path) -> None:
    """MediaError for a missing path, anything but a regular file (a FIFO would block every reader) or a
    file this process cannot read (then transient: permissions are a matter of the moment)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MediaError(f"{path}: file not found (a dangling symlink, or removed during the run)") from None
    except OSError as err:
        raise MediaError(f"{path}: cannot stat the file ({one_line(err)})") from None
    if not stat.S_ISREG(mode):
        raise MediaError(f"{path}: not a regular file (a pipe, socket or device); replace it with the video file")
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as err:
        raise MediaError(f"{path}: cannot be read ({err.strerror}); fix its permissions") from None


def _put(into: queue.Queue, item: object, give_up: Callable[[], BaseException | None]) -> None:
    """Put `item` into a bounded queue, waiting for room, unless give_up() names an error (the other
    side stopped: a stream closed, a writer failed): then raise it."""
    while (err := give_up()) is None:
        try:
            into.put(item, timeout=_HAND_POLL_S)
            return
        except queue.Full:
            pass
    raise err


class _BackgroundWrites:
    """Finished clips written and committed by a thread of their own (ShardWriter: records, fsyncs, group
    commits, on time between writes too), so that none of it is on the encoder's path. At most `depth`
    finished clips wait here unwritten: with the clips being decoded, what a kill can cost."""

    def __init__(self, writer: ShardWriter, reporter: Reporter, depth: int = 2) -> None:
        self.writer, self.reporter = writer, reporter
        self.error: BaseException | None = None
        self._items: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="clip-writer", daemon=True)
        self._thread.start()

    def put(self, entry: cf.ClipEntry, features: cf.ClipFeatures | None) -> None:
        """Queue a finished clip (waits while `depth` are queued); raises what the writer raised."""
        _put(self._items, (entry, features), lambda: self.error)

    def close(self) -> None:
        """Write what is queued, then stop the thread; raises what the writer raised."""
        self._items.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            try:
                item = self._items.get(timeout=_COMMIT_POLL_S)
            except queue.Empty:
                item = ()
            if item is None:
                return
            if self.error is not None:
                continue  # the run stops: nothing more is written (the queue is only drained)
            try:
                if item:
                    self.reporter.done(self.writer.write(*item))
                else:
                    self.writer.commit_if_due()
            except BaseException as err:  # noqa: BLE001 - the main thread raises it
                self.error = err


def run_tasks(processor: ClipProcessor, writer: ShardWriter, tasks: Iterable[ClipTask], reporter: Reporter,
              stop: Interrupts | None = None) -> None:
    """Process `tasks` in order (any iterable: a list, or a worker process's TaskFeed: the parent's queue,
    read as clips are taken), their frames sharing the motion encoder's batches (ClipProcessor.stream);
    report each clip's start and end of decoding (from its lane), frames, and entry (written through
    `writer` by a thread of its own, committed in groups and on time: _BackgroundWrites).

    `stop`: a signal abandons the clips in flight (taken, not finished: their work is lost) and ends the
    loop; what was finished is written and committed before this returns. Records and commits are never
    cut by it (they are not on this thread)."""
    stop = stop or Interrupts()

    def on_frames(n: int) -> None:
        with stop.deferred():  # a message to the parent is never cut in the middle
            reporter.frames(n)

    def taken() -> Iterator[ClipTask]:
        for task in tasks:
            if stop.requested:
                raise Stopped(stop.signal_name)
            yield task

    def said(message: Callable[[], None]) -> None:
        """A message to the parent, never cut by a signal: deferred on the main thread (a lane's own thread
        is never interrupted, and must not touch `stop`'s state). A parent gone (a broken pipe) is not the
        clip's failure: the lifeline ends this process."""
        with contextlib.suppress(OSError):
            if threading.current_thread() is threading.main_thread():
                with stop.deferred():
                    message()
            else:
                message()

    writes = _BackgroundWrites(writer, reporter)
    finished = processor.stream(taken(), on_frames, lambda task: said(lambda: reporter.start(task.clip_id)),
                                lambda task: said(lambda: reporter.decoded(task.clip_id)))
    try:
        while True:
            try:
                with stop.abortable():
                    item = next(finished, None)
            except Stopped:
                log.info("%s: stopping; the clips in flight are left for the next run", stop.signal_name)
                return
            if item is None:
                return
            _, entry, features = item
            writes.put(entry, features)
    finally:
        try:
            writes.close()  # every finished clip written,
            writer.flush()  # and committed before the lanes are waited for (a stop has a deadline)
        finally:
            finished.close()  # the lanes let go of their clips


# --------------------------------------------------------------------------------------------------
# Worker processes (spawned: each builds its own encoders and decoder)

class PipeReporter:
    """A worker process's reporter: messages (kind, worker id, payload) on a pipe of its own to the parent.

    A pipe per worker, not a Queue they share: a Queue's writers share one lock, and a worker killed while
    it held it (the out-of-memory killer strikes at any moment) left every later worker unable to report,
    and the run waiting for ever. Its threads (main, lanes, writer) take turns (a lock): a message is
    never cut by another."""

    def __init__(self, conn, worker_id: int) -> None:
        self.conn, self.worker_id = conn, worker_id
        self._lock = threading.Lock()

    def send(self, kind: str, payload) -> None:
        with self._lock:
            self.conn.send((kind, self.worker_id, payload))

    def start(self, clip_id: str) -> None:
        self.send("start", clip_id)

    def frames(self, n: int) -> None:
        self.send("frames", n)

    def decoded(self, clip_id: str) -> None:
        self.send("decoded", clip_id)

    def done(self, entry: cf.ClipEntry) -> None:
        self.send("done", entry.to_dict())


class TaskFeed:
    """A worker process's clips, asked of the parent one at a time (its ClipQueue), as an iterable.

    The worker asks for `ahead` clips more than it has taken, so that the next one is here when it is
    taken (the parent's answer is a pipe round trip away, and it may be busy); with decode lanes none is
    needed (ClipProcessor.stream takes one more clip than it has lanes). Not more: a clip waiting in one
    worker is a clip another, free worker cannot take. The parent's answers ("next": a
    ClipTask, or None when none is left) come on a pipe of their own, drained by a thread: the parent's
    send never waits on a worker that is busy with a clip (a long video's frame times exceed a pipe's
    buffer). Waiting for an answer is abortable: a signal stops it with Stopped."""

    def __init__(self, tasks_in, reporter: PipeReporter, stop: Interrupts, ahead: int = 1) -> None:
        self.reporter, self.stop, self.ahead = reporter, stop, ahead
        self._answers: queue.SimpleQueue = queue.SimpleQueue()

        def drain() -> None:
            try:
                while True:
                    self._answers.put(tasks_in.recv())
            except (EOFError, OSError):
                # The parent is gone (the lifeline kills this process) or has stopped its workers (SIGTERM):
                # not "none left", which would end the loop and commit, and an orphan must not write.
                return

        threading.Thread(target=drain, name="task-feed", daemon=True).start()

    def __iter__(self) -> Iterator[ClipTask]:
        asked = 0
        while True:
            while asked < 1 + self.ahead:
                with self.stop.deferred():  # a message is never cut in the middle
                    self.reporter.send("next", None)
                asked += 1
            with self.stop.abortable():
                task = self._answers.get()
            asked -= 1
            if task is None:
                return
            yield task


_PR_SET_PDEATHSIG = 1


def die_with_parent(lifeline) -> None:
    """Make this worker die with the process that started it: the kernel sends it SIGTERM when its parent
    (the fork server, which exits when its owner does, and dies of the SIGTERM a job scheduler sends every
    process of the job) dies, which stops it as the run's own SIGTERM does (its finished clips committed);
    and a thread watches `lifeline`, a pipe whose other end only the owner holds: end-of-file means the owner
    is gone, however it died, and the worker is killed on the spot."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the lifeline alone
        pass

    def watch() -> None:
        try:
            lifeline.poll(None)  # returns on end-of-file: the owner closed it or died
        except (EOFError, OSError):
            pass
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up: an orphan must not write another byte

    if lifeline is not None:
        threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_main(worker_id: int, preset: Preset, sources: ModelSources, device: str, frame_batch: int | None,
                crop: str, num_threads: int, root: str, writer: str, tasks_in, outbox,
                log_level: int, lifeline=None, limits: ClipLimits = ClipLimits(),
                clips_in_flight: int | None = None) -> None:
    """Entry point of a worker process: process the clips the parent hands out (asked for on `outbox`, its
    pipe, answered on `tasks_in`: TaskFeed) until it has none left, then send ("exit", id) through `outbox`.

    A DaliFloatError (bad weights, no CUDA, a full disk) is sent as ("fatal", id, (error class,
    message)); the parent stops every worker and raises it. Records and rows are written here (shards
    and journal `writer`); the index is the parent's. SIGTERM or SIGINT (the parent's, a job scheduler's,
    a terminal's) abandons the clip in flight, commits the finished ones and exits ("exit" as well).
    """
    stop = Interrupts().__enter__()  # first: a signal from here on is a request, never a traceback
    die_with_parent(lifeline)
    reporter = PipeReporter(outbox, worker_id)
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname).1s worker{worker_id} %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("transformers", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Each of N workers gets its share of the cores (torch intra-op threads and DALI threads).
    torch.set_num_threads(num_threads)
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        with stop.abortable():  # nothing to save yet
            processor = ClipProcessor(preset, sources, device, frame_batch, num_threads=num_threads, crop=crop,
                                      limits=limits, clips_in_flight=clips_in_flight)
        with ShardWriter(cf.CacheLayout(Path(root)), preset, writer) as shard_writer:
            # With lanes no request ahead: the stream takes a clip as a lane can start it (clips_in_flight
            # + 1 taken) while the lanes still have work, so the round trip is hidden. Without, one ahead.
            feed = TaskFeed(tasks_in, reporter, stop, ahead=0 if processor.threaded else 1)
            run_tasks(processor, shard_writer, feed, reporter, stop)
    except Stopped:
        pass
    except DaliFloatError as err:
        reporter.send("fatal", (type(err).__name__, str(err)))
        return
    except BaseException as err:  # a bug outside any clip: the parent shows it and stops
        reporter.send("fatal", ("bug", f"{type(err).__name__}: {one_line(err)}\n{traceback.format_exc()}"))
        return
    reporter.send("exit", None)
