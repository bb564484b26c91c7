"""The `resident` read strategy's data: this rank's partition of the clips, held in memory for the run.

A partition is the set of clips one rank trains on for the whole run (sampling.assign_partitions:
balanced by frames; recorded in every checkpoint by clip uid, so a resume keeps it). Its clips' frames
rows (the F + A float16 columns a window and its reference row are cut from; not the coefficients or
the identity) are read once from the shards into one buffer: device memory on a GPU, host memory on
the CPU, in shard order (each shard read forward), with a table of where each clip starts. The DALI
pipeline then cuts every window out of that buffer on the device (window_read.cc, DaliFloatWindowGather).
The cache stays open and leased meanwhile, as with the other strategies.

Whether a partition fits is decided against the memory it would live in (`ResidentFit`): the GPU's
free memory (torch.cuda.mem_get_info), or on the CPU MemAvailable (/proc/meminfo), which the node's
local ranks share, less a reserve (--resident_reserve_gb) for the model, the optimiser, activations
and whatever else the process allocates later.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dali_float.cache import format as cf
from dali_float.errors import CacheError, CheckpointError
from dali_float.loaders.cached import TrainingCache, pread_fully
from dali_float.loaders.sampling import assign_partitions
from dali_float.progress import Progress, progress_bar

log = logging.getLogger(__name__)

GB = 10**9
# Memory left besides the partition when --resident_reserve_gb is not given. A GPU: the model, optimiser
# state, activations, sample videos and DALI's buffers (float, batch 8: a few GB; twice that for margin).
# The CPU: the rest of the process and the machine.
DEFAULT_RESERVE_GB = {"cuda": 16.0, "cpu": 4.0}
# Host staging on the way to a GPU: two pinned halves, one read into while the other is copied.
STAGING_BYTES = 256 << 20


def gb(nbytes: float) -> str:
    """Bytes for a log line: "1.20 GB", "35.2 MB"."""
    return f"{nbytes / GB:.2f} GB" if nbytes >= GB else f"{nbytes / 1e6:.1f} MB"


def reserve_bytes(reserve_gb: float | None, device: torch.device) -> int:
    """--resident_reserve_gb in bytes; None: DEFAULT_RESERVE_GB of the device's type."""
    return int((DEFAULT_RESERVE_GB[device.type] if reserve_gb is None else reserve_gb) * GB)


