"""`--loader dali`: a DALI pipeline cuts training windows out of the cache, no Python per sample.

Per batch, inside the pipeline: the external source (`EpochSource`, a pure function of the batch's
iteration, so DALI checkpoints it exactly) takes this rank's next clips of the epoch from the
training view's memory-mapped arrays (loaders.sampling: the epoch every loader shares) and hands
over each clip's record address (shard, offset, frames, row) and emotion; `fn.random.uniform` draws
the window starts; the reference frame follows the `--ref` rule; the window's rows are read and, on a
GPU, every output moves to the device. Read strategies for the rows:

  pread     `fn.dali_float_window_read` (window_read.cc): one pread per window from the clip's shard,
            then `.gpu()`.
  resident  this rank's partition of the clips is loaded once into device memory (host memory on the
            CPU; loaders.resident), and `fn.dali_float_window_gather` cuts each window out of it on the
            device (the same draws and rules: `fn.dali_float_window_index`). A rank trains on its own
            clips only, for the whole run (loaders.sampling: partitions).
  python    the external source reads the windows itself (loaders.cached.WindowReader, the torch
            loader's reads), with draws from NumPy: for where the operator cannot be built (no g++).
  auto      (default) resident on a GPU when this rank's partition fits its free memory (on every rank),
            else pread; pread on the CPU (`resolve_strategy`); python where the operator cannot be built.

The pipeline's arguments are the shard paths (a few), never a list per clip: it builds in well
under a second at a million clips. The split of a window into the contract's fields is
`batch_from_windows` (views); the features arrive float16, as they are stored.
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

from dali_float.cache import format as cf
from dali_float.contract import FEATURE_DTYPE, Batch
from dali_float.errors import CacheError, CheckpointError, UsageError
from dali_float.loaders.base import LoaderOptions, WindowItem, WindowLoader, batch_from_windows
from dali_float.loaders.cached import TrainingCache, WindowReader
from dali_float.loaders.plugin import load_window_reader
from dali_float.loaders.resident import Partition, ResidentBuffer, ResidentFit, gb
from dali_float.loaders.sampling import DRAW_RANGE, RequestStream, window_from_draws

log = logging.getLogger(__name__)

READ_STRATEGIES = ("auto", "pread", "resident", "python")
OUTPUTS = ("windows", "ref_motion", "emotion", "indices")  # indices: (window_start, ref_frame, row)
PREFETCH_THREAD = "dali-float-prefetch"


class EpochSource:
    """The external source of the pipeline: batch `iteration` of this rank's endless stream of clips.

    Returns (record addresses (B, 4) int64: shard, offset, num_frames, row; emotion (B, E) float16).
    Sample p of the stream is position p % spe of epoch p // spe (spe: this rank's samples per
    epoch), the RequestStream's order: one definition of the epoch for every loader.
    """

    def __init__(self, cache: TrainingCache, stream: RequestStream, batch_size: int):
        self.rows, self.stream, self.batch_size = cache.view.rows, stream, batch_size
        self._order: tuple[int, np.ndarray] | None = None  # the last epoch's order (a pure function of it)

    def clip_rows(self, iteration: int) -> np.ndarray:
        spe = self.stream.samples_per_epoch
        positions = iteration * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(positions // spe):
            if self._order is None or self._order[0] != epoch:
                self._order = (int(epoch), self.stream.epoch_order(int(epoch)))
            here = positions // spe == epoch
            out[here] = self._order[1][positions[here] % spe]
        return out

    def addresses(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        picked = self.rows[rows]  # one gather per batch from the mapped view
        records = np.stack([picked["shard"].astype(np.int64), picked["offset"], picked["num_frames"], rows], axis=1)
        return records, picked["emotion"].astype(np.float16)

    def __call__(self, info) -> tuple[np.ndarray, np.ndarray]:
        return self.addresses(self.clip_rows(info.iteration))


class ResidentSource(EpochSource):
    """The `resident` strategy's external source: the same clips, each addressed in this rank's resident
    buffer: (0, byte offset of its rows in the buffer, num_frames, row)."""

    def __init__(self, cache: TrainingCache, stream: RequestStream, batch_size: int, offset_of_row: np.ndarray):
        super().__init__(cache, stream, batch_size)
        self.offset_of_row = offset_of_row

    def addresses(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        picked = self.rows[rows]
        records = np.stack([np.zeros(len(rows), dtype=np.int64), self.offset_of_row[rows],
                            picked["num_frames"].astype(np.int64), rows], axis=1)
        return records, picked["emotion"].astype(np.float16)


class PythonReadSource(EpochSource):
    """The `python` strategy: the same clips, draws from NumPy (seeded by the batch's iteration), the rules
    of loaders.sampling, and the windows read here. Returns (windows, ref, indices, emotion)."""

    def __init__(self, cache: TrainingCache, stream: RequestStream, batch_size: int, ref_rule: str, seed: int,
                 given: tuple[str, np.ndarray, np.ndarray] | None = None):
        super().__init__(cache, stream, batch_size)
        self.reader, self.ref_rule, self.seed, self.given = WindowReader(cache), ref_rule, seed, given
        self.window = cache.preset.timing.window_frames
        self.row_bytes, self.ref_bytes = cf.row_bytes(cache.preset), cache.preset.motion_dim * cf.FEATURE_DTYPE.itemsize

    def starts_and_refs(self, rows: np.ndarray, draws: np.ndarray) -> np.ndarray:
        out = np.empty_like(draws)
        lengths = self.rows["num_frames"][rows].tolist()  # one gather, not a row per sample
        for i, (t, (d0, d1)) in enumerate(zip(lengths, draws.tolist())):
            out[i] = window_from_draws(int(t), self.window, self.ref_rule, d0, d1)
        return out

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        if self.given is None:
            rows = self.clip_rows(info.iteration)
            draws = np.random.default_rng([self.seed, info.iteration]).integers(0, DRAW_RANGE, size=(len(rows), 2))
            starts_refs = self.starts_and_refs(rows, draws)
        else:
            kind, rows, pairs = self.given
            starts_refs = pairs if kind == "windows" else self.starts_and_refs(rows, pairs)
        b = len(rows)
        windows = np.empty((b, self.window, self.row_bytes), dtype=np.uint8)
        refs = np.empty((b, self.ref_bytes), dtype=np.uint8)
        self.reader.advise(zip(rows.tolist(), starts_refs[:, 0].tolist(), starts_refs[:, 1].tolist()))
        for i in range(b):
            self.reader.read(int(rows[i]), int(starts_refs[i, 0]), int(starts_refs[i, 1]), windows[i], refs[i])
        emotion = self.rows["emotion"][rows].astype(np.float16)
        return windows, refs, np.concatenate([starts_refs, rows[:, None]], axis=1), emotion


class FixedSource:
    """A fixed list of samples (the parity hook): record addresses, emotion and the given (start, ref) or draws."""

    def __init__(self, outputs: tuple[np.ndarray, ...]):
        self.outputs = outputs

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        return self.outputs


@pipeline_def(enable_checkpointing=True)
def window_pipeline(source: Callable, shard_files: list[str], *, window_frames: int, row_bytes: int, ref_bytes: int,
                    ref_rule: str, strategy: str, on_gpu: bool, draw_seed: int, given: str | None,
                    buffer: tuple[int, int] | None = None):
    """Outputs per sample: windows (60, row bytes) u8, ref_motion (F bytes) u8, emotion (E,) f16,
    indices (3,) int64: window_start, ref_frame, row of the training view.

    given: None in training (the draws come from fn.random.uniform); "draws" (the caller's
    draws go through the same rules) or "windows" (the caller gives window start and reference frame).
    buffer: (address, bytes) of the resident buffer (strategy resident), on the pipeline's device."""
    if strategy == "python":
        outputs = fn.external_source(source=source, batch=True, batch_info=True, num_outputs=4,
                                     dtype=[types.UINT8, types.UINT8, types.INT64, types.FLOAT16])
        windows, ref_motion, indices, emotion = outputs
    else:
        if given:  # (window start, reference frame) or the two draws, from the caller
            records, emotion, draws = fn.external_source(source=source, batch=True, batch_info=True, num_outputs=3,
                                                         dtype=[types.INT64, types.FLOAT16, types.INT64])
        else:  # wide integers, reduced modulo the valid range (see loaders.sampling.DRAW_RANGE)
            records, emotion = fn.external_source(source=source, batch=True, batch_info=True, num_outputs=2,
                                                  dtype=[types.INT64, types.FLOAT16])
            draws = fn.random.uniform(range=[0, DRAW_RANGE - 1], shape=[2], dtype=types.INT64, seed=draw_seed)
        rule = "given" if given == "windows" else ref_rule
        if strategy == "resident":  # the rule on the CPU, then the copy where the buffer is (mixed: on the GPU)
            indices = fn.dali_float_window_index(records, draws, rows=window_frames, ref_rule=rule)
            windows, ref_motion = fn.dali_float_window_gather(
                records, indices, device="mixed" if on_gpu else "cpu", buffer_address=buffer[0],
                buffer_bytes=buffer[1], rows=window_frames, row_bytes=row_bytes, ref_bytes=ref_bytes)
        else:
            windows, ref_motion, indices = fn.dali_float_window_read(
                records, draws, files=shard_files, rows=window_frames, row_bytes=row_bytes, ref_bytes=ref_bytes,
                ref_rule=rule)
    outputs = (windows, ref_motion, emotion, indices)
    return tuple(o.gpu() for o in outputs) if on_gpu else outputs


def _to_torch(tensor_list: Any, device: torch.device) -> torch.Tensor:
    tensor = tensor_list.as_tensor()
    if device.type == "cpu":
        # Zero copy: DALI's dynamic executor hands over the buffer, which stays valid while referenced.
        return torch.from_dlpack(tensor)
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))  # device-to-device
    return out


