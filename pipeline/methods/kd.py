"""Hinton knowledge distillation on logits (docs/methods.md#kd)."""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from torch import Tensor

from pipeline.options import Help, Range

from .base import (
    LOGITS,
    CacheInfo,
    StudentInfo,
    Method,
    StudentOutputs,
    Targets,
    TrainingProgress,
    at_least_float32,
    register_method,
)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(p_t || p_s)`` with ``p = softmax(z / T)``, averaged over the batch (docs/methods.md#kd).

    The T^2 factor keeps the gradient, ``T * (p_s - p_t) / B`` w.r.t. the student logits, on the
    same scale as CE's when T changes.
    """
    log_p_s = F.log_softmax(at_least_float32(student_logits) / temperature, dim=-1)
    log_p_t = F.log_softmax(at_least_float32(teacher_logits) / temperature, dim=-1)
    # Log-space target: a teacher probability that underflows to 0 contributes 0, never 0 * log 0.
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return temperature**2 * kl


@register_method
class KD(Method):
    """``alpha * T^2 * KL(p_t || p_s)``. CE is a separate method: a KD run is ``--method ce --method kd``."""

    name = "kd"
    needs = frozenset({LOGITS})
    trains_logits = True

    def __init__(self, cache: CacheInfo, student: StudentInfo, *, T: Annotated[float, Range(ge=0.01, le=100), Help("softmax temperature")] = 4.0,
                 alpha: Annotated[float, Range(ge=0, le=1e4), Help("weight of the KD term")] = 1.0) -> None:
        super().__init__(cache, student)
        self.T = T
        self.alpha = alpha

    def forward(
        self, student: StudentOutputs, targets: Targets, labels: Tensor, progress: TrainingProgress
    ) -> dict[str, Tensor]:
        return {"kd": self.alpha * kd_loss(student.logits, targets[LOGITS], self.T)}
