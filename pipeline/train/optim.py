"""Optimizers and the cosine-with-warm-up learning-rate schedule shared by every training loop."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import ClassVar

import torch
from pydantic import model_validator

from pipeline.options import Config, OptionError, Range, check_ranges


class OptimConfig(Config):
    """The optimiser and its schedule: part of a run's `RunSettings`."""

    optimizer: str = "adamw"  # "adamw" | "sgd"
    lr: float = 2e-3
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 1.0
    clip_grad: float | None = None

    RANGES: ClassVar[dict[str, Range]] = {
        "lr": Range(gt=0), "weight_decay": Range(ge=0), "momentum": Range(ge=0, lt=1), "warmup_epochs": Range(ge=0),
        "clip_grad": Range(gt=0)}

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.optimizer not in ("adamw", "sgd"):
            raise OptionError(f"--optimizer must be adamw or sgd, not '{self.optimizer}'")
        check_ranges(vars(self), self.RANGES)
        return self


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (1-d parameters), as in timm's param groups.
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base lr, then cosine decay to 0 at `total_steps` (stepped per batch)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
