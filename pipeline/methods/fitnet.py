"""FitNet-style feature mimicking on pooled features: the feature-level baseline (docs/methods.md#fitnet)."""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.options import Help, Range

from .base import (
    POOLED,
    CacheInfo,
    StudentInfo,
    Method,
    StudentOutputs,
    Targets,
    TrainingProgress,
    at_least_float32,
    register_method,
)


@register_method
class FitNet(Method):
    """``weight * MSE(W f_s + b, f_t)`` between the student's pooled feature, mapped to the teacher's
    width by a learned linear layer, and the teacher's cached pooled feature (docs/methods.md#fitnet).

    The map is created here so it is trained with the student; it is dropped at inference.
    """

    name = "fitnet"
    needs = frozenset({POOLED})

    def __init__(self, cache: CacheInfo, student: StudentInfo, *,
                 weight: Annotated[float, Range(ge=0, le=1e4), Help("weight of the feature MSE")] = 1.0) -> None:
        super().__init__(cache, student)
        assert cache.pooled_dim is not None  # guaranteed by CacheInfo once POOLED is available
        self.map = nn.Linear(student.pooled_dim, cache.pooled_dim)
        self.weight = weight

    def forward(
        self, student: StudentOutputs, targets: Targets, labels: Tensor, progress: TrainingProgress
    ) -> dict[str, Tensor]:
        mapped = at_least_float32(self.map(student.pooled))
        return {"fitnet": self.weight * F.mse_loss(mapped, at_least_float32(targets[POOLED]))}
