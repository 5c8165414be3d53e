"""Cross-entropy with the dataset labels: the supervised term most runs add beside a KD method (docs/methods.md#compose)."""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from torch import Tensor

from pipeline.options import Help, Range

from .base import CacheInfo, Method, StudentInfo, StudentOutputs, Targets, TrainingProgress, register_method


@register_method
class CrossEntropy(Method):
    """``weight * CE(z_s, y)`` with optional label smoothing; needs nothing from the cache."""

    name = "ce"
    needs = frozenset()
    trains_logits = True

    def __init__(
        self, cache: CacheInfo, student: StudentInfo, *, label_smoothing: Annotated[float, Range(ge=0, le=1), Help("label smoothing of the targets")] = 0.0,
        weight: Annotated[float, Range(ge=0, le=1e4), Help("weight of the CE term")] = 1.0,
    ) -> None:
        super().__init__(cache, student)
        self.label_smoothing = label_smoothing
        self.weight = weight

    def forward(
        self, student: StudentOutputs, targets: Targets, labels: Tensor, progress: TrainingProgress
    ) -> dict[str, Tensor]:
        ce = F.cross_entropy(student.logits, labels, label_smoothing=self.label_smoothing)
        return {"ce": self.weight * ce}
