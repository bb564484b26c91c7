"""`--loader torch`: the cached approach done with a torch Dataset, as well as it can be done.

`__getitems__` reads a whole batch of windows with one `os.preadv` per window (from the clip's shard,
at its offset: loaders.cached.WindowReader) straight into the batch tensor (no per-sample tensors, no
collate copy); worker processes allocate that tensor in shared
memory so it reaches the main process without another copy; pinned memory and a non-blocking copy
take it to the GPU. It is the honest peer the DALI loader is measured against.

Workers are started by the fork server (dali_float.forkserver), never forked from this process, which
may run DALI and OpenMP threads: the dataset is pickled to them, so it pickles small (paths, not arrays).
"""
from __future__ import annotations

import itertools
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from dali_float.config import Preset
from dali_float.contract import Batch
from dali_float.forkserver import worker_context
from dali_float.loaders.base import ClipNames, LoaderOptions, WindowItem, WindowLoader, batch_from_windows
from dali_float.loaders.cached import TrainingCache, WindowReader
from dali_float.loaders.sampling import RequestStream, WindowRequest


class CachedWindowDataset(Dataset):
    """Windows of the cache by WindowRequest; one batch per `__getitems__` call."""

    def __init__(self, cache: TrainingCache):
        self.cache, self.preset = cache, cache.preset
        self.reader = WindowReader(cache)
        self.emotions = cache.view.rows["emotion"]  # (clips, E) float32, memory-mapped

    def __reduce__(self) -> tuple[Any, ...]:
        # To a worker: the cache (it reopens the view's arrays by path), never the mapped arrays' bytes.
        return type(self), (self.cache,)

    def __len__(self) -> int:
        return len(self.emotions)

    def __getitems__(self, requests: Sequence[WindowRequest]) -> dict[str, Any]:
        preset, b = self.preset, len(requests)
        w, f = preset.timing.window_frames, preset.motion_dim
        width = preset.motion_dim + preset.audio_feature_dim
        in_worker = get_worker_info() is not None

        def alloc(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
            t = torch.empty(shape, dtype=dtype)
            return t.share_memory_() if in_worker else t  # shared: crosses to the main process uncopied

        windows, ref_motion = alloc(b, w, width), alloc(b, f)
        emotion = alloc(b, preset.emotion_dim)
        win_np, ref_np = windows.numpy(), ref_motion.numpy()
        self.reader.advise((r.clip_index, r.window_start, r.ref_frame) for r in requests)
        for i, r in enumerate(requests):
            self.reader.read(r.clip_index, r.window_start, r.ref_frame, win_np[i], ref_np[i])
        rows = np.fromiter((r.clip_index for r in requests), dtype=np.int64, count=b)
        emotion.numpy()[:] = self.emotions[rows]  # float32 -> float16, one gather per batch
        return {
            "windows": windows, "ref_motion": ref_motion, "emotion": emotion,
            "window_start": torch.tensor([r.window_start for r in requests], dtype=torch.int64),
            "ref_frame": torch.tensor([r.ref_frame for r in requests], dtype=torch.int64),
            "clip_index": [r.clip_index for r in requests],
        }

    def __getitem__(self, request: WindowRequest) -> dict[str, Any]:
        return self.__getitems__([request])


def _as_batch(data: dict[str, Any]) -> dict[str, Any]:
    """DataLoader collate: the dataset already returns whole batches."""
    return data


class _RequestBatches:
    """Endless batch sampler over a RequestStream, from a number of consumed samples on."""

    def __init__(self, stream: RequestStream, batch_size: int, start_sample: int):
        self.stream, self.batch_size, self.start_sample = stream, batch_size, start_sample

    def __iter__(self) -> Iterator[list[WindowRequest]]:
        requests = self.stream(self.start_sample)
        while True:
            yield list(itertools.islice(requests, self.batch_size))


class RequestLoader(WindowLoader):
    """A loader whose dataset builds whole batches from WindowRequests (`__getitems__`), driven by a
    torch DataLoader over this rank's RequestStream: the torch and naive loaders (same seed, same samples)."""

    def __init__(self, preset: Preset, options: LoaderOptions, clips: ClipNames, num_frames: Sequence[int],
                 dataset: Dataset):
        super().__init__(preset, options, clips)
        self.dataset = dataset
        self.stream = RequestStream(num_frames, preset.timing.window_frames, policy=options.epoch_policy,
                                    ref_rule=options.ref_rule, seed=options.seed, shard_id=options.shard_id,
                                    num_shards=options.num_shards)

    @property
    def samples_per_epoch(self) -> int:
        return self.stream.samples_per_epoch

    @property
    def num_workers(self) -> int:
        return self.options.num_workers

    @property
    def pin_memory(self) -> bool:
        """Page-locked host batches, so the copy to the GPU can overlap (non_blocking)."""
        return self.options.torch_device.type == "cuda"

    def _to_batch(self, data: dict[str, Any]) -> Batch:
        batch = batch_from_windows(self.preset, data["windows"], data["ref_motion"], data["emotion"],
                                   data["window_start"], data["ref_frame"],
                                   self.clips.clip_ids(data["clip_index"]))
        return batch.to(self.options.torch_device, non_blocking=True)  # no-op where the batch already is

    def batches(self) -> Iterator[Batch]:
        o = self.options
        sampler = _RequestBatches(self.stream, o.batch_size, self.batches_consumed * o.batch_size)
        loader = DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=_as_batch, num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=o.prefetch_batches if self.num_workers else None,
            multiprocessing_context=worker_context() if self.num_workers else None,
        )
        for data in loader:
            self.batches_consumed += 1
            yield self._to_batch(data)

    def load_windows(self, items: Sequence[WindowItem]) -> Batch:
        requests = [WindowRequest(self.index_of(cid), start, ref) for cid, start, ref in items]
        return self._to_batch(self.dataset.__getitems__(requests))


class TorchWindowLoader(RequestLoader):
    """Cached windows through torch.utils.data.DataLoader (num_workers, pinned memory)."""

    kind = "torch"

    def __init__(self, cache: TrainingCache, options: LoaderOptions):
        super().__init__(cache.preset, options, cache, cache.num_frames, CachedWindowDataset(cache))
