import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.stats.gaussian import GaussianSummary, grid_gaussian


def _reference(fmap: torch.Tensor, grid: int, eps: float):
    """Direct loop over samples, cells and channels with torch.var(unbiased=True)."""
    b, c, h, w = fmap.shape
    mean = torch.empty(b, grid * grid, c)
    std = torch.empty(b, grid * grid, c)
    for n in range(b):
        for gy in range(grid):
            y0, y1 = math.floor(gy * h / grid), math.ceil((gy + 1) * h / grid)
            for gx in range(grid):
                x0, x1 = math.floor(gx * w / grid), math.ceil((gx + 1) * w / grid)
                for ch in range(c):
                    cell = fmap[n, ch, y0:y1, x0:x1].double()
                    mean[n, gy * grid + gx, ch] = cell.mean()
                    std[n, gy * grid + gx, ch] = torch.sqrt(torch.var(cell, unbiased=True) + eps)
    return mean, std


@pytest.mark.parametrize("grid", [1, 2, 3])
@pytest.mark.parametrize(("height", "width"), [(7, 5), (6, 6), (9, 4)])
def test_matches_direct_loop(grid, height, width):
    fmap = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(grid)) * 2 + 1
    mean, std = grid_gaussian(fmap, grid)
    ref_mean, ref_std = _reference(fmap, grid, 1e-5)
    assert mean.shape == std.shape == (2, grid * grid, 3)
    torch.testing.assert_close(mean, ref_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, ref_std, atol=1e-5, rtol=1e-5)


def test_means_agree_with_adaptive_average_pooling():
    fmap = torch.randn(3, 4, 7, 5, generator=torch.Generator().manual_seed(0))
    mean, _ = grid_gaussian(fmap, 3)
    pooled = F.adaptive_avg_pool2d(fmap, 3).flatten(2).transpose(1, 2)  # (B, cells, C), row-major
    torch.testing.assert_close(mean, pooled)


def test_half_input_gives_float32():
    fmap = torch.randn(1, 2, 4, 4).half()
    mean, std = grid_gaussian(fmap, 2, eps=0.0)
    assert mean.dtype == std.dtype == torch.float32
    ref_mean, ref_std = _reference(fmap.float(), 2, 0.0)
    torch.testing.assert_close(std, ref_std, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mean, ref_mean, atol=1e-6, rtol=1e-6)


def test_gradients_flow():
    fmap = torch.randn(2, 3, 6, 5, requires_grad=True)
    mean, std = grid_gaussian(fmap, 2)
    (mean.square().sum() + std.sum()).backward()
    assert fmap.grad is not None
    assert torch.isfinite(fmap.grad).all() and fmap.grad.abs().sum() > 0


def test_cells_too_small():
    with pytest.raises(ValueError, match=r"4x4 feature map.*4x4 grid.*--grid.*--input-size.*--tap"):
        grid_gaussian(torch.randn(1, 2, 4, 4), 4)


def test_summary_merge_equals_one_shot():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(10, 4, 3)).astype(np.float16)
    std = rng.uniform(0.1, 2.0, size=(10, 4, 3)).astype(np.float16)
    first, second = GaussianSummary.empty(3), GaussianSummary.empty(3)
    first.update(mean[:3], std[:3])
    second.update(mean[3:], std[3:])
    merged = first.merge(second)

    assert merged.count == 40
    np.testing.assert_allclose(merged.channel_mean_of_means(), mean.astype(np.float64).mean(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(merged.channel_mean_of_stds(), std.astype(np.float64).mean(axis=(0, 1)), rtol=1e-6)
    assert merged.channel_mean_of_means().dtype == np.float32


def test_summary_errors():
    summary = GaussianSummary.empty(3)
    with pytest.raises(ValueError, match="empty"):
        summary.channel_mean_of_means()
    with pytest.raises(ValueError, match="shape"):
        summary.update(np.zeros((2, 4, 3)), np.zeros((2, 4, 2)))
    with pytest.raises(ValueError, match="cannot merge"):
        summary.merge(GaussianSummary.empty(4))
