"""Optimiser, learning-rate schedule and EMA of the weights: the state an exact resume must restore."""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

COSINE_FLOOR = 0.1  # a cosine schedule ends at this fraction of the peak learning rate
ADAM_BETAS = (0.9, 0.999)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimiser updates: parameters with requires_grad (the FMT's pos_embed is fixed)."""
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (float32); weight decay on matrices only, not biases or norms."""
    params = trainable_parameters(model)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS)


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up to `peak`, then constant or cosine (down to peak * COSINE_FLOOR at `total_steps`).

    A pure function of the step, so the step restores it; its settings go into the checkpoint
    (`state_dict`) so a resume with other settings says so.
    """

    peak: float
    warmup_steps: int
    kind: str  # constant | cosine
    total_steps: int

    def __call__(self, step: int) -> float:
        """Learning rate of the update made at `step` (0-based)."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return self.peak
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        floor = self.peak * COSINE_FLOOR
        return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.peak - floor)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_resumed(self, saved: dict[str, Any]) -> None:
        """Warn (once) when the checkpoint was trained under another schedule; this run's one applies."""
        if saved != self.state_dict():
            log.warning("the checkpoint's learning-rate schedule was %s; continuing with %s", saved, self.state_dict())


class EMA:
    """Exponential moving average of the trainable parameters, float32, with the usual warm-up.

    After n updates the decay is min(decay, (1 + n) / (10 + n)), so early averages are not dominated
    by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in trainable_parameters(model)]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in trainable_parameters(model)], 1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates,
                "params": {name: t.clone() for name, t in zip(self.names, self.shadow)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(state["params"][name])


def with_ema_weights(model_state: dict[str, torch.Tensor], ema_state: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """A model state dict whose trainable parameters are the EMA's (the input as is without an EMA)."""
    if not ema_state:
        return model_state
    return {**model_state, **{k: v.to(model_state[k].dtype) for k, v in ema_state["params"].items()}}
