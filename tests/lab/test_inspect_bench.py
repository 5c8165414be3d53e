"""The inspect benchmark runs and reports its timings (numbers are printed, never asserted)."""

from __future__ import annotations

from pipeline.lab.inspect_bench import bench_inspect


def test_bench_inspect_reports_its_timings() -> None:
    result = bench_inspect("digits", views=2, dim=8, channels=2, lsh_bits=16, shard_size=500, block_size=100)
    print(result)
    assert result["samples"] == 1437 and result["report_bytes"] > 10_000
    assert all(result[k] > 0 for k in ("build_seconds", "summary_seconds", "report_seconds"))
