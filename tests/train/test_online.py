"""`--online-teacher`: the live teacher gives the cached targets, and a run equals its cached twin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.reader import TeacherCache
from pipeline.cache.targets import GAUSSIAN, LOGITS, POOLED
from pipeline.train.config import RunSettings, TrainConfig, TrainError
from pipeline.train.loop import train_student
from pipeline.train.online import OnlineTeacher
from pipeline.train.stream import CacheStream

ALL = frozenset({LOGITS, POOLED, GAUSSIAN})


def test_live_targets_equal_the_cached_ones_for_the_views_the_student_sees(digits_cache: Path) -> None:
    cache = TeacherCache(digits_cache)
    online = OnlineTeacher(cache, ALL, torch.device("cpu"))
    # The student renders at 16 px; the teacher gets the same views at its own 32 px.
    stream = CacheStream(cache, size=16, targets=ALL, seed=0, teacher_size=online.input_size)
    batch = next(iter(stream.loader(epoch=1, batch_size=64, workers=0)))
    assert batch["input"].shape[-1] == 16 and batch["teacher_input"].shape[-1] == 32
    assert len(set(batch["view"].tolist())) > 1
    live = online(batch["teacher_input"])
    for name in (LOGITS, POOLED):
        torch.testing.assert_close(live[name], batch["targets"][name], rtol=1e-3, atol=1e-3, msg=name)
    for got, cached in zip(live[GAUSSIAN], batch["targets"][GAUSSIAN]):
        torch.testing.assert_close(got, cached, rtol=1e-3, atol=1e-3)


def test_refuses_a_teacher_checkpoint_that_changed(digits_cache: Path, tmp_path: Path) -> None:
    cache = TeacherCache(digits_cache)
    changed = tmp_path / "teacher.pt"
    changed.write_bytes(Path(cache.manifest.teacher.checkpoint).read_bytes() + b"\0")
    cache.manifest.teacher.checkpoint = str(changed)
    with pytest.raises(TrainError, match="changed since the cache was made"):
        OnlineTeacher.check(cache, ALL)


def _step_losses(run: Path) -> np.ndarray:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return np.array([[r["loss"], r["kd"], r["fitnet"]] for r in lines if r["kind"] == "step"])


def test_a_run_and_its_online_twin_have_the_same_per_step_losses_and_accuracy(digits_cache: Path,
                                                                              tmp_path: Path) -> None:
    runs = {}
    for online in (False, True):
        settings = RunSettings(epochs=1, seed=3, batch_size=64, online_teacher=online, device="cpu")
        cfg = TrainConfig(cache=str(digits_cache), student="test_resnet", methods=("ce", "kd", "fitnet"),
                          out=str(tmp_path / str(online)), settings=settings)
        runs[online] = train_student(cfg)
    cached, live = _step_losses(tmp_path / "False"), _step_losses(tmp_path / "True")
    assert cached.shape == live.shape == (23, 3)
    rel = np.abs(cached - live) / np.abs(cached)
    print(f"cached vs online: max relative per-step loss difference {rel.max():.2e}")
    assert rel.max() < 1e-3
    assert runs[True].val_accuracy == runs[False].val_accuracy
    assert runs[True].online_teacher and not runs[False].online_teacher


def test_live_feature_maps_equal_the_cached_ones_in_the_stored_dtype(featmaps_cache: Path) -> None:
    from pipeline.cache.targets import FEATMAPS

    cache = TeacherCache(featmaps_cache)
    online = OnlineTeacher(cache, frozenset({FEATMAPS}), torch.device("cpu"))
    stream = CacheStream(cache, size=32, targets=frozenset({FEATMAPS}), seed=0)
    batch = next(iter(stream.loader(epoch=0, batch_size=64, workers=0)))
    assert len(set(batch["view"].tolist())) > 1
    cached, live = batch["targets"][FEATMAPS], online(batch["input"])[FEATMAPS]
    assert cached.dtype == live.dtype == torch.float16 and cached.shape == (64, 192, 2, 2)
    torch.testing.assert_close(live.float(), cached.float(), rtol=2e-3, atol=2e-3)
