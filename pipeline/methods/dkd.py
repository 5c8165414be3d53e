"""Decoupled knowledge distillation (Zhao et al., CVPR'22; docs/methods.md#dkd).

With ``b = (p[y], 1 - p[y])`` the binary target / non-target split and ``p̂`` the distribution
renormalised over the C-1 non-target classes, the classical KD loss decomposes per sample as

    KL(p_t || p_s) = KL(b_t || b_s) + (1 - p_t[y]) * KL(p̂_t || p̂_s) = TCKD + (1 - p_t[y]) * NCKD.

DKD drops the coupling weight ``1 - p_t[y]`` and weights the two parts freely.
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.options import Help, Range

from .base import (
    LOGITS,
    CacheInfo,
    StudentInfo,
    Method,
    MethodError,
    StudentOutputs,
    Targets,
    TrainingProgress,
    at_least_float32,
    register_method,
)


def drop_target(x: Tensor, labels: Tensor) -> Tensor:
    """The (B, C-1) columns of ``x`` (logits or log-probabilities) except each row's label, in order.

    Dropping the column is the exact form of the paper's "subtract a large constant at the target":
    no constant is large enough for every logit scale, and none is needed.
    """
    keep = torch.ones_like(x, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), False)
    return x[keep].view(x.shape[0], x.shape[1] - 1)


def _binary_log_probs(log_p: Tensor, labels: Tensor) -> Tensor:
    # (log p[y], log(1 - p[y])) with the second as a logsumexp over the non-target log-probabilities,
    # which stays finite (and has a gradient) when p[y] rounds to 1.
    target = log_p.gather(1, labels.unsqueeze(1))
    rest = torch.logsumexp(drop_target(log_p, labels), dim=1, keepdim=True)
    return torch.cat([target, rest], dim=1)


def _kl_from_log(log_p_s: Tensor, log_p_t: Tensor) -> Tensor:
    # Summed over classes, averaged over the batch.
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def dkd_terms(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """``(TCKD, NCKD)``, each ``T^2``-scaled and averaged over the batch (docs/methods.md#dkd).

    Computed in log space and at least float32, so near one-hot teachers give finite values and
    gradients.
    """
    z_s = at_least_float32(student_logits) / temperature
    z_t = at_least_float32(teacher_logits) / temperature
    log_p_s, log_p_t = F.log_softmax(z_s, dim=1), F.log_softmax(z_t, dim=1)
    tckd = _kl_from_log(_binary_log_probs(log_p_s, labels), _binary_log_probs(log_p_t, labels))
    nckd = _kl_from_log(
        F.log_softmax(drop_target(z_s, labels), dim=1),
        F.log_softmax(drop_target(z_t, labels), dim=1),
    )
    scale = temperature**2
    return scale * tckd, scale * nckd


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> Tensor:
    """``alpha * TCKD + beta * NCKD``, both ``T^2``-scaled and batch-averaged (docs/methods.md#dkd)."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature)
    return alpha * tckd + beta * nckd


@register_method
class DKD(Method):
    """``min(epoch_float / warmup, 1) * (alpha * TCKD + beta * NCKD)`` (docs/methods.md#dkd).

    Defaults follow the paper's CIFAR-100 setting (alpha=1, beta=8, T=4, 20 warm-up epochs); the
    official ImageNet configuration uses beta=0.5 and T=1. ``warmup=0`` disables the ramp.
    Returns the two parts as ``dkd_tckd`` and ``dkd_nckd`` so they can be logged separately.
    """

    name = "dkd"
    needs = frozenset({LOGITS})
    trains_logits = True

    def __init__(
        self,
        cache: CacheInfo,
        student: StudentInfo,
        *,
        alpha: Annotated[float, Range(ge=0, le=1e4), Help("weight of TCKD (target class)")] = 1.0,
        beta: Annotated[float, Range(ge=0, le=1e4), Help("weight of NCKD (non-target classes)")] = 8.0,
        T: Annotated[float, Range(ge=0.01, le=100), Help("softmax temperature")] = 4.0,
        warmup: Annotated[float, Range(ge=0, le=1e4), Help("epochs of linear ramp-up of both terms (0: none)")] = 20.0,
    ) -> None:
        super().__init__(cache, student)
        if cache.num_classes < 2:
            raise MethodError(f"method 'dkd' needs at least 2 classes, the cache has {cache.num_classes}")
        self.alpha = alpha
        self.beta = beta
        self.T = T
        self.warmup = warmup

    def forward(
        self, student: StudentOutputs, targets: Targets, labels: Tensor, progress: TrainingProgress
    ) -> dict[str, Tensor]:
        # The NCKD weight (8 on CIFAR) is large against CE early on; ramping both in avoids a bad start.
        ramp = min(progress.epoch_float / self.warmup, 1.0) if self.warmup > 0 else 1.0
        tckd, nckd = dkd_terms(student.logits, targets[LOGITS], labels, self.T)
        return {"dkd_tckd": ramp * self.alpha * tckd, "dkd_nckd": ramp * self.beta * nckd}
