"""TCS: a tailored coordinate system from the teacher's PCA, learnt by the student (docs/methods.md#tcs).

The teacher's view-0 pooled features define a coordinate system: the top-k PCA components
``V_k`` (rows of ``pca/components``) around the teacher mean ``mu``; k is the smallest number of
components explaining ``variance`` of the variance, but never fewer than ``min_dims`` (default: the
class count; the classifier reads only these k coordinates, and a pooled feature dominated by a few
directions would otherwise leave it fewer coordinates than classes), or exactly ``dims`` when given.
The targets are ``t = (f_t - mu) V_k^T / s`` with ``s`` per ``norm``: 1 (``none``), the root of the
mean eigenvalue of the k components (``scale``: unit mean variance, relative variances kept), or
each component's own root eigenvalue (``whiten``). The student gets a head ``TCSHead`` that replaces
its own classifier:

    z = W f_s + c            learnable linear map into the k coordinates
    m = mask * active        trainable mask, 0 on dropped coordinates
    logits = A (m * z) + a   the classifier reads the masked coordinates

The method adds ``weight * MSE(z, t)`` over the active coordinates (with ``decay``, ``weight`` times WKD's
cosine factor, `pipeline.methods.schedules.cosine_decay`: the alignment shapes the features early and
leaves the end of training to the labels); the supervised term
is the ``ce`` method (as with every method here: run ``--method ce --method tcs``), which now computes
its CE on this head's logits because the head *is* the student's classifier (`adopt_student`). The
student's original timm classifier is discarded; the per-epoch evaluation of the student model goes
through the TCS head.

Tailoring (iterative feature selection). The paper's schedule is not public; ours: every backward
pass adds ``|dL/d mask|`` to a per-coordinate importance, accumulated from the start of training and
never reset. ``rounds`` pruning rounds are spread evenly over the training fraction
``[prune_start, prune_end]`` (one round at ``prune_start`` if ``rounds == 1``); after round r of R the
number of active coordinates is ``k - round((k - target) * r / R)`` with ``target = min(k, max(min_dims,
round(keep * k)))`` (the floor holds after tailoring too), each round dropping the active coordinates of
least accumulated importance. Tailoring is opt-in (``keep=1`` by default): on held-out data it cost
accuracy in every setting measured (README, "What we tried for TCS"), as did raw targets against
``norm=scale``, the default.
A round falls due at the first training step whose ``progress.fraction`` reaches its point. It is
applied in the method's forward, which runs after the student's: that step's alignment term already
leaves the dropped coordinates out, the classifier (mask 0) from the next step on.

At the end of training (`export_student`) the map, the mask and the classifier fold into one linear
layer, ``W' = (A * m) W`` and ``b' = A (m * c) + a``, which takes the classifier's place: ``student.pt``
is a plain timm model whose logits equal the trained TCS path.
"""
from __future__ import annotations

import math
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.options import Help, Range

