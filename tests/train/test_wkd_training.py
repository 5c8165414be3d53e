"""WKD-L and WKD-F in a real training run: composed with CE, fed from a cache, weights decayed per step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.methods import MethodError
from pipeline.cache.statistics import recompute_statistics
from pipeline.train.config import RunSettings, StudentSpec, TrainConfig
from pipeline.train.loop import check_run, train_student

METHODS = ("ce", "wkd_l:T=4,weight=10", "wkd_f:weight=0.5")
TERMS = ("ce", "wkd_l_target", "wkd_l_wd", "wkd_f_mean", "wkd_f_std")


def test_ce_wkd_l_wkd_f_train_from_a_cache(make_cache, tmp_path: Path) -> None:
    cache = make_cache(n=96)
    recompute_statistics(str(cache))  # the synthetic cache has no stats/cka/ir yet; no teacher needed
    # test_resnet's deepest map is 2x2 at 64 px: enough positions for the cache's 1x1 grid.
    settings = RunSettings(epochs=1, batch_size=32, workers=0, input_size=64)
    summary = train_student(TrainConfig(cache=str(cache), student="test_resnet", methods=METHODS,
                                        out=str(tmp_path / "run"), settings=settings))

    assert summary.steps == 3 and math.isfinite(summary.final_loss)
    steps = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "step"]
    assert len(steps) == 3
    for r in steps:
        assert all(math.isfinite(r[t]) for t in TERMS)
        assert r["loss"] == pytest.approx(sum(r[t] for t in TERMS), rel=1e-5)


def test_a_student_map_too_small_for_the_grid_is_refused_before_training(make_cache, tmp_path: Path) -> None:
    cache = make_cache(n=40)
    settings = RunSettings(epochs=1, batch_size=32, workers=0, input_size=16)  # deepest map 1x1
    with pytest.raises(MethodError, match=r"1x1.*--input-size"):
        check_run(TrainConfig(cache=str(cache), student="test_resnet", methods=("ce", "wkd_f"),
                              out=str(tmp_path / "run"), settings=settings))


def test_wkd_l_without_interrelations_names_the_stats_command(make_cache, tmp_path: Path) -> None:
    cache = make_cache(n=40)
    settings = RunSettings(epochs=1, batch_size=32, workers=0)
    with pytest.raises(MethodError, match=rf"`distillery stats {cache}`"):
        check_run(TrainConfig(cache=str(cache), student="test_resnet", methods=("ce", "wkd_l"),
                              out=str(tmp_path / "run"), settings=settings))


def test_the_run_taps_the_stage_wkd_f_reads() -> None:
    assert StudentSpec(student="test_resnet", methods=("ce", "wkd_l", "wkd_f")).taps == (-1,)
    assert StudentSpec(student="test_resnet", methods=("ce", "wkd_f:stage=-2")).taps == (-2,)
