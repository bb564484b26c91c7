"""The interface every loader implements, its options, and the one place a window becomes a Batch."""
from __future__ import annotations

import abc
import ctypes
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import torch

from dali_float.cache import format as cf
from dali_float.config import Preset
from dali_float.contract import FEATURE_DTYPE, Batch
from dali_float.errors import UsageError
from dali_float.loaders.sampling import EPOCH_POLICIES, REF_RULES, check_choice

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h) and the values the loaders run with (see keep_freed_host_memory).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's own ceiling for its adaptive threshold
TRIM_THRESHOLD_BYTES = 256 << 20
_allocator_tuned: bool | None = None  # None: not tried yet


@dataclass(frozen=True)
class LoaderOptions:
    """Settings shared by the loaders; each loader ignores what does not apply to it."""

    batch_size: int = 8
    seed: int = 0
    ref_rule: str = "first"  # first | random_in_clip | random_in_window
    epoch_policy: str = "windows"  # windows | clips (see loaders.sampling)
    device: str = "cpu"  # where batches are delivered: "cpu" or "cuda[:N]"
    shard_id: int = 0  # this rank
    num_shards: int = 1  # world size
    num_workers: int = 2  # torch: DataLoader worker processes
    num_threads: int = 2  # dali: pipeline CPU threads
    prefetch_batches: int = 2  # batches prepared ahead
    read_strategy: str = "auto"  # dali: auto | pread | resident | python
    resident_reserve_gb: float | None = None  # dali, resident: memory left besides the partition, GB (None: 16 on
    #                                           a GPU, 4 on the CPU: loaders.resident.DEFAULT_RESERVE_GB)
    progress: bool = False  # progress bars (the resident partition's load)

    def __post_init__(self) -> None:
        check_choice("ref", self.ref_rule, REF_RULES)
        check_choice("epoch_policy", self.epoch_policy, EPOCH_POLICIES)
        if self.batch_size < 1:
            raise UsageError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise UsageError(f"device {self.device!r}: use cpu or cuda[:N]")
        if self.resident_reserve_gb is not None and not self.resident_reserve_gb >= 0:
            raise UsageError(f"--resident_reserve_gb must be at least 0, got {self.resident_reserve_gb}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


WindowItem = tuple[str, int, int]  # (clip id, window start, reference frame)


class ClipNames(Protocol):
    """A loader's clips by index: what the naive loader's list and the cache's memory-mapped ids share."""

    def __len__(self) -> int: ...

    def clip_id(self, i: int) -> str: ...

    def clip_ids(self, indices) -> list[str]: ...

    def index_of(self, clip_id: str) -> int: ...


class ClipList:
    """ClipNames over a list of ids (the naive loader: one per video, found by probing)."""

    def __init__(self, ids: Sequence[str]):
        self._ids = list(ids)
        self._index = {c: i for i, c in enumerate(self._ids)}

    def __len__(self) -> int:
        return len(self._ids)

    def clip_id(self, i: int) -> str:
        return self._ids[int(i)]

    def clip_ids(self, indices) -> list[str]:
        return [self._ids[int(i)] for i in indices]

    def index_of(self, clip_id: str) -> int:
        try:
            return self._index[clip_id]
        except KeyError:
            raise UsageError(f"clip {clip_id!r} is not among this loader's clips") from None


class WindowLoader(abc.ABC):
    """An endless stream of Batches (epochs follow each other), resumable from `state_dict()`.

    `samples_per_epoch` is this rank's share of an epoch. A batch is valid until the next one is
    requested (the DALI loader hands out its buffers without copying).
    """

    kind: str = ""

    def __init__(self, preset: Preset, options: LoaderOptions, clips: ClipNames):
        keep_freed_host_memory()
        self.preset, self.options = preset, options
        self.clips = clips  # by index; a cached loader's are memory-mapped, never a list of ids
        self.batches_consumed = 0

    @property
    @abc.abstractmethod
    def samples_per_epoch(self) -> int: ...

    @abc.abstractmethod
    def batches(self) -> Iterator[Batch]:
        """Batches from the current position on; each one counts as consumed once yielded."""

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    @abc.abstractmethod
    def load_windows(self, items: Sequence[WindowItem]) -> Batch:
        """The batch for a fixed list of (clip id, window start, reference frame): the parity hook."""

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "batches_consumed": self.batches_consumed,
                "batch_size": self.options.batch_size, "seed": self.options.seed,
                "shard_id": self.options.shard_id, "num_shards": self.options.num_shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` was taken (call before iterating)."""
        mine = self.state_dict()
        for key in ("kind", "batch_size", "seed", "shard_id", "num_shards"):
            if state.get(key) != mine[key]:
                raise UsageError(f"cannot resume the loader: {key} was {state.get(key)!r}, now {mine[key]!r}")
        self.batches_consumed = int(state["batches_consumed"])

    def close(self) -> None:
        """Release workers and pipelines."""

    def index_of(self, clip_id: str) -> int:
        return self.clips.index_of(clip_id)


def keep_freed_host_memory() -> bool:
    """Let glibc keep freed batch buffers for reuse instead of handing them back to the kernel.

    Every batch is a fresh host allocation (DALI's outputs, torch's collated tensors): a float batch
    of 8 is 9.3 MB (~2,300 pages). By default glibc unmaps or trims such blocks on free, so later
    batches fault zeroed pages in again (50-380 per float batch measured on 2 cores), which cost the
    float loaders up to half their samples/s (docs/BENCHMARKS.md). Pinning the thresholds keeps up to 256 MiB of freed heap in the process.
    Process-wide, once; returns whether the thresholds are pinned (False where the C library has no
    mallopt, i.e. is not glibc: allocations keep their defaults).
    """
    global _allocator_tuned
    if _allocator_tuned is None:
        try:
            mallopt = ctypes.CDLL(None).mallopt
            _allocator_tuned = (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
                                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)
        except (OSError, AttributeError):
            _allocator_tuned = False
        log.debug("malloc thresholds pinned (mmap %d MiB, trim %d MiB): %s",
                  MMAP_THRESHOLD_BYTES >> 20, TRIM_THRESHOLD_BYTES >> 20, _allocator_tuned)
    return _allocator_tuned


def batch_from_windows(preset: Preset, windows: torch.Tensor, ref_motion: torch.Tensor, emotion: torch.Tensor,
                       window_start: torch.Tensor, ref_frame: torch.Tensor, clip_ids: list[str]) -> Batch:
    """Split window rows, (B, 60, F + A) float16, into the contract's fields (views, no copy)."""
    p = preset.timing.num_prev_frames
    motion, audio = cf.motion_columns(preset), cf.audio_columns(preset)
    return Batch(
        prev_motion=windows[:, :p, motion], motion=windows[:, p:, motion],
        prev_audio=windows[:, :p, audio], audio=windows[:, p:, audio],
        ref_motion=ref_motion.reshape(ref_motion.shape[0], -1),
        emotion=emotion.to(FEATURE_DTYPE),
        window_start=window_start.reshape(-1).to(torch.int64), ref_frame=ref_frame.reshape(-1).to(torch.int64),
        clip_id=clip_ids,
    )
