"""Loss-weight schedules shared by methods (WKD's cosine decay, docs/methods.md#wkd-l, docs/methods.md#wkd-f)."""
from __future__ import annotations

import math

from .base import TrainingProgress


def cosine_decay(progress: TrainingProgress, start_epoch: float = 0.0) -> float:
    """Factor in [0, 1]: 1 until ``start_epoch``, then ``(1 + cos(pi * s)) / 2`` with ``s`` the share of
    the remaining epochs done, reaching 0 at the end of training (WKD's "w cosine-decayed over training,
    optionally after epoch E0"). Computed on ``progress.epoch_float``, so it moves every step, not only
    at epoch boundaries. A ``start_epoch`` at or beyond the last epoch keeps the factor at 1.
    """
    if start_epoch < 0:
        raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
    span = progress.total_epochs - start_epoch
    elapsed = progress.epoch_float - start_epoch
    if span <= 0 or elapsed <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(elapsed / span, 1.0)))
