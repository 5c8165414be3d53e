"""Streaming, mergeable per-class feature means (docs/cache-format.md#statistics "Class statistics")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ClassMoments:
    """Per-class row counts (C,) int64 and feature sums (C, D) float64.

    Sums (not running means) make merging exact up to float64 rounding: merge = add.
    The mean of class c is ``sums[c] / counts[c]`` (stored as ``stats/classes/mean``).
    """

    counts: np.ndarray
    sums: np.ndarray

    @classmethod
    def empty(cls, num_classes: int, dim: int) -> ClassMoments:
        """Statistics of zero rows for ``num_classes`` classes of dimension ``dim``."""
        if num_classes < 1 or dim < 1:
            raise ValueError(f"need num_classes >= 1 and dim >= 1, got {num_classes}, {dim}")
        return cls(
            counts=np.zeros(num_classes, np.int64),
            sums=np.zeros((num_classes, dim), np.float64),
        )

    @property
    def num_classes(self) -> int:
        return self.sums.shape[0]

    @property
    def dim(self) -> int:
        return self.sums.shape[1]

    def update(self, x: np.ndarray, labels: np.ndarray) -> None:
        """Accumulate rows ``x`` (n, D) with integer class ``labels`` (n,) in place."""
        x = np.asarray(x)
        labels = np.asarray(labels)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (n, {self.dim}), got {x.shape}")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"expected labels of shape ({x.shape[0]},), got {labels.shape}")
        if x.shape[0] == 0:
            return
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got values in [{low}, {high}]"
            )
        self.counts += np.bincount(labels, minlength=self.num_classes)
        np.add.at(self.sums, labels, x.astype(np.float64, copy=False))

    def merge(self, other: ClassMoments) -> ClassMoments:
        """A new object holding the statistics of both parts."""
        if other.sums.shape != self.sums.shape:
            raise ValueError(
                f"cannot merge class statistics of shape {self.sums.shape} and {other.sums.shape}"
            )
        return ClassMoments(counts=self.counts + other.counts, sums=self.sums + other.sums)

    def means(self) -> np.ndarray:
        """(C, D) float32 per-class means; rows of classes never seen are 0."""
        return (self.sums / np.maximum(self.counts, 1)[:, None]).astype(np.float32)
