"""Linear CKA and WKD's category interrelation matrix (docs/cache-format.md#statistics, WKD-L docs/methods.md#wkd-l).

For paired rows X in R^{m x d}, Y in R^{m x e} with centred columns::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

Because rows are paired by position, ``||X_j^T X_i||_F^2 = <K_i, K_j>_F`` with the Gram matrix
``K_i = X_i X_i^T`` (m x m). This is the form used for all class pairs at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _centre(x: np.ndarray) -> np.ndarray:
    """Float64 copy with zero column means over the rows (axis -2)."""
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(axis=-2, keepdims=True)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of paired rows ``x`` (m, d) and ``y`` (m, e), in float64 (docs/cache-format.md#statistics)."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"expected paired 2-D arrays with equal row counts, got {x.shape}, {y.shape}"
        )
    x, y = _centre(x), _centre(y)
    denominator = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    if denominator == 0.0:
        raise ValueError("linear CKA is undefined when one input has constant columns")
    return float(np.linalg.norm(y.T @ x) ** 2 / denominator)


SAMPLE_BUDGET = 256
"""Most rows per class that enter a class pair's CKA: the (C, m, d) sample copy is ~1 GB at ImageNet's
C = 1000 and d = 1000, and CKA from 256 paired rows is already stable to ~1e-2 on real features."""

SAMPLE_LEVELS = np.unique(np.concatenate([np.arange(1, 9), np.round(8 * 2 ** (np.arange(0, 120) / 8))])).astype(np.int64)
"""The row counts a pair may use: every count up to 8, then a geometric grid of ratio 2^(1/8) (~9 %)."""


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array, got shape {labels.shape}, dtype {labels.dtype}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}]"
        )
    return labels


def pair_sample_counts(counts: np.ndarray, budget: int = SAMPLE_BUDGET) -> np.ndarray:
    """(C, C) rows each class pair's CKA is computed from: ``min(n_i, n_j, budget)`` rounded down to
    ``SAMPLE_LEVELS`` (0 where a class has no rows).

    A pair depends only on its own two classes, so a rare class degrades its own row and column and nothing
    else (a long-tailed dataset's large classes get the interrelations they would have without the tail).
    Rounding to a ~9 % grid bounds the number of distinct row counts, and so the number of Gram passes, to
    ~50 whatever the class sizes; balanced classes within 9 % of each other share one count.
    """
    if budget < 2:
        raise ValueError(f"budget must be >= 2, got {budget}")
    capped = np.minimum(np.asarray(counts, np.int64), budget)
    pair = np.minimum.outer(capped, capped)
    levels = SAMPLE_LEVELS[np.maximum(np.searchsorted(SAMPLE_LEVELS, pair, side="right") - 1, 0)]
    return np.where(pair > 0, np.minimum(levels, pair), 0)


def cka_sample_rows(labels: np.ndarray, num_classes: int, budget: int = SAMPLE_BUDGET) -> np.ndarray:
    """Sorted row indices of the rows any class pair uses: the first ``min(n_c, budget)`` of each class in
    stored order (what `category_interrelations` needs to read from a cache)."""
    labels = _check_labels(labels, num_classes)
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:budget] for c in range(num_classes)]))


@dataclass(frozen=True)
class Interrelations:
    """WKD's category interrelations with what they rest on.

    ``ir`` (C, C) float32, diagonal 1; ``samples`` (C, C) the rows each pair used (`pair_sample_counts`);
    ``undefined`` class -> why CKA is undefined for it (fewer than 2 rows, or its rows are identical): its
    off-diagonal entries are 0, which WKD-L's cost ``1 - exp(-kappa (1 - IR))`` turns into the largest
    cost, i.e. the class is treated as unrelated to every other.
    """

    ir: np.ndarray
    samples: np.ndarray
    undefined: dict[int, str]

    def warning(self, class_names: list[str] | None = None) -> str | None:
        """One line naming the classes without interrelations, or None."""
        if not self.undefined:
            return None
        named = [f"{c} ({class_names[c]!r}): {why}" if class_names else f"{c}: {why}"
                 for c, why in sorted(self.undefined.items())]
        more = f" and {len(named) - 3} more" if len(named) > 3 else ""
        return (f"category interrelations are undefined for {len(named)} class(es), treated as unrelated to the "
                f"others: {'; '.join(named[:3])}{more}")


def _numerators(samples: np.ndarray, block: int) -> np.ndarray:
    """``<K_i, K_j>_F`` (C, C) float64 for centred samples (C, m, d), in chunks of ``block`` Gram rows."""
    count, m = samples.shape[:2]
    numerators = np.zeros((count, count), np.float64)
    transposed = samples.transpose(0, 2, 1)
    for start in range(0, m, block):
        gram_rows = np.matmul(samples[:, start : start + block], transposed)
        flat = gram_rows.reshape(count, -1)
        numerators += flat @ flat.T
    return numerators


def category_interrelations(
    values: np.ndarray, labels: np.ndarray, num_classes: int, budget: int = SAMPLE_BUDGET, block: int = 64
) -> Interrelations:
    """WKD's IR matrix: ``IR[i, j] = linear_cka(X_i, X_j)`` with ``X_c`` the first ``m_ij`` rows of class
    c in stored order, ``m_ij = pair_sample_counts(...)[i, j]`` (WKD takes the first m of every class with
    m the smallest class count; a per-pair m keeps one rare class from shrinking every estimate).

    Method: for each distinct row count m, the classes with at least m rows are centred over their first m
    rows and their numerators ``<K_i, K_j>_F`` are summed over chunks of ``block`` Gram rows: for rows R,
    ``K_c[R, :] = X_c[R] X_c^T`` is formed for every class and the chunk contributes ``G G^T`` with
    ``G[c] = vec(K_c[R, :])``. Cost O(C m^2 d + C^2 m^2) per count, working memory beyond the (C, m, d)
    sample copy O(C * block * m), never O(C m^2). No cheaper feature-space form exists for m > d: the
    d x d class covariances ``X_c^T X_c`` pair features rather than samples and give a different quantity.

    Precision: column centring (where teacher logits/features cancel their large common offset) is done
    in float64; the centred samples, the Gram rows and each chunk's products are float32 (the cached inputs
    are float16, so float64 would buy nothing but twice the memory and time); the numerators are
    accumulated across chunks in float64.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    labels = _check_labels(labels, num_classes)
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[0] != len(labels):
        raise ValueError(
            f"expected values (N, d) matching labels (N,), got {values.shape}, ({len(labels)},)"
        )
    counts = np.bincount(labels, minlength=num_classes)
    samples = pair_sample_counts(counts, budget)
    order = np.argsort(labels, kind="stable")  # stable: stored order within each class
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    ir = np.zeros((num_classes, num_classes), np.float64)
    undefined = {int(c): f"{n} sample{'' if n == 1 else 's'}" for c, n in enumerate(counts) if n < 2}
    for m in np.unique(samples[samples >= 2]):
        classes = np.flatnonzero(np.minimum(counts, budget) >= m)
        rows = order[starts[classes, None] + np.arange(m)]
        centred = np.empty((len(classes), m, values.shape[1]), np.float32)
        for start in range(0, len(classes), block):
            # Centre in class blocks so the float64 temporary stays small.
            centred[start : start + block] = _centre(values[rows[start : start + block]])
        numerators = _numerators(centred, block)
        self_similarity = np.diag(numerators).copy()
        at_level = samples[np.ix_(classes, classes)] == m
        for c in classes[(self_similarity <= 0.0) & at_level.any(axis=1)]:
            undefined.setdefault(int(c), f"its first {m} samples are identical")
        norms = np.sqrt(np.where(self_similarity > 0.0, self_similarity, np.inf))
        ir[np.ix_(classes, classes)] = np.where(at_level, numerators / np.outer(norms, norms),
                                                ir[np.ix_(classes, classes)])
    gone = list(undefined)
    ir[gone, :] = 0.0
    ir[:, gone] = 0.0
    # Floating-point products need not be exactly symmetric; the definition is.
    ir = (ir + ir.T) / 2
    np.fill_diagonal(ir, 1.0)
    return Interrelations(ir=ir.astype(np.float32), samples=samples, undefined=undefined)
