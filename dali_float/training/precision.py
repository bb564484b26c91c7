"""Mixed precision: which autocast, which dtype the batch features enter with, whether a GradScaler runs.

  fp16  autocast float16 + GradScaler; the loader's float16 features go in as they are (no cast).
  bf16  autocast bfloat16, no scaler (bfloat16 has float32's range); features cast to float32 first,
        because autocast cannot mix float16 inputs with a bfloat16 region (torch.cat fails).
  no    float32 everywhere; features cast to float32.

In every mode the model's parameters and the optimiser state stay float32.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from dali_float.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    name: str  # fp16 | bf16 | no
    device_type: str  # cpu | cuda
    autocast_dtype: torch.dtype | None  # None: no autocast
    feature_dtype: torch.dtype | None  # what batch features are cast to (None: as delivered, float16)

    @property
    def description(self) -> str:
        return {"fp16": "fp16 (autocast + GradScaler)", "bf16": "bf16 (autocast)", "no": "float32"}[self.name]

    @property
    def uses_scaler(self) -> bool:
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler for fp16; a disabled one (every call a pass-through) otherwise."""
        return torch.amp.GradScaler(self.device_type, enabled=self.uses_scaler)


def resolve_precision(requested: str | None, device: torch.device) -> Precision:
    """The precision for `requested` (None: fp16 on a GPU, no on the CPU, with a one-line notice)."""
    if requested is None:
        requested = "fp16" if device.type == "cuda" else "no"
        if device.type == "cpu":
            log.info("mixed precision: no (float32) on the CPU; a GPU run defaults to fp16")
    if requested == "fp16":
        if device.type == "cpu":
            log.warning("--mixed_precision fp16 on the CPU: correct but slow (float16 kernels on the CPU are)")
        return Precision("fp16", device.type, torch.float16, None)
    if requested == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UsageError("--mixed_precision bf16: this GPU has no bfloat16 support; use fp16")
        return Precision("bf16", device.type, torch.bfloat16, torch.float32)
    if requested == "no":
        return Precision("no", device.type, None, torch.float32)
    raise UsageError(f"--mixed_precision {requested!r} is not one of fp16, bf16, no")
