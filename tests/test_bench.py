"""The step-time benchmark produces its table (numbers are printed by `distillery bench`, never asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.bench import bench_student_steps, model_flops


@pytest.mark.slow
def test_student_step_benchmark_reports_every_configuration(digits_cache: Path) -> None:
    result = bench_student_steps(str(digits_cache), "test_resnet", {"ce": (("ce",), False),
                                                                     "ce+kd": (("ce", "kd"), False)}, rounds=1)
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"ce", "ce+kd"}
    assert rows["ce"]["over_ce"] == 1.0 and rows["ce+kd"]["over_kd"] == 1.0
    assert all(r["step_ms"] > 0 and r["peak_rss_mb"] > 0 for r in rows.values())


def test_flops_grow_with_the_model() -> None:
    assert model_flops("resnet10t", 10, 1, 32) > 5 * model_flops("test_resnet", 10, 1, 32)