def resolve_strategy(strategy: str, on_gpu: bool, fit: Callable[[], ResidentFit] | None = None,
                     agree: Callable[[bool], bool] | None = None) -> str:
    """The read strategy a loader uses for `strategy` (--read_strategy), or a one-line UsageError.

    fit: this rank's partition against its free memory (computed only where needed: resident, and auto
    on a GPU; tests inject one). agree: under torchrun, whether every rank's partition fits (the ranks'
    answers combined; every rank calls it once for auto on a GPU), so the ranks never mix partitioned and
    contiguous epochs. auto: resident on a GPU when it fits, else pread (one log line with the sizes);
    pread on the CPU (the page cache already holds the shards there: resident would hold its partition
    in the same memory a second time, to save one kernel copy per window); python where the operator
    cannot be built.
    """
    if strategy not in READ_STRATEGIES:
        raise UsageError(f"--read_strategy {strategy!r} is not one of {', '.join(READ_STRATEGIES)}")
    if strategy == "python":
        return strategy
    built = load_window_reader()
    if strategy in ("pread", "resident") and not built:
        raise UsageError(f"--read_strategy {strategy}: the DALI window-read operator could not be built "
                         f"(see the warning above); use --read_strategy python")
    if strategy == "pread":
        return strategy
    if strategy == "resident":
        if fit is None:
            raise ValueError("the resident strategy needs its partition's fit")
        found = fit()  # fewer clips than ranks: a UsageError that says so
        if not found.fits:
            raise UsageError(f"--read_strategy resident: {found.describe()}: use --read_strategy pread (or auto), "
                             f"lower --resident_reserve_gb, or run more ranks (each holds a smaller part)")
        log.info("read strategy resident: %s", found.describe())
        return strategy
    fallback = "pread" if built else "python"
    if not on_gpu:
        found = _fit_or_none(fit)
        log.info("read strategy auto: %s on the CPU (the page cache already holds the shards in host memory; "
                 "--read_strategy resident would hold this rank's partition there a second time%s)", fallback,
                 f": {gb(found.partition_bytes)}; {gb(found.free_bytes)} available" if found else "")
        return fallback
    found = _fit_or_none(fit)
    fits = built and found is not None and found.fits
    if agree is not None:
        fits = agree(fits)  # collective: every rank reaches this line once
        if found is not None and found.fits and not fits:
            log.info("read strategy auto: %s: another rank's partition does not fit its GPU", fallback)
            return fallback
    if fits:
        log.info("read strategy auto: resident: %s", found.describe())
        return "resident"
    log.info("read strategy auto: %s: %s", fallback, found.describe() if found is not None else "no partition")
    return fallback


