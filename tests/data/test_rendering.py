"""Rendered-view torch Datasets: a DataLoader batch holds exactly the per-item renders."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.datasets import load_dataset
from pipeline.data.rendering import RenderedViews, clean_views
from pipeline.data.views import ViewPlan, render_view


def test_loader_batches_are_the_per_item_renders() -> None:
    dataset = load_dataset("digits", split="val")
    mean, std = dataset.pixel_stats()
    plan = ViewPlan(num_augmented=3, seed=4)
    positions = np.arange(40)[::-1].copy()
    view_ids = positions % plan.num_views
    views = RenderedViews(dataset, plan, positions, view_ids, 20, mean, std)
    x, y = zip(*torch.utils.data.DataLoader(views, batch_size=16))
    expected = [render_view(dataset.raw(p), plan.params(int(dataset.ids[p]), int(v)), 20, mean, std)
                for p, v in zip(positions, view_ids)]
    assert [len(b) for b in y] == [16, 16, 8] and y[0].dtype == torch.int64
    assert torch.equal(torch.cat(x), torch.stack(expected))
    assert torch.cat(y).tolist() == dataset.labels[positions].tolist()


def test_clean_views_are_view_zero_of_every_sample() -> None:
    dataset = load_dataset("digits", split="val")
    mean, std = dataset.pixel_stats()
    views = clean_views(dataset, 16, mean, std)
    batch = views.__getitems__([0, 5, 7])
    assert len(views) == len(dataset) and [label for _, label in batch] == [int(dataset.labels[p]) for p in (0, 5, 7)]
    assert torch.equal(batch[1][0], render_view(dataset.raw(5), ViewPlan(0).params(int(dataset.ids[5]), 0), 16,
                                                mean, std))
