"""One process or many (torchrun): the device, the process group, and how ranks agree and stop together.

Under `torchrun --nproc_per_node N [--nnodes M ...]` every rank runs the same trainer: DDP over
NCCL on GPUs, gloo on the CPU. A rank never decides alone to skip a step or to stop: the per-step
flags (non-finite loss, stop requested by a signal) are summed over ranks in the one all-reduce each
step makes (`Distributed.sum`), so every rank takes the same branch at the same step.
"""
from __future__ import annotations

import logging
import os
import re
import signal
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist

from dali_float.cli import env_rank, visible_cuda_devices
from dali_float.errors import UsageError
from dali_float.interrupts import Interrupts

log = logging.getLogger(__name__)


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """--device auto | cpu | cuda | cuda:N. auto: cuda if there is one, else cpu. cuda: under torchrun each
    rank takes the GPU of its LOCAL_RANK. UsageError (one line) for CUDA on a machine without it."""
    gpus = visible_cuda_devices()
    if requested == "auto":
        requested = "cuda" if gpus else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", requested):
        raise UsageError(f"--device {requested!r}: use auto, cpu, cuda or cuda:N")
    if not gpus:
        raise UsageError(f"--device {requested}: CUDA is not available on this machine; use --device cpu (or auto)")
    if ":" in requested:
        index = int(requested.split(":")[1])
        if index >= gpus:
            raise UsageError(f"--device {requested}: this machine has {gpus} CUDA device(s) (0..{gpus - 1})")
        return torch.device("cuda", index)
    if local_rank >= gpus:
        raise UsageError(f"LOCAL_RANK {local_rank} but this machine has {gpus} CUDA device(s): "
                         f"start at most {gpus} processes per node")
    return torch.device("cuda", local_rank)


@dataclass
class Distributed:
    """This process's place in the run: rank, world size, device; the process group when world > 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def start(cls, device: str) -> Distributed:
        """Read the torchrun environment, pick the device, and join the process group if there is one."""
        rank, world = env_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        dev = resolve_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        me = cls(rank, world, local_rank, dev)
        if rank != 0:  # only rank 0 talks; the others still warn
            logging.getLogger("dali_float").setLevel(logging.WARNING)
        if world > 1:
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
            log.info("rank %d of %d on %s (%s)", rank, world, dev, backend)
        return me

    def sum(self, values: Sequence[torch.Tensor | float]) -> list[float]:
        """Sum scalars over ranks and bring them to the host: the step's one sync point (and collective)."""
        flat = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device).detach().reshape(())
                            for v in values])
        if self.enabled:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return flat.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (small objects: loader and RNG states)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


class StopSignal(Interrupts):
    """Turns SIGINT / SIGTERM into a request to stop after the current step (save, then exit).

    A second SIGINT stops at once (KeyboardInterrupt). SIGTERM never does: torchrun forwards a
    SIGTERM right after the terminal's SIGINT, and that must not cut the save short.
    """

    def on_signal(self, signum: int) -> None:
        if self.received == 1:
            log.warning("%s: stopping after this step and saving a checkpoint (press Ctrl-C again to stop at once)",
                        self.signal_name)
        elif signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
