"""A user's own class-per-folder images, end to end: the committed fixture `data/digits-imagefolder`
(RGB PNGs of two sizes, `train/` and `val/` subfolders) through fit-teacher, the teacher pass and a
student trained from the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.cache.reader import TeacherCache
from pipeline.data.datasets import load_dataset
from pipeline.teacher.plan import CacheRequest
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.train.fit import FitConfig, fit_teacher
from pipeline.train.config import RunSettings, TrainConfig
from pipeline.train.loop import train_student

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "digits-imagefolder"


def test_fixture_loads_with_its_splits_and_class_names() -> None:
    train, val = (load_dataset(f"imagefolder:{FIXTURE}", split) for split in ("train", "val"))
    assert train.class_names == val.class_names == ["one", "two", "zero"]
    assert (len(train), len(val)) == (36, 12)
    assert np.bincount(train.labels).tolist() == [12, 12, 12] and np.bincount(val.labels).tolist() == [4, 4, 4]
    assert not set(train.ids) & set(val.ids)
    assert {train.raw(p).shape for p in range(len(train))} == {(16, 16, 3), (16, 20, 3)}


def test_fit_cache_and_train_from_an_imagefolder(tmp_path: Path) -> None:
    dataset = f"imagefolder:{FIXTURE}"
    checkpoint = tmp_path / "teacher.pt"
    fit_teacher(FitConfig(dataset=dataset, model="test_resnet", out=str(checkpoint), epochs=2, input_size=32,
                          batch_size=16, workers=0, device="cpu"))
    cache = tmp_path / "cache"
    run_cache_pass(CacheRequest(dataset=dataset, teacher="test_resnet", checkpoint=str(checkpoint), out=str(cache),
                                views=1, shard_size=16, batch_size=16, block_size=8, device="cpu"))
    stored = TeacherCache(cache)
    assert stored.manifest.status == "complete" and stored.manifest.dataset.class_names == ["one", "two", "zero"]
    assert stored.read("logits/dense").shape == (36, 2, 3) and len(stored.manifest.shards) == 3

    summary = train_student(TrainConfig(cache=str(cache), student="test_resnet", methods=("ce", "kd"),
                                        out=str(tmp_path / "run"),
                                        settings=RunSettings(epochs=1, batch_size=12, workers=0, device="cpu")))
    assert summary.steps == 3 and 0 <= summary.val_accuracy <= 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["cache"] == str(cache)
