"""Streaming, mergeable feature moments and the PCA basis derived from them (docs/cache-format.md#statistics).

Each shard task accumulates a :class:`FeatureMoments` over its rows; the reduce step merges the
partials and calls :func:`pca_from_moments`. Memory is O(D^2) whatever the number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FeatureMoments:
    """Count, mean and centred scatter ``M2 = sum_r (x_r - mean)(x_r - mean)^T`` in float64.

    Partials combine with Chan, Golub & LeVeque's parallel update: for parts a, b with
    ``delta = mean_b - mean_a`` and ``n = n_a + n_b``::

        mean = mean_a + delta * n_b / n
        M2   = M2_a + M2_b + outer(delta, delta) * n_a * n_b / n

    Only centred quantities are summed, so features with a large common offset keep their
    precision (a raw ``sum x x^T - n mean mean^T`` would cancel catastrophically).
    """

    n: int
    mu: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> FeatureMoments:
        """Moments of zero rows of dimension ``dim``."""
        if dim < 1:
            raise ValueError(f"FeatureMoments needs dim >= 1, got {dim}")
        return cls(n=0, mu=np.zeros(dim, np.float64), m2=np.zeros((dim, dim), np.float64))

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    @property
    def count(self) -> int:
        return self.n

    @property
    def mean(self) -> np.ndarray:
        """(D,) float64 mean of all rows seen."""
        if self.n < 1:
            raise ValueError("FeatureMoments.mean is undefined: no rows were accumulated")
        return self.mu.copy()

    @property
    def covariance(self) -> np.ndarray:
        """(D, D) float64 sample covariance ``M2 / (n - 1)`` (ddof=1, as numpy.cov and sklearn PCA)."""
        if self.n < 2:
            raise ValueError(
                f"FeatureMoments.covariance needs at least 2 rows, got {self.n}"
            )
        return self.m2 / (self.n - 1)

    def update(self, x: np.ndarray) -> None:
        """Accumulate rows ``x`` of shape (n, D), any float dtype, in place."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (n, {self.dim}), got {x.shape}")
        if x.shape[0] == 0:
            return
        x = x.astype(np.float64, copy=False)
        batch_mean = x.mean(axis=0)
        centred = x - batch_mean
        batch = FeatureMoments(n=x.shape[0], mu=batch_mean, m2=centred.T @ centred)
        merged = self.merge(batch)
        self.n, self.mu, self.m2 = merged.n, merged.mu, merged.m2

    def merge(self, other: FeatureMoments) -> FeatureMoments:
        """A new object holding the moments of both parts (Chan et al. update, see class doc)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dim {self.dim} and {other.dim}")
        if other.n == 0:
            return FeatureMoments(self.n, self.mu.copy(), self.m2.copy())
        if self.n == 0:
            return FeatureMoments(other.n, other.mu.copy(), other.m2.copy())
        n = self.n + other.n
        delta = other.mu - self.mu
        mu = self.mu + delta * (other.n / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
        return FeatureMoments(n, mu, m2)


@dataclass
class PCABasis:
    """PCA of pooled features as stored under ``stats/pca/*`` (docs/cache-format.md#contract).

    ``components`` rows are unit eigenvectors of the covariance sorted by ``explained_variance``
    (the eigenvalues, ddof=1) in descending order; coordinates are ``(f - mean) @ components[:k].T``.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray

    def explained_variance_ratio(self) -> np.ndarray:
        """(D,) float32 share of the total variance carried by each component."""
        total = float(np.sum(self.explained_variance, dtype=np.float64))
        if total <= 0.0:
            raise ValueError("explained variance ratio is undefined: total variance is 0")
        return (self.explained_variance.astype(np.float64) / total).astype(np.float32)

    def num_components_for(self, fraction: float) -> int:
        """Smallest k whose cumulative explained-variance ratio is >= ``fraction`` (0 < fraction <= 1)."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        variance = self.explained_variance.astype(np.float64)
        cumulative = np.cumsum(variance) / variance.sum()
        k = int(np.searchsorted(cumulative, fraction, side="left")) + 1
        # Rounding can leave the last cumulative value a hair under 1.0.
        return min(k, len(variance))


def pca_from_moments(m: FeatureMoments) -> PCABasis:
    """Eigendecomposition of the float64 covariance of ``m`` (docs/cache-format.md#statistics).

    Signs are made deterministic: in each component the entry of largest magnitude is positive.
    Eigenvalues that rounding pushed slightly below zero are clamped to 0.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(m.covariance)  # ascending order
    eigenvalues = np.clip(eigenvalues[::-1], 0.0, None)
    components = eigenvectors[:, ::-1].T
    rows = np.arange(components.shape[0])
    pivots = np.argmax(np.abs(components), axis=1)
    components = components * np.sign(components[rows, pivots])[:, None]
    return PCABasis(
        mean=m.mean.astype(np.float32),
        components=components.astype(np.float32),
        explained_variance=eigenvalues.astype(np.float32),
    )