def _fit_or_none(fit: Callable[[], ResidentFit] | None) -> ResidentFit | None:
    """fit(), or None where there is none to measure (fewer clips than ranks: said once)."""
    if fit is None:
        return None
    try:
        return fit()
    except UsageError as err:
        log.info("no resident partition: %s", err)
        return None


class DaliWindowLoader(WindowLoader):
    """Cached windows through a DALI pipeline; CPU tensors without a GPU, CUDA tensors with one.

    agree: under torchrun, combines the ranks' answers to "does my resident partition fit?" (see
    resolve_strategy); None in one process.
    """

    kind = "dali"

    def __init__(self, cache: TrainingCache, options: LoaderOptions, agree: Callable[[bool], bool] | None = None):
        super().__init__(cache.preset, options, cache)
        self.cache = cache
        self.device = options.torch_device
        self._assigned: Partition | None = None
        self.strategy = resolve_strategy(options.read_strategy, self.device.type == "cuda",
                                         fit=lambda: self._fit(self._assignment()), agree=agree)
        # resident: this rank's clips for the run (a checkpoint's recorded ones replace them in load_state_dict)
        self.partition = self._assignment() if self.strategy == "resident" else None
        self.stream = self._make_stream()
        self._resident: ResidentBuffer | None = None  # loaded at the first batch (after any load_state_dict)
        self._pipe = None
        self._prefetcher: Prefetcher | None = None
        self._checkpoint: str | None = None

    def _assignment(self) -> Partition:
        if self._assigned is None:
            self._assigned = Partition.assign(self.cache, self.options.shard_id, self.options.num_shards)
        return self._assigned

    def _fit(self, partition: Partition) -> ResidentFit:
        return ResidentFit.measure(partition.nbytes(self.cache), len(partition.rows), self.device,
                                   self.options.resident_reserve_gb)

    def _make_stream(self) -> RequestStream:
        o = self.options
        return RequestStream(self.cache.num_frames, self.preset.timing.window_frames, policy=o.epoch_policy,
                             ref_rule=o.ref_rule, seed=o.seed, shard_id=o.shard_id, num_shards=o.num_shards,
                             owner=self.partition.owner if self.partition is not None else None)

    def _buffer(self) -> ResidentBuffer:
        """The resident buffer, loaded on first use (the partition is final by then)."""
        if self._resident is None:
            self._resident = ResidentBuffer.load(self.cache, self.partition.rows, self.device,
                                                 progress=self.options.progress)
        return self._resident

    @property
    def samples_per_epoch(self) -> int:
        return self.stream.samples_per_epoch

    @property
    def _draw_seed(self) -> int:
        # Random draws differ per rank (the epoch's order is shared: loaders.sampling).
        return (self.options.seed * 1_000_003 + self.options.shard_id) % (1 << 31)

    def _build(self, source: Callable, *, given: str | None, batch_size: int, checkpoint: str | None = None) -> Any:
        o, preset = self.options, self.preset
        on_gpu = self.device.type == "cuda"
        buffer = (self._buffer().address, self._buffer().nbytes) if self.strategy == "resident" else None
        pipe = window_pipeline(
            source, self.cache.shard_paths(), window_frames=preset.timing.window_frames,
            row_bytes=cf.row_bytes(preset), ref_bytes=preset.motion_dim * cf.FEATURE_DTYPE.itemsize,
            ref_rule=o.ref_rule, strategy=self.strategy, on_gpu=on_gpu, draw_seed=self._draw_seed,
            given=given, buffer=buffer, batch_size=batch_size, num_threads=o.num_threads,
            device_id=(self.device.index or 0) if on_gpu else None, seed=o.seed,
            # A fixed list is one batch: nothing to prefetch.
            prefetch_queue_depth=1 if given else o.prefetch_batches, checkpoint=checkpoint,
        )
        try:
            pipe.build()  # here, not at the first run: a checkpoint that does not fit is told apart from a bad read
        except RuntimeError as err:
            if checkpoint is not None:
                raise CheckpointError(
                    f"cannot resume the DALI loader from the checkpoint's loader state ({_first_line(err)}): it was "
                    f"saved by another DALI version or pipeline; resume with the DALI version and --read_strategy it "
                    f"was saved with") from None
            raise CacheError(f"the DALI pipeline over {self.cache.root} failed to start ({_first_line(err)}): "
                             f"run `python preprocess.py verify`") from None
        return pipe

    def _source(self, batch_size: int) -> EpochSource:
        """The pipeline's external source for training batches (the epoch's clips, addressed for the strategy)."""
        if self.strategy == "resident":
            return ResidentSource(self.cache, self.stream, batch_size, self._buffer().offset_of_row)
        if self.strategy == "python":
            return PythonReadSource(self.cache, self.stream, batch_size, self.options.ref_rule, self._draw_seed)
        return EpochSource(self.cache, self.stream, batch_size)

    def _pipeline(self) -> Any:
        if self._pipe is None:
            b = self.options.batch_size
            self._pipe = self._build(self._source(b), given=None, batch_size=b, checkpoint=self._checkpoint)
        return self._pipe

    def _run(self, pipe: Any) -> Batch:
        try:
            outputs = pipe.run()
        except (RuntimeError, CacheError) as err:
            raise self._read_error(err) from None
        t = dict(zip(OUTPUTS, (_to_torch(o, self.device) for o in outputs)))
        indices = t["indices"]
        b = indices.shape[0]
        clip_ids = self.cache.clip_ids(indices[:, 2].cpu().numpy())  # (a sync point on a GPU)
        windows = t["windows"].view(FEATURE_DTYPE).reshape(b, self.preset.timing.window_frames, -1)
        return batch_from_windows(self.preset, windows, t["ref_motion"].view(FEATURE_DTYPE).reshape(b, -1),
                                  t["emotion"], indices[:, 0], indices[:, 1], clip_ids)

    def _read_error(self, err: BaseException) -> CacheError:
        """One line naming the clip and the shard (the operator names the row), and what to run."""
        if isinstance(err, CacheError):
            return err
        # DALI's first line is "Critical error in pipeline:"; the operator's own line names the row.
        row = re.search(r"row (\d+): ([^\n]*)", str(err))
        if row and int(row.group(1)) < len(self.cache):
            return CacheError(self.cache.describe_failure(int(row.group(1)), row.group(2).strip()[:300]))
        return CacheError(f"reading the cache {self.cache.root} failed ({_first_line(err)}): "
                          f"run `python preprocess.py verify`")

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
        state["partition"] = self.partition.state(self.cache) if self.partition is not None else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._pipe is not None or self._resident is not None:
            raise RuntimeError("load_state_dict must come before the first batch")
        super().load_state_dict(state)
        saved = state.get("read_strategy", self.strategy)
        adopt = saved != self.strategy and self.options.read_strategy == "auto" and saved in READ_STRATEGIES
        if state.get("dali_checkpoint") is not None and saved != self.strategy and not adopt:
            # The strategies are different pipelines: one's operator states mean nothing to another.
            raise CheckpointError(f"cannot resume the DALI loader: its state was saved reading with --read_strategy "
                                  f"{saved}, this run reads with {self.strategy}: resume with --read_strategy {saved}")
        partition = None
        if saved == "resident":  # the run's partition, as recorded: a resident run keeps its clips
            if not isinstance(state.get("partition"), dict):
                raise CheckpointError("cannot resume the DALI loader: its state was saved reading with --read_strategy "
                                      "resident but records no partition (a damaged checkpoint?)")
            partition = Partition.restore(self.cache, state["partition"], self.options.shard_id,
                                          self.options.num_shards)
        if adopt:  # auto follows the checkpoint: its pipeline state and its epochs continue only there
            log.info("resuming with --read_strategy %s as the checkpoint's loader read (auto)", saved)
            self.strategy = resolve_strategy(saved, self.device.type == "cuda", fit=lambda: self._fit(partition))
        self.partition = (partition or self.partition or self._assignment()) if self.strategy == "resident" else None
        self.stream = self._make_stream()
        self._checkpoint = state.get("dali_checkpoint")

    def load_windows(self, items: Sequence[WindowItem]) -> Batch:
        return self._load_given("windows", items)

    def load_draws(self, items: Sequence[tuple[str, int, int]]) -> Batch:
        """The batch for (clip id, start draw, reference draw): the pipeline's own sampling rules
        (the pread operator's, or the python strategy's) applied to draws given here instead of drawn."""
        return self._load_given("draws", items)

    def _load_given(self, given: str, items: Sequence[tuple[str, int, int]]) -> Batch:
        rows = np.array([self.index_of(cid) for cid, _, _ in items], dtype=np.int64)
        pairs = np.array([(a, b) for _, a, b in items], dtype=np.int64)
        if self.strategy == "python":
            source: Callable = PythonReadSource(self.cache, self.stream, len(items), self.options.ref_rule, 0,
                                                given=(given, rows, pairs))
        else:
            if self.strategy == "resident" and (self._buffer().offset_of_row[rows] < 0).any():
                other = items[int(np.flatnonzero(self._buffer().offset_of_row[rows] < 0)[0])][0]
                raise UsageError(f"clip {other!r} is not in this rank's resident partition (rank "
                                 f"{self.options.shard_id} of {self.options.num_shards})")
            source = FixedSource((*self._source(len(items)).addresses(rows), pairs))
        return self._run(self._build(source, given=given, batch_size=len(items)))

    def close(self) -> None:
        if self._prefetcher is not None:  # stop the background thread before the pipeline goes
            self._prefetcher.__exit__(None, None, None)
            self._prefetcher = None
        self._pipe = None  # the pipeline before the buffer it reads by address
        self._resident = None


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
