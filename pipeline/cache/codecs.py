"""Top-k logit codec for the teacher cache (docs/cache-format.md#top-k)."""

from __future__ import annotations

import math

import torch


def topk_encode(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the k largest raw logits and the log-mass of the rest.

    Returns ``(values, indices, tail_logsumexp)``: ``values`` (..., k) in the input dtype, sorted
    descending; ``indices`` (..., k) int64; ``tail_logsumexp`` (...) float32, the logsumexp of the
    C - k logits not kept, computed in float32 (-inf when k == C).
    """
    num_classes = logits.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"top-k needs 1 <= k <= number of classes ({num_classes}), got k={k}")
    values, indices = torch.topk(logits, k, dim=-1, largest=True, sorted=True)
    rest = logits.float().scatter(-1, indices, float("-inf"))
    return values, indices, torch.logsumexp(rest, dim=-1)


def topk_decode(
    values: torch.Tensor, indices: torch.Tensor, tail_logsumexp: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Dense (..., C) float32 logits from the top-k code; missing classes share the tail mass.

    Every class not kept gets ``tail_logsumexp - log(C - k)``, so the tail mass is spread
    uniformly. At temperature 1 this is exact for the kept probabilities and the total tail
    mass: ``softmax`` sees the same normaliser ``sum_kept exp(z) + exp(tail_logsumexp)``.
    At T != 1 it is an approximation: ``sum exp(z / T)`` over the tail depends on how the tail
    mass is distributed, which the code does not store, so the tempered kept probabilities and
    tail mass differ from those of the original logits.
    """
    k = values.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"top-k code with k={k} does not fit {num_classes} classes")
    if k == num_classes:
        # Every class is kept; log(C - k) would be log(0).
        fill = torch.full_like(tail_logsumexp, float("-inf"), dtype=torch.float32)
    else:
        fill = tail_logsumexp.float() - math.log(num_classes - k)
    dense = fill.unsqueeze(-1).expand(*fill.shape, num_classes).clone()
    return dense.scatter(-1, indices.long(), values.float())
