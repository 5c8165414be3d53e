"""Optimizers and the cosine-with-warm-up learning-rate schedule shared by every training loop."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated, Literal

from pipeline.options import MAX_CLIP_GRAD, MAX_EPOCHS, MAX_LR, MAX_WEIGHT_DECAY, Config, Help, Range

if TYPE_CHECKING:  # the config is read without torch (the command line's help); the functions import it
    import torch


class OptimConfig(Config):
    """The optimiser and its schedule: part of a run's `RunSettings` (``[settings.optim]`` of a sweep file)."""

    optimizer: Annotated[Literal["adamw", "sgd"], Help("optimiser")] = "adamw"
    lr: Annotated[float, Range(gt=0, le=MAX_LR), Help("peak learning rate (cosine schedule after a linear warm-up)")] = 2e-3
    weight_decay: Annotated[float, Range(ge=0, le=MAX_WEIGHT_DECAY), Help("weight decay (not on norms and biases)")] = 0.05
    momentum: Annotated[float, Range(ge=0, lt=1), Help("SGD momentum (sgd only)")] = 0.9
    warmup_epochs: Annotated[float, Range(ge=0, le=MAX_EPOCHS), Help("epochs of linear learning-rate warm-up")] = 1.0
    clip_grad: Annotated[float | None, Range(gt=0, le=MAX_CLIP_GRAD), Help("clip the gradient norm to this value")] = None


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    import torch

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
    import torch

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
