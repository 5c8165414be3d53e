"""docs/ARCHITECTURE.md "Where new things go", walked through: a method that needs a new target.

The two steps the section names, done at test time instead of in the package: a `Target` record with its
producer registered in `pipeline.cache.targets.TARGETS`, and a method registered by `register_method` that
lists it in `needs`. Then, unchanged, the teacher pass stores it, the cache serves it, the stream and the
online teacher hand it to the method, and a student trains with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from pipeline.cache.manifest import StorageSpec
from pipeline.cache.reader import TeacherCache
from pipeline.cache.targets import TARGETS, Target, TargetArray, TeacherOutputs, register_target
from pipeline.methods.base import _REGISTRY, Method, StudentOutputs, Targets, TrainingProgress, register_method
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.train.config import RunSettings, TrainConfig
from pipeline.train.loop import train_student

POOLED_NORM = "pooled_norm"


def produce_pooled_norm(out: TeacherOutputs, storage: StorageSpec) -> dict[str, Tensor]:
    """Step 1's producer: one teacher output -> the rows of the target's arrays (here always stored)."""
    return {"features/pooled_norm": out.pooled.float().norm(dim=1, keepdim=True)}


class PooledNormMatch(Method):
    """Step 2: the method. MSE between the student's and the teacher's pooled-feature norms."""

    name = "test_pooled_norm"
    needs = frozenset({POOLED_NORM})
    seen: list[Tensor] = []

    def forward(self, student: StudentOutputs, targets: Targets, labels: Tensor,
                progress: TrainingProgress) -> dict[str, Tensor]:
        teacher = targets[POOLED_NORM]
        type(self).seen.append(teacher.detach().cpu())
        return {"test_pooled_norm": (student.pooled.norm(dim=1) - teacher[:, 0]).square().mean()}


@pytest.fixture()
def toy_target_and_method():
    register_target(Target(
        name=POOLED_NORM, description="teacher pooled-feature norms", cache_option="its default options",
        layouts=((TargetArray("features/pooled_norm", "float16", checked=True),),), produce=produce_pooled_norm))
    register_method(PooledNormMatch)
    PooledNormMatch.seen = []
    try:
        yield
    finally:  # the registrations end with the test
        del TARGETS[POOLED_NORM], _REGISTRY[PooledNormMatch.name]


def test_a_method_needing_a_new_target_is_cached_served_and_trained(toy_target_and_method, cache_request,
                                                                    tmp_path: Path) -> None:
    root = tmp_path / "cache"
    run_cache_pass(cache_request(root, subset=120, views=1, shard_size=60, block_size=30))
    cache = TeacherCache(root)
    assert POOLED_NORM in cache.available_targets() and cache.target_shapes(frozenset({POOLED_NORM})) == {
        POOLED_NORM: (1,)}
    assert cache.manifest.arrays["features/pooled_norm"].to_dict() == {"shape": [120, 2, 1], "dtype": "float16"}
    pooled = cache.read("features/pooled").astype(np.float32)
    np.testing.assert_allclose(cache.read("features/pooled_norm")[..., 0].astype(np.float32),
                               np.linalg.norm(pooled, axis=-1), rtol=2e-3)

    for online in (False, True):
        out = tmp_path / f"run-online-{online}"
        settings = RunSettings(epochs=1, batch_size=40, workers=0, online_teacher=online)
        summary = train_student(TrainConfig(cache=str(root), student="test_resnet", methods=("ce", "test_pooled_norm"),
                                            out=str(out), settings=settings))
        assert summary.online_teacher is online
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        terms = [s["test_pooled_norm"] for s in steps if "test_pooled_norm" in s]
        assert terms and all(np.isfinite(terms))
    served = torch.cat(PooledNormMatch.seen)
    assert served.dtype == torch.float32 and served.shape == (2 * 120, 1)
    assert torch.all(served > 0)
