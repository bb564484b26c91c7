"""One clip -> features -> cache entry (`ClipProcessor.process`), and the worker process around it.

Per clip (a whole video or a segment of one), every model runs once:

    probe -> T = frames at 25 fps (of the segment), source frame of each tick
    audio:   prepare_clip_audio -> wav2vec2 over the WHOLE clip -> (T, A)   (the whole-clip convention)
    emotion: classifier / file name / uniform -> (E,)
    framing: one crop for the clip (media.framing: face detection on sampled frames, or the centre)
    decode:  FrameDecoder (DALI mixed/NVDEC on a GPU, DALI CPU for VP8/VP9/MJPEG, PyAV otherwise),
             cropped to the clip's window and resized in the same DALI graph, on the device
    motion:  fixed batches of `frame_batch` frames -> r (T, F), lambda (T, M), s of frame 0 (F,)

A clip that cannot be used becomes a `failed` (MediaError, or a bug: its one line) or `skipped`
(ClipSkipped) entry and the run goes on; only UsageError and EnvironmentProblem (a problem of the whole
run: bad weights, a full disk) escape. A failure whose cause lies outside the clip (permission denied,
out of memory, an I/O error) is recorded `transient`: the next run tries the clip again.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import signal
import stat
import threading
import time
import traceback
from contextlib import contextmanager
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
from dali_float.models import ModelSources, build_encoders, emotion_vector, encode_motion
from dali_float.config import MAX_CLIP_S, MAX_FRAME_PIXELS
from dali_float.preprocess.options import frame_batch_for
from dali_float.preprocess.plan import ClipTask

log = logging.getLogger(__name__)

STAGES = ("framing", "decode", "motion", "audio", "emotion")


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
    """Where a worker says what it is doing (progress bars in-process, a pipe from a worker process)."""

    def start(self, clip_id: str) -> None: ...

    def frames(self, n: int) -> None: ...

    def done(self, entry: cf.ClipEntry) -> None: ...


class ClipProcessor:
    """The encoders and the frame decoder of one worker, on one device, reused for every clip.

    frame_batch: frames per motion-encoder call. Every call has exactly this many frames (the last
    batch of a clip is padded with stale frames whose outputs are dropped), so the encoder always
    sees one shape: one cuDNN plan on a GPU, and batch-independent numerics across clips.
    """

    def __init__(self, preset: Preset, sources: ModelSources, device: str | torch.device, frame_batch: int | None,
                 num_threads: int | None = None, crop: str = "face", limits: ClipLimits = ClipLimits()) -> None:
        self.preset = preset
        self.limits = limits
        self.device = torch.device(device)
        self.frame_batch = int(frame_batch or frame_batch_for(str(self.device)))
        self.encoders = build_encoders(preset, sources, self.device)
        self.decoder = media.FrameDecoder(preset.motion.input_size, self.device, num_threads=num_threads)
        self.framer = media.ClipFramer(crop, self.device)
        self._hash_memo: tuple[tuple[str, int, int], str] | None = None  # segments of one video share its hash
        size = preset.motion.input_size
        # One batch buffer for the whole run: decoded chunks are copied in (device to device on a GPU).
        self._batch = torch.zeros((self.frame_batch, 3, size, size), dtype=self.decoder.out_dtype,
                                  device=self.device)

    # -- one clip, never raising for a problem of the clip ---------------------------------------

    def process(self, task: ClipTask, writer: ShardWriter,
                on_frames: Callable[[int], None] | None = None) -> cf.ClipEntry:
        """Compute the clip's features and write them (or its failed/skipped entry); returns the entry."""
        return writer.write(*self.outcome(task, on_frames))

    def outcome(self, task: ClipTask, on_frames: Callable[[int], None] | None = None
                ) -> tuple[cf.ClipEntry, cf.ClipFeatures | None]:
        """The clip's entry and features (None for a failed or skipped clip), not written yet."""
        entry = task.new_entry(cf.STATUS_FAILED, fps=float(self.preset.timing.fps), crop=self.framer.crop)
        try:
            return entry, self._compute(task, entry, on_frames)
        except ClipSkipped as err:
            entry.status, entry.reason = cf.STATUS_SKIPPED, one_line(err)
        except MediaError as err:
            entry.status, entry.reason, entry.transient = cf.STATUS_FAILED, one_line(err), is_transient(err)
            if entry.transient:
                entry.reason += " (the next run tries it again)"
            log.debug("failed %s: %s", task.clip_id, entry.reason)  # the summary lists every failure
        except (UsageError, EnvironmentProblem):
            raise  # wrong for every clip (no CUDA, bad weights, a full disk): stop the run
        except Exception as err:  # noqa: BLE001 - a bug must cost one clip, not the run
            log.debug("failed to process %s", task.clip_id, exc_info=True)
            entry.transient = is_transient(err)
            why = "the next run tries it again" if entry.transient else "a bug; run with -v"
            entry.status, entry.reason = cf.STATUS_FAILED, f"{type(err).__name__}: {one_line(err)} ({why})"
            log.debug("failed %s: %s", task.clip_id, entry.reason)  # the summary lists every failure
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # e.g. out of memory: give the next clip its chance
        return entry, None

    def _compute(self, task: ClipTask, entry: cf.ClipEntry,
                 on_frames: Callable[[int], None] | None) -> cf.ClipFeatures:
        timing = self.preset.timing
        path = Path(task.path)
        _check_regular_file(path)
        entry.content_hash = self._content_hash(task)
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
        with self._stage(seconds, "audio"):
            start_s = task.span_s[0] if task.span_s else 0.0
            wave = media.prepare_clip_audio(info, t, timing, start_s)  # (T * 640,) float32, normalised
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
            crop = self.framer.decide(info, self.decoder, indices, timing.fps, self.preset.motion.input_size)
        for name, value in crop.to_entry().items():
            setattr(entry, name, value)
        latents, coefficients, identity = self._encode_video(info, indices, crop.window, seconds, on_frames)
        entry.decoder = self.decoder.last_decoder or ""
        features = cf.ClipFeatures(motion_latents=latents, audio_features=audio_np,
                                   motion_coefficients=coefficients, identity=identity, emotion=emotion)
        try:
            features.check(self.preset)  # finite, float16 range, shapes: a failed clip, not a bad file
        except ValueError as err:
            raise MediaError(f"{path}: features rejected: {err}") from None
        entry.stage_seconds = {k: round(v, 6) for k, v in seconds.items()}
        return features

    # -- decode + motion in fixed-size batches -----------------------------------------------------

    def _content_hash(self, task: ClipTask) -> str:
        """sha256 of the clip's video; "" when unreadable (probing says why, in one line)."""
        key = (task.path, task.size_bytes, task.mtime_ns)
        if self._hash_memo is None or self._hash_memo[0] != key:
            try:
                self._hash_memo = (key, sha256_file(Path(task.path)))
            except OSError:
                return ""
        return self._hash_memo[1]

    def _encode_video(self, info: media.VideoInfo, indices: np.ndarray, window: media.Window,
                      seconds: dict[str, float], on_frames: Callable[[int], None] | None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """r (T, F), lambda (T, M) float32 and s (F,) float32 of the first frame."""
        batch = self._batch
        latents: list[torch.Tensor] = []
        coefficients: list[torch.Tensor] = []
        identity: list[torch.Tensor] = []

        def encode(n: int) -> None:
            with self._stage(seconds, "motion"):
                out = encode_motion(self.encoders.motion, batch)  # always (frame_batch, 3, S, S)
                latents.append(out.motion_latents[:n])  # outputs of padded rows are dropped
                coefficients.append(out.coefficients[:n])
                if not identity:
                    identity.append(out.identity[0])
            if on_frames is not None:
                on_frames(n)

        decoded = 0

        def timed_chunks() -> Iterator[torch.Tensor]:
            nonlocal decoded
            chunks = self.decoder.decode(info, indices, window=window)
            while True:
                with self._stage(seconds, "decode"):
                    chunk = next(chunks, None)  # (n, 3, S, S) on self.device; NVDEC frames stay on the GPU
                if chunk is None:
                    return
                decoded += len(chunk)
                yield chunk

        for n in fill_fixed_batches(timed_chunks(), batch):
            encode(n)
        if decoded != len(indices):
            raise MediaError(f"{info.path}: the decoder returned {decoded} frames, {len(indices)} were asked for; "
                             f"re-encode the clip or remove it")
        # One device -> host copy per stream per clip (a sync point on the GPU).
        return (torch.cat(latents).cpu().numpy(), torch.cat(coefficients).cpu().numpy(),
                identity[0].cpu().numpy())

    @contextmanager
    def _stage(self, seconds: dict[str, float], name: str) -> Iterator[None]:
        """Add the wall time of the block to seconds[name]; on a GPU, wait for its kernels first
        (a sync point per block: without it, the time of one stage would be billed to the next)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
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


def run_tasks(processor: ClipProcessor, writer: ShardWriter, tasks: Iterable[ClipTask], reporter: Reporter,
              stop: Interrupts | None = None) -> None:
    """Process `tasks` in order (a list, or a worker process's TaskFeed: the parent's queue), reporting each
    clip's start, frames and entry (written through `writer`, committed in groups, and on time between a
    clip's frame batches: ShardWriter.commit_if_due).

    `stop`: a signal abandons the clip in flight (its work is lost) and ends the loop; what was finished is
    committed by the writer's close. Records and commits are never cut by it (deferred)."""
    stop = stop or Interrupts()

    def on_frames(n: int) -> None:
        with stop.deferred():  # neither a message to the parent nor a commit is cut in the middle
            reporter.frames(n)
            writer.commit_if_due()

    for task in tasks:
        if stop.requested:
            return
        reporter.start(task.clip_id)
        try:
            with stop.abortable():
                entry, features = processor.outcome(task, on_frames)
        except Stopped:
            log.info("%s: stopping; %s is left for the next run", stop.signal_name, task.clip_id)
            return
        entry = writer.write(entry, features)
        reporter.done(entry)


# --------------------------------------------------------------------------------------------------
# Worker processes (spawned: each builds its own encoders and decoder)

class PipeReporter:
    """A worker process's reporter: messages (kind, worker id, payload) on a pipe of its own to the parent.

    A pipe per worker, not a Queue they share: a Queue's writers share one lock, and a worker killed while
    it held it (the out-of-memory killer strikes at any moment) left every later worker unable to report,
    and the run waiting for ever. Only this process's main thread writes here."""

    def __init__(self, conn, worker_id: int) -> None:
        self.conn, self.worker_id = conn, worker_id

    def send(self, kind: str, payload) -> None:
        self.conn.send((kind, self.worker_id, payload))

    def start(self, clip_id: str) -> None:
        self.send("start", clip_id)

    def frames(self, n: int) -> None:
        self.send("frames", n)

    def done(self, entry: cf.ClipEntry) -> None:
        self.send("done", entry.to_dict())


class TaskFeed:
    """A worker process's clips, asked of the parent one at a time (its ClipQueue), as an iterable.

    The worker asks for `ahead` clips more than it has taken, so that the next one is here when the
    current one ends (the parent's answer is a pipe round trip away, and it may be busy). Not more: a clip
    waiting in one worker is a clip another, free worker cannot take. The parent's answers ("next": a
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


def fill_fixed_batches(chunks: Iterable[torch.Tensor], batch: torch.Tensor) -> Iterator[int]:
    """Copy the frames of `chunks` into `batch` (device-local) and yield its number of valid rows
    each time it is full, and once more for a partial last batch. Every motion-encoder call then sees
    the same shape (one compiled kernel set, no reallocation); rows past the count are stale."""
    size, filled = len(batch), 0
    for chunk in chunks:
        pos = 0
        while pos < len(chunk):
            take = min(size - filled, len(chunk) - pos)
            batch[filled:filled + take].copy_(chunk[pos:pos + take])
            filled, pos = filled + take, pos + take
            if filled == size:
                yield size
                filled = 0
    if filled:
        yield filled


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
                log_level: int, lifeline=None, limits: ClipLimits = ClipLimits()) -> None:
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
                                      limits=limits)
        with ShardWriter(cf.CacheLayout(Path(root)), preset, writer) as shard_writer:
            run_tasks(processor, shard_writer, TaskFeed(tasks_in, reporter, stop), reporter, stop)
    except Stopped:
        pass
    except DaliFloatError as err:
        reporter.send("fatal", (type(err).__name__, str(err)))
        return
    except BaseException as err:  # a bug outside any clip: the parent shows it and stops
        reporter.send("fatal", ("bug", f"{type(err).__name__}: {one_line(err)}\n{traceback.format_exc()}"))
        return
    reporter.send("exit", None)