def free_memory_bytes(device: torch.device) -> int:
    """Bytes free where a partition would live: the GPU's free memory, or the host's MemAvailable
    (what can be allocated without swapping: free memory plus the reclaimable page cache)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ResidentFit:
    """A partition's bytes against the memory it would live in (all sizes in bytes)."""

    partition_bytes: int  # this rank's partition
    clips: int  # clips in it
    free_bytes: int  # free memory of the GPU, or MemAvailable of the host
    reserve_bytes: int  # left for everything else (--resident_reserve_gb)
    where: str  # "free on cuda:0", "available in host memory"
    ranks_sharing: int = 1  # ranks whose partitions share that memory: the local ranks on a CPU, 1 per GPU

    @property
    def needed_bytes(self) -> int:
        return self.partition_bytes * self.ranks_sharing + self.reserve_bytes

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.free_bytes

    def describe(self) -> str:
        """One line with the sizes, e.g. "this rank's partition 1.20 GB (310 clips) + reserve 16.00 GB =
        17.20 GB fits in the 79.10 GB free on cuda:0"."""
        shared = f" x {self.ranks_sharing} local ranks" if self.ranks_sharing > 1 else ""
        return (f"this rank's partition {gb(self.partition_bytes)} ({self.clips} clips){shared} + reserve "
                f"{gb(self.reserve_bytes)} = {gb(self.needed_bytes)} {'fits' if self.fits else 'does not fit'} in "
                f"the {gb(self.free_bytes)} {self.where}")

    @classmethod
    def measure(cls, partition_bytes: int, clips: int, device: torch.device, reserve_gb: float | None) -> ResidentFit:
        """The fit on this machine now (the free memory measured, the local ranks counted on a CPU)."""
        on_gpu = device.type == "cuda"
        return cls(partition_bytes, clips, free_memory_bytes(device), reserve_bytes(reserve_gb, device),
                   f"free on {device}" if on_gpu else "available in host memory",
                   1 if on_gpu else max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


@dataclass(frozen=True)
class Partition:
    """This rank's clips for the whole run: `owner` (clips,) int32 gives the rank of each clip of the
    training view (-1 where it is not known here: other ranks' clips after a resume); `digest` identifies
    the whole assignment when it was made (clip uids and their ranks), so a resume tells a changed cache."""

    shard_id: int
    num_shards: int
    owner: np.ndarray
    digest: str

    @property
    def rows(self) -> np.ndarray:
        """(n,) int64 training-view rows of this rank's clips, ascending."""
        return np.flatnonzero(self.owner == self.shard_id)

    def nbytes(self, cache: TrainingCache) -> int:
        """Bytes of this partition's frames rows (the resident buffer)."""
        return int(cache.num_frames[self.rows].sum()) * cf.row_bytes(cache.preset)

    @classmethod
    def assign(cls, cache: TrainingCache, shard_id: int, num_shards: int) -> Partition:
        owner = assign_partitions(cache.num_frames, num_shards)
        return cls(shard_id, num_shards, owner, _digest(cache.view.rows["uid"], owner))

    def state(self, cache: TrainingCache) -> dict[str, Any]:
        """What a checkpoint records (torch.save-able, weights_only): the clip uids this rank holds."""
        rows = self.rows
        return {"shard_id": self.shard_id, "num_shards": self.num_shards, "digest": self.digest,
                "uids": torch.from_numpy(np.ascontiguousarray(cache.view.rows["uid"][rows], dtype=np.int64)),
                "frames": int(cache.num_frames[rows].sum())}

    @classmethod
    def restore(cls, cache: TrainingCache, state: dict[str, Any], shard_id: int, num_shards: int) -> Partition:
        """The partition a checkpoint recorded. CheckpointError (one line) when it was made for another
        rank or world size, or names clips the cache no longer holds; a warning when the cache's clips
        changed since (this rank keeps its recorded clips; clips added since are not trained on)."""
        if (state.get("shard_id"), state.get("num_shards")) != (shard_id, num_shards):
            raise CheckpointError(f"the checkpoint's resident partition belongs to rank {state.get('shard_id')} of "
                                  f"{state.get('num_shards')}, this is rank {shard_id} of {num_shards}: resume with "
                                  f"the world size the run started with")
        uids = np.asarray(state["uids"], dtype=np.int64)
        all_uids = np.asarray(cache.view.rows["uid"], dtype=np.int64)
        by_uid = np.argsort(all_uids, kind="stable")  # an open cache holds at least one clip
        at = np.searchsorted(all_uids[by_uid], uids).clip(0, len(all_uids) - 1)
        found = all_uids[by_uid[at]] == uids
        if not found.all():
            raise CheckpointError(f"{int((~found).sum())} of the {len(uids)} clips of this rank's resident partition "
                                  f"(uids {uids[~found][:3].tolist()}...) are no longer trainable in {cache.root}: "
                                  f"this run cannot continue with its partition; start a new run (another "
                                  f"--output_dir) or restore those clips")
        owner = np.full(len(cache), -1, dtype=np.int32)
        owner[by_uid[at]] = shard_id
        fresh = _digest(all_uids, assign_partitions(cache.num_frames, num_shards)) if len(cache) >= num_shards else ""
        if fresh != state["digest"]:
            log.warning("the cache's trainable clips changed since this run started: rank %d keeps the %d clips of "
                        "its resident partition; clips added since are not trained on in this run (a new run "
                        "includes them)", shard_id, len(uids))
        return cls(shard_id, num_shards, owner, str(state["digest"]))


def _digest(uids: np.ndarray, owner: np.ndarray) -> str:
    order = np.argsort(uids, kind="stable")
    h = hashlib.sha256(np.ascontiguousarray(uids[order], dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(owner[order], dtype=np.int32).tobytes())
    return h.hexdigest()


class ResidentBuffer:
    """A partition's frames rows in one uint8 tensor: (bytes,) on the GPU or in host memory.

    offset_of_row: (clips,) int64, the byte offset of each clip's rows in the buffer, -1 for clips of
    other ranks. The buffer must stay alive and unchanged while a pipeline reads it (by address).
    """

    def __init__(self, tensor: torch.Tensor, offset_of_row: np.ndarray, load_s: float = 0.0):
        self.tensor, self.offset_of_row = tensor, offset_of_row
        self.load_s = load_s  # seconds the load took (the bench reports it)

    @property
    def address(self) -> int:
        return self.tensor.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    @classmethod
    def load(cls, cache: TrainingCache, rows: np.ndarray, device: torch.device, progress: bool = False,
             staging_bytes: int | None = None) -> ResidentBuffer:
        """Read the frames rows of clips `rows` into a new buffer on `device`, in shard order; logs the
        bytes and seconds. staging_bytes: host staging on the way (None: none on the CPU, where the reads
        land in the buffer itself; STAGING_BYTES on a GPU)."""
        view = cache.view.rows
        row_bytes = cf.row_bytes(cache.preset)
        order = rows[np.lexsort((view["offset"][rows], view["shard"][rows]))]
        sizes = view["num_frames"][order].astype(np.int64) * row_bytes
        offset_of_row = np.full(len(cache), -1, dtype=np.int64)
        offset_of_row[order] = np.cumsum(sizes) - sizes
        total = int(sizes.sum())
        if staging_bytes is None and device.type == "cuda":
            staging_bytes = STAGING_BYTES
        started = time.perf_counter()
        tensor = torch.empty(total, dtype=torch.uint8, device=device)
        fds: dict[int, int] = {}
        try:
            # leave=False: the training bar is already on screen when the first batch loads the partition
            with progress_bar(total=total, unit="B", unit_scale=True, desc="resident", disable=not progress,
                              dynamic_ncols=True, leave=False) as bar:
                reads = _Reads(cache, order, fds, bar)
                if staging_bytes is None:
                    reads.into(tensor.numpy())
                else:
                    reads.through_staging(tensor, staging_bytes)
        finally:
            for fd in fds.values():
                os.close(fd)
        seconds = time.perf_counter() - started
        log.info("resident partition: %d clips, %s of frames rows loaded into %s in %.1f s (%.2f GB/s)", len(order),
                 gb(total), device if device.type == "cuda" else "host memory", seconds,
                 total / GB / max(seconds, 1e-9))
        return cls(tensor, offset_of_row, seconds)


class _Reads:
    """The partition's records' frames parts, read in buffer order (contiguous, no gaps)."""

    def __init__(self, cache: TrainingCache, order: np.ndarray, fds: dict[int, int], bar: Progress):
        self.cache, self.order, self.fds, self.bar = cache, order, fds, bar
        self.row_bytes = cf.row_bytes(cache.preset)

    def _pieces(self, most_bytes: int):
        """(clip row, fd, shard byte offset, bytes) in buffer order, none over most_bytes."""
        view = self.cache.view.rows
        for row in self.order.tolist():
            shard = int(view["shard"][row])
            fd = self.fds.get(shard)
            if fd is None:
                fd = self.fds[shard] = os.open(self.cache.view.shards[shard], os.O_RDONLY | os.O_CLOEXEC)
            offset, left = int(view["offset"][row]), int(view["num_frames"][row]) * self.row_bytes
            # The kernel reads ahead what comes next (shards are read forward, clip after clip).
            os.posix_fadvise(fd, offset, left, os.POSIX_FADV_SEQUENTIAL)
            while left:
                n = min(left, most_bytes)
                yield row, fd, offset, n
                offset, left = offset + n, left - n

    def _read(self, row: int, fd: int, offset: int, out: np.ndarray) -> None:
        if not pread_fully(fd, out, offset):
            raise CacheError(self.cache.describe_failure(row, "the shard ends early"))
        self.bar.update(len(out))

    def into(self, host: np.ndarray) -> None:
        """Straight into the (host) buffer."""
        at = 0
        for row, fd, offset, n in self._pieces(1 << 30):
            self._read(row, fd, offset, host[at:at + n])
            at += n

    def through_staging(self, buffer: torch.Tensor, staging_bytes: int) -> None:
        """Through two host halves (pinned for a GPU): the reads fill one while the other is copied to
        `buffer` (asynchronously on a GPU; each half waits for its previous copy before it is refilled)."""
        on_gpu = buffer.is_cuda
        half = max(1, staging_bytes // 2)
        halves = [torch.empty(half, dtype=torch.uint8, pin_memory=on_gpu) for _ in range(2)]
        copied: list[Any] = [None, None]  # the CUDA event of each half's last copy
        k = used = at = 0

        def flush() -> None:
            nonlocal at
            buffer[at:at + used].copy_(halves[k][:used], non_blocking=on_gpu)
            if on_gpu:
                copied[k] = torch.cuda.Event()
                copied[k].record()
            at += used

        for row, fd, offset, n in self._pieces(half):
            if used + n > half:
                flush()
                k, used = 1 - k, 0
                if copied[k] is not None:
                    copied[k].synchronize()  # its last copy has left it
            self._read(row, fd, offset, halves[k].numpy()[used:used + n])
            used += n
        flush()
        if on_gpu:
            torch.cuda.synchronize(buffer.device)  # the pipeline reads it on a stream of its own
