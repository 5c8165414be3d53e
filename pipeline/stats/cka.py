"""Linear CKA and WKD's category interrelation matrix (docs/ARCHITECTURE.md §5, WKD-L §6.3).

For paired rows X in R^{m x d}, Y in R^{m x e} with centred columns::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

Because rows are paired by position, ``||X_j^T X_i||_F^2 = <K_i, K_j>_F`` with the Gram matrix
``K_i = X_i X_i^T`` (m x m). This is the form used for all class pairs at once.
"""

from __future__ import annotations

import numpy as np


def _centre(x: np.ndarray) -> np.ndarray:
    """Float64 copy with zero column means over the rows (axis -2)."""
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(axis=-2, keepdims=True)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of paired rows ``x`` (m, d) and ``y`` (m, e), in float64 (docs/ARCHITECTURE.md §5)."""
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


def _first_rows_per_class(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, m) row indices: the first m rows of each class in stored order, m = smallest class count."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array, got shape {labels.shape}, dtype {labels.dtype}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}]"
        )
    counts = np.bincount(labels, minlength=num_classes)
    small = int(np.argmin(counts))
    if counts[small] < 2:
        raise ValueError(
            f"category interrelations need at least 2 samples per class; "
            f"class {small} has {counts[small]}"
        )
    m = int(counts[small])
    # A stable sort keeps stored order within each class.
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return order[starts[:, None] + np.arange(m)]


def category_interrelations(
    values: np.ndarray, labels: np.ndarray, num_classes: int, block: int = 64
) -> np.ndarray:
    """WKD's IR matrix: ``IR[i, j] = linear_cka(X_i, X_j)`` (C, C) float32, diagonal exactly 1.

    ``X_c`` are the first m rows of ``values`` (N, d) with label c in stored order, m the smallest
    class count; a class with fewer than 2 rows is an error.

    Method: numerators ``<K_i, K_j>_F`` for all pairs, summed over chunks of ``block`` Gram rows:
    for rows R, ``K_c[R, :] = X_c[R] X_c^T`` is formed for every class and the chunk contributes
    ``G G^T`` with ``G[c] = vec(K_c[R, :])``. Every Gram entry is computed once, so the cost is
    O(C m^2 d + C^2 m^2) and the working memory beyond the (C, m, d) sample copy is
    O(C * block * m), never O(C m^2). No cheaper feature-space form exists for m > d: the d x d
    class covariances ``X_c^T X_c`` pair features rather than samples and give a different
    quantity, so the Gram form is used for every shape.

    Precision: column centring (where teacher logits/features cancel their large common offset)
    is done in float64; the centred samples, the Gram rows and each chunk's products are float32
    (the cached inputs are float16, so float64 would buy nothing but twice the memory and time);
    the numerators are accumulated across chunks in float64.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    rows = _first_rows_per_class(labels, num_classes)
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[0] != len(labels):
        raise ValueError(
            f"expected values (N, d) matching labels (N,), got {values.shape}, ({len(labels)},)"
        )
    m = rows.shape[1]

    samples = np.empty((num_classes, m, values.shape[1]), np.float32)
    for start in range(0, num_classes, block):
        # Centre in class blocks so the float64 temporary stays small.
        samples[start : start + block] = _centre(values[rows[start : start + block]])

    numerators = np.zeros((num_classes, num_classes), np.float64)
    transposed = samples.transpose(0, 2, 1)
    for start in range(0, m, block):
        gram_rows = np.matmul(samples[:, start : start + block], transposed)
        flat = gram_rows.reshape(num_classes, -1)
        numerators += flat @ flat.T

    self_similarity = np.diag(numerators).copy()
    degenerate = np.flatnonzero(self_similarity <= 0.0)
    if degenerate.size:
        raise ValueError(
            f"CKA is undefined for class {degenerate[0]}: its first {m} samples are identical"
        )
    norms = np.sqrt(self_similarity)
    ir = numerators / np.outer(norms, norms)
    # Floating-point products need not be exactly symmetric; the definition is.
    ir = (ir + ir.T) / 2
    np.fill_diagonal(ir, 1.0)
    return ir.astype(np.float32)
