"""`--loader dali`: a DALI pipeline cuts training windows out of the cache, no Python per sample.

Per batch, inside the pipeline: the external source (`EpochSource`, a pure function of the batch's
iteration, so DALI checkpoints it exactly) takes this rank's next clips of the epoch from the
training view's memory-mapped arrays (loaders.sampling: the epoch every loader shares) and hands
over each clip's record address (shard, offset, frames, row) and emotion; `fn.random.uniform` draws
the window starts; the reference frame follows the `--ref` rule; the window's rows are read and, on a
GPU, every output moves to the device. Read strategies for the rows:

  pread   (default) `fn.dali_float_window_read` (window_read.cc): one pread per window from the clip's
          shard, then `.gpu()`.
  python  the external source reads the windows itself (loaders.cached.WindowReader, the torch
          loader's reads), with draws from NumPy: for where the operator cannot be built (no g++).

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
from dali_float.loaders.sampling import DRAW_RANGE, RequestStream, window_from_draws

log = logging.getLogger(__name__)

READ_STRATEGIES = ("auto", "pread", "python")
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
                    ref_rule: str, strategy: str, on_gpu: bool, draw_seed: int, given: str | None):
    """Outputs per sample: windows (60, row bytes) u8, ref_motion (F bytes) u8, emotion (E,) f16,
    indices (3,) int64: window_start, ref_frame, row of the training view.

    given: None in training (the draws come from fn.random.uniform); "draws" (the caller's
    draws go through the same rules) or "windows" (the caller gives window start and reference frame)."""
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
        windows, ref_motion, indices = fn.dali_float_window_read(
            records, draws, files=shard_files, rows=window_frames, row_bytes=row_bytes, ref_bytes=ref_bytes,
            ref_rule="given" if given == "windows" else ref_rule)
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


def resolve_strategy(strategy: str, on_gpu: bool) -> str:
    if strategy not in READ_STRATEGIES:
        raise UsageError(f"--read_strategy {strategy!r} is not one of {', '.join(READ_STRATEGIES)}")
    if strategy in ("auto", "pread"):
        if load_window_reader():
            return "pread"
        if strategy == "pread":
            raise UsageError("--read_strategy pread: the DALI window-read operator could not be built "
                             "(see the warning above); use --read_strategy python")
        return "python"
    return strategy


class DaliWindowLoader(WindowLoader):
    """Cached windows through a DALI pipeline; CPU tensors without a GPU, CUDA tensors with one."""

    kind = "dali"

    def __init__(self, cache: TrainingCache, options: LoaderOptions):
        super().__init__(cache.preset, options, cache)
        self.cache = cache
        self.device = options.torch_device
        self.strategy = resolve_strategy(options.read_strategy, self.device.type == "cuda")
        self.stream = RequestStream(cache.num_frames, cache.preset.timing.window_frames, policy=options.epoch_policy,
                                    ref_rule=options.ref_rule, seed=options.seed, shard_id=options.shard_id,
                                    num_shards=options.num_shards)
        self._pipe = None
        self._prefetcher: Prefetcher | None = None
        self._checkpoint: str | None = None

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
        pipe = window_pipeline(
            source, self.cache.shard_paths(), window_frames=preset.timing.window_frames,
            row_bytes=cf.row_bytes(preset), ref_bytes=preset.motion_dim * cf.FEATURE_DTYPE.itemsize,
            ref_rule=o.ref_rule, strategy=self.strategy, on_gpu=on_gpu, draw_seed=self._draw_seed,
            given=given, batch_size=batch_size, num_threads=o.num_threads,
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

    def _pipeline(self) -> Any:
        if self._pipe is None:
            b = self.options.batch_size
            source = EpochSource(self.cache, self.stream, b) if self.strategy == "pread" else \
                PythonReadSource(self.cache, self.stream, b, self.options.ref_rule, self._draw_seed)
            self._pipe = self._build(source, given=None, batch_size=b, checkpoint=self._checkpoint)
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
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._pipe is not None:
            raise RuntimeError("load_state_dict must come before the first batch")
        super().load_state_dict(state)
        saved = state.get("read_strategy", self.strategy)
        if state.get("dali_checkpoint") is not None and saved != self.strategy:
            # The two strategies are different pipelines: one's operator states mean nothing to the other.
            raise CheckpointError(f"cannot resume the DALI loader: its state was saved reading with --read_strategy "
                                  f"{saved}, this run reads with {self.strategy}: resume with --read_strategy {saved}")
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
            source = FixedSource((*EpochSource(self.cache, self.stream, len(items)).addresses(rows), pairs))
        return self._run(self._build(source, given=given, batch_size=len(items)))

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
