"""Rendered-view torch Datasets: a DataLoader batch holds exactly the per-item renders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.data.datasets import load_dataset
from pipeline.data.rendering import RenderedViews, clean_views
from pipeline.data.views import ViewPlan, render_view

REPO = Path(__file__).resolve().parents[2]


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
    clean = ViewPlan(num_augmented=0).params(int(dataset.ids[5]), 0)
    assert torch.equal(batch[1][0], render_view(dataset.raw(5), clean, 16, mean, std))


MAIN_SCRIPT = """
import os, sys
import marker  # stands for what `distillery` imports: the whole CLI
if __name__ == "__main__":
    import torch
    from pipeline.data.rendering import worker_context
    for epoch in range(3):  # a new loader per epoch, as the training loops make
        loader = torch.utils.data.DataLoader(range(4), batch_size=2, num_workers=1,
                                             multiprocessing_context=worker_context(1))
        assert sum(len(batch) for batch in loader) == 4
"""
MARKER = """
import os
with open(os.environ["IMPORTS_LOG"], "a") as log:
    log.write(f"{os.getpid()}\\n")  # one line per process that imports this module
"""


def test_loader_workers_do_not_import_again_what_the_main_script_imports(tmp_path: Path) -> None:
    """Each worker runs the parent's main script again: for `distillery` that was an import of the whole CLI per
    epoch (fit and students took 3-5x as long). The fork server imports it once; its workers find it imported."""
    (tmp_path / "main.py").write_text(MAIN_SCRIPT)
    (tmp_path / "marker.py").write_text(MARKER)
    log = tmp_path / "imports.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)]), "IMPORTS_LOG": str(log)}
    done = subprocess.run([sys.executable, str(tmp_path / "main.py")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(log.read_text().split()) == 2  # this process and the fork server, not each epoch's worker
