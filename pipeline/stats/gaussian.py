"""Per-cell diagonal Gaussians of feature maps for WKD-F (docs/cache-format.md#contract, docs/cache-format.md#statistics, docs/methods.md#wkd-f)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _cell_bounds(size: int, grid: int) -> list[tuple[int, int]]:
    """Adaptive-pooling boundaries: cell i spans [floor(i*size/G), ceil((i+1)*size/G))."""
    return [((i * size) // grid, -((-(i + 1) * size) // grid)) for i in range(grid)]


def grid_gaussian(
    fmap: torch.Tensor, grid: int, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per grid cell and channel: spatial mean and ``std = sqrt(unbiased var + eps)``.

    ``fmap`` (B, C, H, W) is split into ``grid`` x ``grid`` cells with adaptive-pooling boundaries
    (cells may overlap when the size is not divisible). Returns ``(mean, std)``, each
    (B, grid*grid, C) float32, cells row-major (index = gy * grid + gx). Computed in float32 for
    half inputs too, and differentiable, so the student side uses the same function
    (docs/methods.md#wkd-f: diagonal Gaussian per cell, squared W2 between them).
    """
    if fmap.ndim != 4:
        raise ValueError(f"expected a feature map (B, C, H, W), got shape {tuple(fmap.shape)}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    height, width = fmap.shape[-2:]
    rows, cols = _cell_bounds(height, grid), _cell_bounds(width, grid)
    smallest = min(y1 - y0 for y0, y1 in rows) * min(x1 - x0 for x0, x1 in cols)
    if smallest < 2:
        raise ValueError(
            f"a {height}x{width} feature map split into a {grid}x{grid} grid leaves cells with "
            f"{smallest} position(s); the unbiased variance needs at least 2. Use a smaller --grid, "
            f"a larger --input-size, or an earlier --tap."
        )
    fmap = fmap.float()
    means, stds = [], []
    for y0, y1 in rows:
        for x0, x1 in cols:
            cell = fmap[:, :, y0:y1, x0:x1]
            # Two passes (mean, then squared deviations) instead of torch.var_mean, whose per-row
            # Welford loop is ~5x slower on the few positions per cell of a deep map.
            values = cell.flatten(2)
            mean = values.mean(2)
            var = (values - mean[..., None]).square().sum(2) / (values.shape[2] - 1)
            means.append(mean)
            stds.append(torch.sqrt(var + eps))
    return torch.stack(means, dim=1), torch.stack(stds, dim=1)


@dataclass
class GaussianSummary:
    """Mergeable per-channel sums over sample-cells, for inspecting the cached Gaussians (docs/cache-format.md#statistics)."""

    count: int
    sum_mean: np.ndarray
    sum_std: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> GaussianSummary:
        """Summary of zero sample-cells over ``channels`` channels."""
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        return cls(0, np.zeros(channels, np.float64), np.zeros(channels, np.float64))

    def update(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Accumulate ``mean`` and ``std`` arrays of shape (n, cells, C) in place."""
        mean, std = np.asarray(mean), np.asarray(std)
        channels = self.sum_mean.shape[0]
        if mean.shape != std.shape or mean.ndim != 3 or mean.shape[2] != channels:
            raise ValueError(
                f"expected mean and std of equal shape (n, cells, {channels}), "
                f"got {mean.shape} and {std.shape}"
            )
        self.count += mean.shape[0] * mean.shape[1]
        self.sum_mean += mean.sum(axis=(0, 1), dtype=np.float64)
        self.sum_std += std.sum(axis=(0, 1), dtype=np.float64)

    def merge(self, other: GaussianSummary) -> GaussianSummary:
        """A new object holding the sums of both parts."""
        if other.sum_mean.shape != self.sum_mean.shape:
            raise ValueError(
                f"cannot merge summaries over {self.sum_mean.shape[0]} and "
                f"{other.sum_mean.shape[0]} channels"
            )
        return GaussianSummary(
            self.count + other.count, self.sum_mean + other.sum_mean, self.sum_std + other.sum_std
        )

    def _average(self, total: np.ndarray) -> np.ndarray:
        if self.count == 0:
            raise ValueError("GaussianSummary is empty: no sample-cells were accumulated")
        return (total / self.count).astype(np.float32)

    def channel_mean_of_means(self) -> np.ndarray:
        """(C,) float32 average over sample-cells of the per-cell channel means."""
        return self._average(self.sum_mean)

    def channel_mean_of_stds(self) -> np.ndarray:
        """(C,) float32 average over sample-cells of the per-cell channel stds."""
        return self._average(self.sum_std)
