"""`--loader dali`: a DALI pipeline cuts training windows out of the cache, no Python per sample.

Per sample, inside the pipeline: `fn.readers.numpy` reads the clip's tiny clip_info.npy (shuffled,
sharded, checkpointed: it defines the epoch), a window start is drawn from the clip's valid starts,
the reference frame follows the `--ref` rule, the 60 rows of frames.npy are read, and on a GPU every
output moves to the device. Read strategies for the rows:

  pread  (default) `fn.dali_float_window_read` (window_read.cc): one pread per window, then `.gpu()`.
  roi    `fn.readers.numpy` with a per-sample ROI: the stock way; it maps the file for every sample,
         a page fault per 4 KiB, about 3x slower than pread on the CPU (docs/BENCHMARKS.md).
  gds    `fn.readers.numpy(device="gpu")` (GPU Direct Storage): reads the WHOLE frames.npy onto the
         GPU and slices the window there; only worth it when clips are a few windows long.

The split of a window into the contract's fields is `batch_from_windows` (views); on a GPU the
features arrive on the device already float16, as they are stored.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import re
import threading
import weakref
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from dali_float import cache_format as cf
from dali_float.contract import Batch
from dali_float.errors import CacheError, UsageError
from dali_float.loaders.base import LoaderOptions, WindowItem, WindowLoader, batch_from_windows
from dali_float.loaders.cached import TrainingCache
from dali_float.loaders.plugin import load_window_reader
from dali_float.loaders.sampling import DRAW_RANGE, epoch_clip_indices, shard_bounds

log = logging.getLogger(__name__)

READ_STRATEGIES = ("auto", "pread", "roi", "gds")
READER_NAME = "clips"
OUTPUTS = ("windows", "ref_motion", "emotion", "indices")  # indices: (window_start, ref_frame, clip_uid)
PREFETCH_THREAD = "dali-float-prefetch"


@pipeline_def(enable_checkpointing=True)
def window_pipeline(info_files: list[str], frames_files: list[str], files_by_uid: list[str], *,
                    window_frames: int, motion_dim: int, ref_rule: str, strategy: str, on_gpu: bool,
                    shuffle_seed: int | None, draw_seed: int, shard_id: int, num_shards: int, given: str | None):
    """Outputs per sample: windows (60, F + A) f16, ref_motion (F,) f16, emotion (E,) f16,
    indices (3,) int64: window_start, ref_frame, clip_uid.

    given: None (training: the two draws per sample from fn.random.uniform), "draws" (the caller feeds
    the two draws, which go through the same rules) or "windows" (the caller feeds window start and
    reference frame themselves)."""
    reader = dict(shard_id=shard_id, num_shards=num_shards, cache_header_information=True)
    if shuffle_seed is not None:  # the same seed on every rank: one global permutation per epoch
        reader.update(shuffle_after_epoch=True, shuffle_after_epoch_seed=shuffle_seed)
    info = fn.readers.numpy(files=info_files, name=READER_NAME, dont_use_mmap=True, **reader)
    given_windows = given == "windows"
    if given:  # a fixed list: (window start, reference frame), or the draws, from the caller
        draws = fn.external_source(name=given, dtype=types.INT64, ndim=1)
    else:  # wide integers, reduced modulo the valid range (see loaders.sampling.DRAW_RANGE)
        draws = fn.random.uniform(range=[0, DRAW_RANGE - 1], shape=[2], dtype=types.INT64, seed=draw_seed)

    if strategy == "pread":
        outputs = fn.dali_float_window_read(
            info, draws, files=files_by_uid, rows=window_frames, ref_columns=motion_dim,
            ref_rule="given" if given_windows else ref_rule, num_frames_field=cf.CLIP_INFO_NUM_FRAMES,
            uid_field=cf.CLIP_INFO_UID, emotion_field=cf.CLIP_INFO_EMOTION)
    else:  # the same rules as DALI arithmetic (loaders.sampling is the reference)
        num_frames = fn.cast(info[cf.CLIP_INFO_NUM_FRAMES], dtype=types.INT64)
        clip_uid = fn.cast(info[cf.CLIP_INFO_UID], dtype=types.INT64)
        emotion = fn.cast(info[cf.CLIP_INFO_EMOTION:], dtype=types.FLOAT16)
        if given_windows:
            start, ref = draws[0], draws[1]
        else:
            start = draws[0] % (num_frames - (window_frames - 1))
            ref = {"first": start * 0, "random_in_clip": draws[1] % num_frames,
                   "random_in_window": start + draws[1] % window_frames}[ref_rule]
        if strategy == "roi":  # ROI arguments are int32
            start32, ref32 = fn.cast(start, dtype=types.INT32), fn.cast(ref, dtype=types.INT32)
            windows = fn.readers.numpy(files=frames_files, roi_start=fn.reshape(start32, shape=[1]),
                                       roi_shape=[window_frames], roi_axes=[0], **reader)
            ref_motion = fn.readers.numpy(files=frames_files, roi_start=fn.stack(ref32, ref32 * 0),
                                          roi_shape=[1, motion_dim], roi_axes=[0, 1], **reader)
        else:  # gds: the whole clip onto the GPU, sliced there
            whole = fn.readers.numpy(device="gpu", files=frames_files, **reader)
            windows = whole[start:start + window_frames]
            ref_motion = whole[ref:ref + 1, :motion_dim]
        outputs = (windows, fn.reshape(ref_motion, shape=[motion_dim]), emotion, fn.stack(start, ref, clip_uid))
    return tuple(o.gpu() for o in outputs) if on_gpu else tuple(outputs)


def _to_torch(tensor_list: Any, device: torch.device) -> torch.Tensor:
    tensor = tensor_list.as_tensor()
    if device.type == "cpu":
        # Zero copy: DALI's dynamic executor hands over the buffer, which stays valid while referenced.
        return torch.from_dlpack(tensor)
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))  # device-to-device
    return out


def resolve_strategy(strategy: str, on_gpu: bool) -> str:
    if strategy not in READ_STRATEGIES:
        raise UsageError(f"--read_strategy {strategy!r} is not one of {', '.join(READ_STRATEGIES)}")
    if strategy == "gds" and not on_gpu:
        raise UsageError("--read_strategy gds reads with GPU Direct Storage: it needs a CUDA device")
    if strategy in ("auto", "pread"):
        if load_window_reader():
            return "pread"
        if strategy == "pread":
            raise UsageError("--read_strategy pread: the DALI window-read operator could not be built "
                             "(see the warning above); use --read_strategy roi")
        return "roi"
    return strategy


class DaliWindowLoader(WindowLoader):
    """Cached windows through a DALI pipeline; CPU tensors without a GPU, CUDA tensors with one."""

    kind = "dali"

    def __init__(self, cache: TrainingCache, options: LoaderOptions):
        super().__init__(cache.preset, options, [c.clip_id for c in cache.clips])
        self.cache = cache
        self.device = options.torch_device
        self.strategy = resolve_strategy(options.read_strategy, self.device.type == "cuda")
        self.clip_id_of_uid = cache.clip_id_of_uid()
        self.files_by_uid = cache.frames_files_by_uid()
        window = cache.preset.timing.window_frames
        plan = epoch_clip_indices([c.num_frames for c in cache.clips], window, options.epoch_policy)
        # DALI reshuffles after each epoch; the first epoch is shuffled here with the same seed.
        self.plan = plan[np.random.default_rng([options.seed, 0]).permutation(len(plan))]
        begin, end = shard_bounds(len(self.plan), options.shard_id, options.num_shards)
        if end == begin:
            raise UsageError(f"{len(self.plan)} samples per epoch cannot feed {options.num_shards} ranks")
        self._samples_per_epoch = end - begin
        self._pipe = None
        self._prefetcher: Prefetcher | None = None
        self._checkpoint: str | None = None

    @property
    def samples_per_epoch(self) -> int:
        return self._samples_per_epoch

    def _build(self, info_files: list[str], frames_files: list[str], *, given: str | None,
               batch_size: int, checkpoint: str | None = None) -> Any:
        o = self.options
        on_gpu = self.device.type == "cuda"
        pipe = window_pipeline(
            info_files, frames_files, self.files_by_uid,
            window_frames=self.preset.timing.window_frames, motion_dim=self.preset.motion_dim,
            ref_rule=o.ref_rule, strategy=self.strategy, on_gpu=on_gpu,
            shuffle_seed=None if given else o.seed,
            # Random draws differ per rank; the reader's shuffle seed is shared (see above).
            draw_seed=(o.seed * 1_000_003 + o.shard_id) % (1 << 31),
            shard_id=0 if given else o.shard_id, num_shards=1 if given else o.num_shards, given=given,
            batch_size=batch_size, num_threads=o.num_threads,
            device_id=(self.device.index or 0) if on_gpu else None, seed=o.seed,
            # A fixed list is fed one batch at a time: nothing to prefetch.
            prefetch_queue_depth=1 if given else o.prefetch_batches, checkpoint=checkpoint,
        )
        try:
            pipe.build()
        except RuntimeError as err:
            raise CacheError(f"the DALI pipeline over {self.cache.root} failed to start ({_first_line(err)}): "
                             f"run `python preprocess.py verify`") from None
        return pipe

    def _pipeline(self) -> Any:
        if self._pipe is None:
            clips = [self.cache.clips[i] for i in self.plan]
            self._pipe = self._build([str(c.info_path) for c in clips], [str(c.frames_path) for c in clips],
                                     given=None, batch_size=self.options.batch_size,
                                     checkpoint=self._checkpoint)
        return self._pipe

    def _run(self, pipe: Any, **feeds: np.ndarray) -> Batch:
        try:
            for name, data in feeds.items():
                pipe.feed_input(name, data)
            outputs = pipe.run()
        except RuntimeError as err:
            raise CacheError(f"reading the cache {self.cache.root} failed ({_first_line(err)}): "
                             f"run `python preprocess.py verify`") from None
        t = dict(zip(OUTPUTS, (_to_torch(o, self.device) for o in outputs)))
        indices = t["indices"]
        clip_ids = [self.clip_id_of_uid[u] for u in indices[:, 2].tolist()]  # (a sync point on a GPU)
        return batch_from_windows(self.preset, t["windows"], t["ref_motion"], t["emotion"], indices[:, 0],
                                  indices[:, 1], clip_ids)

    def batches(self) -> Iterator[Batch]:
        pipe = self._pipeline()

        def produce() -> tuple[Batch, str]:
            batch = self._run(pipe)
            # The pipeline's state after this batch: what a checkpoint taken once it is consumed holds.
            return batch, pipe.checkpoint()

        # Batches are assembled on a thread of their own (pipe.run() releases the GIL; the tensor
        # views take ~0.3 ms of Python): the training loop finds them ready instead of waiting.
        with Prefetcher(produce, depth=self.options.prefetch_batches) as ready:
            self._prefetcher = ready
            while True:
                batch, self._checkpoint = ready.get()
                self.batches_consumed += 1
                yield batch

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["dali_checkpoint"] = self._checkpoint  # after the last batch handed out (None: from the start)
        state["read_strategy"] = self.strategy
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._pipe is not None:
            raise RuntimeError("load_state_dict must come before the first batch")
        super().load_state_dict(state)
        self._checkpoint = state.get("dali_checkpoint")

    def load_windows(self, items: Sequence[WindowItem]) -> Batch:
        return self._load_given("windows", items)

    def load_draws(self, items: Sequence[tuple[str, int, int]]) -> Batch:
        """The batch for (clip id, start draw, reference draw): the pipeline's own sampling rules
        (the pread operator's or DALI arithmetic) applied to draws given here instead of drawn."""
        return self._load_given("draws", items)

    def _load_given(self, given: str, items: Sequence[tuple[str, int, int]]) -> Batch:
        clips = [self.cache.clips[self.index_of(cid)] for cid, _, _ in items]
        pipe = self._build([str(c.info_path) for c in clips], [str(c.frames_path) for c in clips],
                           given=given, batch_size=len(items))
        return self._run(pipe, **{given: np.array([(a, b) for _, a, b in items], dtype=np.int64)})

    def close(self) -> None:
        if self._prefetcher is not None:  # stop the background thread before the pipeline goes
            self._prefetcher.__exit__(None, None, None)
            self._prefetcher = None
        self._pipe = None


class Prefetcher:
    """Calls `produce()` on a background thread, keeping up to `depth` results ready, in order.

    Only that thread touches what `produce` uses (DALI pipelines are not thread-safe). An exception
    raised by `produce` is raised again by `get()`.

    Every running prefetcher is stopped when the interpreter exits (`atexit`), also when its loader
    was never closed. Left running, its daemon thread races the exit twice: DALI's own atexit hook
    shuts every pipeline down, also one this thread is running (nvidia.dali.pipeline
    `_shutdown_pipelines`; ours runs first, registered after DALI's import); and when Python 3.11
    finalizes, a daemon thread inside DALI's C++ (pipe.run(), the DLPack hand-over, which release the
    GIL) is ended by pthread_exit as it takes the GIL back, a forced unwind through DALI's noexcept
    code: std::terminate, SIGABRT after the work is done ("terminate called without an active
    exception": 3 of 100 exits of the tests' RSS probe before this, 0 of 100 after; docs/TESTING.md).
    """

    _running: "weakref.WeakSet[Prefetcher]" = weakref.WeakSet()

    def __init__(self, produce: Callable[[], Any], depth: int):
        self._produce = produce
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=PREFETCH_THREAD, daemon=True)

    def __enter__(self) -> "Prefetcher":
        self._thread.start()
        Prefetcher._running.add(self)
        return self

    def __exit__(self, *exc: Any) -> None:  # idempotent
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()
        Prefetcher._running.discard(self)

    @classmethod
    def stop_all(cls) -> None:
        """Stop every running prefetcher (registered with atexit: see the class docstring)."""
        for prefetcher in list(cls._running):
            prefetcher.__exit__(None, None, None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                item: Any = (self._produce(), None)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer
                item = (None, err)
            while not self._stop.is_set():
                with contextlib.suppress(queue.Full):
                    self._queue.put(item, timeout=0.05)
                    break
            if item[1] is not None:
                return

    def get(self) -> Any:
        result, err = self._queue.get()
        if err is not None:
            raise err
        return result


atexit.register(Prefetcher.stop_all)


_DALI_ASSERT = re.compile(r'^Assert on ".*" failed: ')


def _first_line(err: BaseException) -> str:
    """The line of a (DALI) error that says what went wrong, at most 300 characters.

    DALI wraps an operator's error in "Critical error in pipeline: ... Error in CPU operator ... encountered:",
    the cause following; an assertion's condition is dropped, its message kept."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith(("Traceback", "  File"))]
    if "encountered:" in lines[:-1]:
        lines = lines[lines.index("encountered:") + 1:]
    return _DALI_ASSERT.sub("", lines[0])[:300] if lines else type(err).__name__
