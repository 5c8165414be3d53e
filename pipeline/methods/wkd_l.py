"""WKD-L: discrete Wasserstein distance between teacher and student class distributions (docs/methods.md#wkd-l).

Lv et al., "Wasserstein Distance Rivals Kullback-Leibler Divergence for Knowledge-Based Distillation"
(NeurIPS'24). The ground cost between classes comes from the teacher's category interrelations
(linear CKA, docs/cache-format.md#statistics), which the teacher pass stores as ``stats/cka/ir`` (from logits by default,
docs/methods.md#wkd-deviations); the distance is entropic Sinkhorn.

Target removal without a per-sample cost. The paper, like DKD, drops the target class and solves a
(C-1) x (C-1) problem per sample, which materialises an N x (C-1) x (C-1) cost. Here the C x C kernel is
shared by the batch and the target gets zero mass in both non-target distributions and in the initial
scaling ``u0``; then every Sinkhorn update keeps ``u[y] = v[y] = 0``, the target row and column of the
plan ``diag(u) K diag(v)`` vanish, and the iterates on the other classes are exactly those of the reduced
problem. The distance is ``u^T (K * Cost) v`` per sample, so nothing larger than (B, C) is kept for the
backward pass besides the shared (C, C) matrices.
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
    Method,
    MethodError,
    StudentInfo,
    StudentOutputs,
    Targets,
    TrainingProgress,
    at_least_float32,
    register_method,
)
from .schedules import cosine_decay

IR_STATISTIC = "cka/ir"
"""Key of the category interrelation matrix in :attr:`CacheInfo.statistics` (docs/cache-format.md#contract ``stats/cka/ir``)."""

_TINY = 1e-8  # the published cost floor and Sinkhorn denominator guard


def interrelation_cost(ir: Tensor, kappa: float) -> Tensor:
    """Ground cost ``relu(1 - exp(-kappa * (1 - IR))) + 1e-8`` (C, C) float32 (docs/methods.md#wkd-l).

    ``kappa`` sharpens: a larger value pushes every cost between unrelated classes towards 1. The
    floor keeps the diagonal (IR = 1) strictly positive, as in the published code.
    """
    cost = 1.0 - torch.exp(-kappa * (1.0 - ir.float()))
    return F.relu(cost) + _TINY


def sinkhorn_distance(
    p_s: Tensor, p_t: Tensor, cost: Tensor, reg: float, iters: int, support: Tensor | None = None
) -> Tensor:
    """Per-sample transport cost ``<plan, cost>`` of entropic Sinkhorn between rows of ``p_s`` and ``p_t``.

    ``p_s``, ``p_t`` (B, C) are distributions, ``cost`` (C, C) is shared by the batch. Plain domain, in
    float32 (float64 for float64 inputs) even under autocast (docs/methods.md#wkd-l): ``K = exp(-cost / reg)``, ``u0``
    uniform over ``support`` (B, C) bool, all classes when None; ``iters`` times ``v = p_t / (K^T u + 1e-8)``,
    ``u = p_s / (K v + 1e-8)``; the result is ``sum(diag(u) K diag(v) * cost) = u^T (K * cost) v``, (B,).
    Gradients flow through every iteration to ``p_s`` (and ``p_t`` when it requires them). The regulariser
    follows POT's convention (``ot.sinkhorn2(a, b, M, reg)`` uses the same ``K``), without its entropy term.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    dtype = torch.promote_types(torch.promote_types(p_s.dtype, p_t.dtype), torch.float32)
    with torch.autocast(p_s.device.type, enabled=False):
        p_s, p_t, cost = p_s.to(dtype), p_t.to(dtype), cost.to(dtype)
        kernel = torch.exp(-cost / reg)
        weighted = kernel * cost
        if support is None:
            u = torch.full_like(p_s, 1.0 / p_s.shape[-1])
        else:
            u = support.to(dtype) / support.sum(dim=-1, keepdim=True)
        for _ in range(iters):
            # Row-vector form: (K^T u)_j = (u K)_j and (K v)_i = (v K^T)_i, one (B, C) x (C, C) product each.
            v = p_t / (u @ kernel + _TINY)
            u = p_s / (v @ kernel.T + _TINY)
        return (u * (v @ weighted.T)).sum(dim=-1)


def non_target_probs(logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """``softmax(z / T)`` over the C-1 non-target classes, laid out over all C with exactly 0 at the label.

    Equals DKD's renormalised non-target distribution (``softmax`` of the logits with the target dropped),
    kept at full width so the batch can share one cost matrix.
    """
    z = at_least_float32(logits) / temperature
    target = F.one_hot(labels, z.shape[-1]).bool()
    return torch.softmax(z.masked_fill(target, float("-inf")), dim=-1)


def target_term(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """``-mean(p_t[y] * log p_s[y])`` at T = 1 with ``p_t`` detached (docs/methods.md#wkd-l): the target-class part
    that removing the target from the Wasserstein term leaves out."""
    index = labels.unsqueeze(1)
    log_p_s = F.log_softmax(at_least_float32(student_logits), dim=-1).gather(1, index)
    p_t = torch.softmax(at_least_float32(teacher_logits).detach(), dim=-1).gather(1, index)
    return -(p_t * log_p_s).mean()


def wkd_l_distance(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    cost: Tensor,
    temperature: float,
    reg: float,
    iters: int,
) -> Tensor:
    """Batch-mean Sinkhorn distance between the non-target distributions at temperature T (docs/methods.md#wkd-l)."""
    p_s = non_target_probs(student_logits, labels, temperature)
    p_t = non_target_probs(teacher_logits, labels, temperature).detach()
    support = ~F.one_hot(labels, cost.shape[0]).bool()
    return sinkhorn_distance(p_s, p_t, cost, reg, iters, support).mean()


@register_method
class WKDL(Method):
    """``L_target + w_L(progress) * WD`` (docs/methods.md#wkd-l); CE is the separate ``ce`` method, so the published total
    ``CE + L_target + w_L * WD`` is ``--method ce --method wkd_l``.

    The cost is built once from the cache's CKA interrelations (``distillery cache`` computes them from
    the teacher's logits by default; ``distillery stats CACHE --cka-source features`` recomputes them from
    pooled features without the teacher). Options: each's meaning is declared with it (defaults: the ImageNet
    ResNet-34 -> ResNet-18 setting of the paper; CIFAR-100 used weight=600, T=8).

    Terms: ``wkd_l_target`` (L_target) and ``wkd_l_wd`` (``w_L * WD``).
    """

    name = "wkd_l"
    needs = frozenset({LOGITS})
    trains_logits = True

    def __init__(
        self,
        cache: CacheInfo,
        student: StudentInfo,
        *,
        T: Annotated[float, Range(ge=0.01, le=100), Help("temperature of the non-target distributions")] = 2.0,
        weight: Annotated[float, Range(ge=0, le=1e4), Help("w_L before decay")] = 30.0,
        kappa: Annotated[float, Range(gt=0, le=100), Help("cost sharpening")] = 1.0,
        sinkhorn_reg: Annotated[float, Range(ge=1e-3, le=100), Help("entropic regulariser lambda, K = exp(-cost / lambda)")] = 0.05,
        sinkhorn_iters: Annotated[int, Range(ge=1, le=1000), Help("Sinkhorn iterations, differentiated through")] = 10,
        decay_start: Annotated[float, Range(ge=0, le=1e4), Help("epoch after which w_L is cosine-decayed to 0 by the end (at or beyond the epochs: constant)")] = 0.0,
    ) -> None:
        super().__init__(cache, student)
        if cache.num_classes < 2:
            raise MethodError(f"method 'wkd_l' needs at least 2 classes, the cache has {cache.num_classes}")
        ir = cache.statistics.get(IR_STATISTIC)
        if ir is None:
            raise MethodError(
                "method 'wkd_l' needs the category interrelations stats/cka/ir, which this cache does not "
                f"store; run `distillery stats {cache.root or 'CACHE'}` (no teacher needed)"
            )
        c = cache.num_classes
        if tuple(ir.shape) != (c, c):
            raise MethodError(
                f"method 'wkd_l': stats/cka/ir has shape {tuple(ir.shape)}, expected ({c}, {c}) for the "
                f"cache's classes; run `distillery stats {cache.root or 'CACHE'}` to recompute it"
            )
        # A buffer, so it follows the method to the device; not persistent: it is rebuilt from the cache.
        self.register_buffer("cost", interrelation_cost(ir, kappa), persistent=False)
        self.T = T
        self.weight = weight
        self.sinkhorn_reg = sinkhorn_reg
        self.sinkhorn_iters = sinkhorn_iters
        self.decay_start = decay_start

    def forward(
        self, student: StudentOutputs, targets: Targets, labels: Tensor, progress: TrainingProgress
    ) -> dict[str, Tensor]:
        teacher = targets[LOGITS]
        wd = wkd_l_distance(
            student.logits, teacher, labels, self.cost, self.T, self.sinkhorn_reg, self.sinkhorn_iters
        )
        w = self.weight * cosine_decay(progress, self.decay_start)
        return {"wkd_l_target": target_term(student.logits, teacher, labels), "wkd_l_wd": w * wd}
