"""docs/ARCHITECTURE.md#walk-through-dataset, walked through: a new dataset kind.

The two steps the section names, done at test time instead of in the package: a loader, and a `DatasetKind`
registered in `pipeline.data.datasets.DATASET_KINDS`. Then, unchanged, `load_dataset` and the command line's
help know it, a teacher fits on it, the teacher pass caches it and a student trains from the cache (which
reloads the val split by the name the manifest records).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.reader import TeacherCache
from pipeline.data.datasets import (DATASET_KINDS, ArrayDataset, DatasetError, DatasetKind, dataset_help,
                                    load_dataset, register_dataset_kind)
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.teacher.plan import CacheRequest
from pipeline.train.config import RunSettings, TrainConfig
from pipeline.train.fit import FitConfig, fit_teacher
from pipeline.train.loop import train_student

SIZE, PERIOD = 16, 4


def load_stripes(argument: str, split: str, on_bad_image: str) -> ArrayDataset:
    """Step 1: N grey SIZE x SIZE images per split, striped horizontally (class 0) or vertically (class 1) at
    a seeded phase. Val ids follow the train ids; the name is the spec that loads the data again."""
    if not argument.isdigit() or int(argument) < 2:
        raise DatasetError(f"stripes:{argument}: N must be a whole number of at least 2 (one image per class)")
    n = int(argument)
    first = 0 if split == "train" else n
    labels = np.arange(n) % 2
    phases = np.random.default_rng(first).integers(0, PERIOD, n)
    rows = ((np.arange(SIZE)[None, :] + phases[:, None]) // (PERIOD // 2) % 2 * 255).astype(np.uint8)  # (n, SIZE)
    images = np.where(labels[:, None, None] == 0, rows[:, :, None], rows[:, None, :])  # constant along a row / column
    return ArrayDataset(name=f"stripes:{n}", split=split, ids=np.arange(first, first + n), labels=labels,
                        class_names=["horizontal", "vertical"], channels=1, images=images[..., None])


@pytest.fixture()
def stripes_kind():
    """Step 2: the registration (here at test time, ended with the test; in the package, at import)."""
    register_dataset_kind(DatasetKind("stripes", load_stripes, help="synthetic stripes, N per split", argument="N",
                                      default="64"))
    try:
        yield
    finally:
        del DATASET_KINDS["stripes"]


def test_a_new_dataset_kind_is_loaded_listed_cached_and_trained(stripes_kind, tmp_path: Path) -> None:
    assert "stripes[:N] (synthetic stripes, N per split)" in dataset_help()
    with pytest.raises(DatasetError, match=r"unknown dataset 'stripe' \(did you mean 'stripes'\?\); "
                                           r".*imagefolder:DIR, wds:TRAIN\|VAL, stripes\[:N\]$"):
        load_dataset("stripe")
    with pytest.raises(DatasetError, match=r"^stripes:one: N must be a whole number"):
        load_dataset("stripes:one")
    default, val = load_dataset("stripes"), load_dataset("stripes:40", "val")
    assert len(default) == 64 and default.name == "stripes:64"
    assert val.ids.tolist() == list(range(40, 80)) and val.raw(0).shape == (SIZE, SIZE, 1)
    assert load_dataset("stripes:40", subset=10, seed=1).num_classes == 2

    teacher = tmp_path / "teacher.pt"
    fit_teacher(FitConfig(dataset="stripes:40", model="test_resnet", out=str(teacher), epochs=1, batch_size=20,
                          workers=0, device="cpu"))
    cache = tmp_path / "cache"
    run_cache_pass(CacheRequest(dataset="stripes:40", teacher="test_resnet", checkpoint=str(teacher),
                                out=str(cache), views=1, shard_size=20, batch_size=20, block_size=10, device="cpu"))
    manifest = TeacherCache(cache).manifest
    assert manifest.status == "complete" and (manifest.dataset.name, manifest.dataset.num_samples) == ("stripes:40", 40)

    out = tmp_path / "run"
    summary = train_student(TrainConfig(cache=str(cache), student="test_resnet", methods=("ce", "kd"),
                                        out=str(out), settings=RunSettings(epochs=1, batch_size=20, workers=0,
                                                                           device="cpu")))
    assert summary.steps == 2 and 0.0 <= summary.val_accuracy <= 1.0  # one view of each of 40 samples, batches of 20
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(s["kd"]) for s in steps if "kd" in s)
