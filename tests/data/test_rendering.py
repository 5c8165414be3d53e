"""Rendered-view torch Datasets: a DataLoader batch holds exactly the per-item renders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.datasets import load_dataset
from pipeline.data.rendering import RenderedViews, ViewBatches, clean_views
from pipeline.data.views import ViewPlan, crop_view, render_view

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


@pytest.mark.parametrize("resize", ["float32", "uint8"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_view_batches_render_the_per_sample_views_in_the_worker_or_packed_for_the_device(interpolation: str,
                                                                                        resize: str) -> None:
    # The student stream's batched path: crops cut per sample, the batch rendered at once, in the worker
    # (CPU students) or packed and rendered where the student trains (here the CPU again): the same bits
    # as the teacher's per-sample render, at the student's and an online teacher's size, with the plan's filter
    # and resize arithmetic. A uint8 resize runs in the worker either way: only the resized pixels travel.
    rng = np.random.default_rng(3)
    raws = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in [(40, 56), (33, 21), (40, 56)] * 4]
    raws[4].flags.writeable = False  # a decoded image may be read-only
    plan = ViewPlan(num_augmented=3, seed=2, interpolation=interpolation, resize=resize)
    params = [plan.params(i, i % plan.num_views) for i in range(len(raws))]
    assert len({p.flip for p in params}) == 2 and params[0].height == 1.0  # flipped, unflipped and clean views
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)

    def samples() -> list[dict]:
        return [{"crop": crop_view(r, p).copy() if i % 2 else crop_view(r, p), "flip": p.flip, "label": i}
                for i, (r, p) in enumerate(zip(raws, params))]

    sizes = {"input": 24, "teacher_input": 17}
    here = ViewBatches(sizes, mean, std, render_here=True, interpolation=interpolation, resize=resize)(samples())
    packed = ViewBatches(sizes, mean, std, render_here=False, interpolation=interpolation, resize=resize)
    shipped = packed(samples())
    assert "input" not in shipped
    if resize == "uint8":
        assert {k for k in shipped if k.startswith("resized/")} == {"resized/input", "resized/teacher_input"}
        assert shipped["resized/input"].dtype == torch.uint8 and shipped["resized/input"].shape == (12, 3, 24, 24)
    else:
        assert shipped["pixels"].dtype == torch.uint8 and shipped["pixels"].ndim == 1
        assert shipped["pixels"].numel() == sum(crop_view(r, p).size for r, p in zip(raws, params))
    there = packed.render_on(shipped, torch.device("cpu"))
    for name, size in sizes.items():
        expected = torch.stack([render_view(r, p, size, mean, std) for r, p in zip(raws, params)])
        assert torch.equal(here[name], expected) and torch.equal(there[name], expected)
    assert here["label"].tolist() == there["label"].tolist() == list(range(len(raws)))
    assert set(there) == {"input", "teacher_input", "label"}


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
