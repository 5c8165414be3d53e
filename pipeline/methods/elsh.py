"""eLSH: mimic the teacher's LSH codes of its pooled feature, one teacher pass (docs/methods.md#elsh).

From Wang, Ge & Wu, "Distilling knowledge by mimicking features" (TPAMI'22), made one-pass: the planes
``W`` (bits x D_t) and median thresholds ``b`` are the cache's (`stats/lsh/...`), the targets
``y = 1[W f_t - b > 0]`` its view-0 codes (`lsh/codes`, packed LSB-first). The loss is

    beta * BCEWithLogits(W g(f_s) - b, y)      averaged over bits and the batch
  + lshl2 * MSE(g(f_s), f_t)                   optional ("LSHL2"; needs the teacher's pooled features)

with ``g`` a learnable linear map from the student's pooled width to the teacher's (identity when they
are equal). ``beta = 5``: the original paper weighs the LSH loss 5-6 against CE (docs/methods.md#elsh). The planes are
fixed: only ``g`` and the student learn. Run it beside CE: ``--method ce --method elsh``. The planes are faiss's
orthogonal projection rather than the paper's Gaussian draws, and ``lshl2`` is off by default
(docs/methods.md#elsh-deviations).
"""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.stats.lsh import unpack_bits
from pipeline.options import Help, Range

from .base import (
    LSH_CODES,
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

LSH_STATISTICS = ("lsh/planes", "lsh/thresholds")


@register_method
class ELSH(Method):
    """``beta * BCE(W g(f_s) - b, codes) [+ lshl2 * MSE(g(f_s), f_t)]`` (docs/methods.md#elsh)."""

    name = "elsh"
    needs = frozenset({LSH_CODES})

    def __init__(self, cache: CacheInfo, student: StudentInfo, *, beta: Annotated[float, Range(ge=0, le=1e4), Help("weight of the BCE on the LSH bits")] = 5.0,
                 lshl2: Annotated[float, Range(ge=0, le=1e4), Help("weight of an extra MSE to the pooled features (needs them cached)")] = 0.0) -> None:
        super().__init__(cache, student)
        if lshl2 and POOLED not in cache.available:
            raise MethodError("elsh option lshl2 needs teacher pooled features, which this cache does not store; "
                              "use lshl2=0 or a cache with pooled features")
        if lshl2:  # the run serves the union of its methods' needs: ask for the pooled features too
            self.needs = frozenset({LSH_CODES, POOLED})
        planes = cache.statistics["lsh/planes"].float()
        self.register_buffer("planes", planes.clone())
        self.register_buffer("thresholds", cache.statistics["lsh/thresholds"].float().clone())
        teacher_dim = planes.shape[1]
        self.g = nn.Identity() if student.pooled_dim == teacher_dim else nn.Linear(student.pooled_dim, teacher_dim)
        self.beta, self.lshl2 = beta, lshl2

    @classmethod
    def check_cache(cls, cache: CacheInfo) -> None:
        # An existing cache gets its codes and planes without the teacher: say so rather than "re-cache".
        if LSH_CODES not in cache.available or any(n not in cache.statistics for n in LSH_STATISTICS):
            raise MethodError("method 'elsh' needs the cache's LSH codes and planes, which it does not store; add "
                              "them without the teacher: `distillery stats CACHE --lsh-bits B` (e.g. 256), or "
                              "cache with --lsh-bits B")
        super().check_cache(cache)

    def bit_logits(self, mapped: Tensor) -> Tensor:
        """``W g(f_s) - b``: one logit per LSH bit."""
        return mapped @ self.planes.T - self.thresholds

    def forward(
        self, student: StudentOutputs, targets: Targets, labels: Tensor, progress: TrainingProgress
    ) -> dict[str, Tensor]:
        mapped = at_least_float32(self.g(student.pooled))
        bits = unpack_bits(targets[LSH_CODES]).to(mapped.dtype)
        terms = {"elsh": self.beta * F.binary_cross_entropy_with_logits(self.bit_logits(mapped), bits)}
        if self.lshl2:
            terms["elsh_l2"] = self.lshl2 * F.mse_loss(mapped, at_least_float32(targets[POOLED]))
        return terms
