"""Comparisons the tests share."""
from __future__ import annotations

import torch


def within_one_float16_ulp(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether two float16 roundings of float32 values computed in another order (another batch, another
    thread count) agree to the last bit of float16: 1 ulp of `want` (subnormals: the smallest normal's)."""
    got, want = got.cpu().float(), want.cpu().float()
    ulp = torch.finfo(torch.float16).eps * want.abs().clamp_min(2.0 ** -14)
    return bool(((got - want).abs() <= ulp + 1e-6).all())