from .base import (
    POOLED,
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

PCA_STATISTICS = ("pca/mean", "pca/components", "pca/explained_variance")
NORMS = ("none", "scale", "whiten")


def components_for(explained_variance: Tensor, fraction: float) -> int:
    """The smallest k whose top-k components explain at least `fraction` of the total variance."""
    ratio = np.cumsum(explained_variance.double().numpy()) / float(explained_variance.double().sum())
    return min(int(np.searchsorted(ratio, fraction)) + 1, len(ratio))


def target_scale(eigenvalues: Tensor, norm: str) -> Tensor:
    """Per-coordinate divisor ``s`` of the targets: 1, the root mean eigenvalue, or each root eigenvalue."""
    values = eigenvalues.double().clamp_min(1e-12)
    if norm == "whiten":
        return values.sqrt().float()
    if norm == "scale":
        return values.mean().sqrt().expand(len(values)).float().clone()
    return torch.ones(len(values))


def replace_classifier(model: nn.Module, new: nn.Module) -> None:
    """Put `new` where the timm model's `get_classifier()` module is (`fc`, `head.fc`, `classifier`, ...)."""
    old = model.get_classifier()
    name = next(n for n, m in model.named_modules() if m is old)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


class TCSHead(nn.Module):
    """Student pooled feature -> k coordinates -> masked -> class logits, with the tailoring state.

    Buffers ``active`` (0/1 per coordinate), ``importance`` (accumulated ``|dL/d mask|``) and ``rounds``
    (pruning rounds done) are part of the state dict, so a resumed run prunes exactly as an uninterrupted one.
    """

    def __init__(self, in_dim: int, k: int, num_classes: int) -> None:
        super().__init__()
        self.map = nn.Linear(in_dim, k)
        self.mask = nn.Parameter(torch.ones(k))
        self.classifier = nn.Linear(k, num_classes)
        self.register_buffer("active", torch.ones(k))
        self.register_buffer("importance", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("rounds", torch.zeros((), dtype=torch.int64))
        self.mask.register_hook(self._accumulate)

    def _accumulate(self, grad: Tensor) -> None:
        self.importance += grad.detach().abs().double()

    def coordinates(self, pooled: Tensor) -> Tensor:
        return self.map(pooled)

    def effective_mask(self) -> Tensor:
        return self.mask * self.active

    def forward(self, pooled: Tensor) -> Tensor:
        return self.classifier(self.coordinates(pooled) * self.effective_mask())

    @torch.no_grad()
    def drop_to(self, count: int) -> None:
        """Deactivate the active coordinates of least importance until `count` remain.

        Out of place: this step's student forward already used `active`, and autograd holds it.
        """
        excess = int(self.active.sum()) - count
        if excess <= 0:
            return
        score = torch.where(self.active.bool(), self.importance, torch.full_like(self.importance, math.inf))
        active = self.active.clone()
        active[torch.argsort(score, stable=True)[:excess]] = 0
        self.active = active

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """One linear layer equal to this head: ``W' = (A * m) W``, ``b' = A (m * c) + a``."""
        m = self.effective_mask()
        scaled = self.classifier.weight * m
        linear = nn.Linear(self.map.in_features, self.classifier.out_features).to(self.mask.device)
        linear.weight.copy_(scaled @ self.map.weight)
        linear.bias.copy_(scaled @ self.map.bias + self.classifier.bias)
        return linear


@register_method
class TCS(Method):
    """``weight * MSE(z_active, t_active)``, ``z`` the student's TCS coordinates and ``t = (f_t - mu) V_k^T / s``
    (docs/methods.md#tcs); the TCS head replaces the student's classifier and is pruned to ``keep * k`` coordinates.

    The options' meanings are declared with them; the module docstring gives the formulas they enter. Alone,
    TCS trains no classifier (``trains_logits`` is False): its head's classifier learns from ``ce``.
    """

    name = "tcs"
    needs = frozenset({POOLED})

    def __init__(
        self,
        cache: CacheInfo,
        student: StudentInfo,
        *,
        variance: Annotated[float, Range(gt=0, le=1), Help("explained-variance fraction choosing k")] = 0.9,
        dims: Annotated[int, Range(ge=0, le=65536), Help("fixed k (0: from variance)")] = 0,
        min_dims: Annotated[int, Range(ge=-1, le=65536), Help("floor on k and on the coordinates kept (-1: the class count)")] = -1,
        norm: Annotated[str, Help("target scaling: none, scale or whiten")] = "scale",
        keep: Annotated[float, Range(gt=0, le=1), Help("fraction of k left after tailoring (1: no pruning)")] = 1.0,
        rounds: Annotated[int, Range(ge=1, le=1000), Help("pruning rounds")] = 5,
        prune_start: Annotated[float, Range(ge=0, le=1), Help("training fraction of the first round")] = 0.2,
        prune_end: Annotated[float, Range(ge=0, le=1), Help("training fraction of the last round")] = 0.7,
        weight: Annotated[float, Range(ge=0, le=1e4), Help("weight of the alignment MSE (CE: 1)")] = 1.0,
        decay: Annotated[bool, Help("cosine-decay the alignment weight to 0 over training")] = False,
    ) -> None:
        super().__init__(cache, student)
        missing = [n for n in PCA_STATISTICS if n not in cache.statistics]
        if missing:
            raise MethodError(f"method 'tcs' needs the cache's PCA statistics ({', '.join(missing)} missing); "
                              f"rebuild them with `distillery stats CACHE`")
        explained = cache.statistics["pca/explained_variance"]
        if dims > len(explained) or min_dims > len(explained):  # the upper bound is the cache's, not a constant
            raise MethodError(f"method 'tcs': options 'dims' and 'min_dims' must be <= {len(explained)} (the "
                              f"teacher's pooled width), not dims={dims}, min_dims={min_dims}")
        if prune_start > prune_end:
            raise MethodError(f"method 'tcs': option 'prune_start' must be <= prune_end, got prune_start="
                              f"{prune_start}, prune_end={prune_end}")
        if norm not in NORMS:
            raise MethodError(f"method 'tcs': option 'norm' must be one of {', '.join(NORMS)}, not {norm!r}")
        floor = max(1, min(cache.num_classes if min_dims == -1 else min_dims, len(explained)))
        self.k = dims or max(floor, components_for(explained, variance))
        self.target = min(self.k, max(floor, round(keep * self.k)))
        self.num_rounds, self.prune_start, self.prune_end, self.weight = rounds, prune_start, prune_end, weight
        self.decay = decay
        self.register_buffer("mean", cache.statistics["pca/mean"].float().clone())
        self.register_buffer("basis", cache.statistics["pca/components"][: self.k].float().clone())
        self.register_buffer("scale", target_scale(explained[: self.k], norm))
        self.head = TCSHead(student.pooled_dim, self.k, cache.num_classes)

    def round_points(self) -> list[float]:
        """Training fractions at which rounds 1..R fall due."""
        if self.num_rounds == 1:
            return [self.prune_start]
        step = (self.prune_end - self.prune_start) / (self.num_rounds - 1)
        return [self.prune_start + r * step for r in range(self.num_rounds)]

    def count_after(self, rounds: int) -> int:
        """Active coordinates once `rounds` rounds are done."""
        return self.k - round((self.k - self.target) * rounds / self.num_rounds)

    def teacher_coordinates(self, pooled: Tensor) -> Tensor:
        """``(f_t - mu) V_k^T / s``: the teacher's pooled features in its top-k PCA coordinates, scaled."""
        return (at_least_float32(pooled) - self.mean) @ self.basis.T / self.scale

    def adopt_student(self, model: nn.Module) -> None:
        replace_classifier(model, self.head)

    def export_student(self, model: nn.Module) -> bool:
        replace_classifier(model, self.head.fold())
        return True

    def forward(
        self, student: StudentOutputs, targets: Targets, labels: Tensor, progress: TrainingProgress
    ) -> dict[str, Tensor]:
        due = sum(point <= progress.fraction for point in self.round_points())
        while int(self.head.rounds) < due:
            self.head.rounds += 1
            self.head.drop_to(self.count_after(int(self.head.rounds)))
        z = at_least_float32(self.head.coordinates(student.pooled))
        t = self.teacher_coordinates(targets[POOLED])
        active = self.head.active
        squared = F.mse_loss(z, t, reduction="none") * active
        weight = self.weight * (cosine_decay(progress) if self.decay else 1.0)
        return {"tcs": weight * squared.sum() / (z.shape[0] * active.sum())}
