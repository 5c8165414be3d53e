"""How long `inspect` takes on a large cache, measured on a synthetic one (`pipeline.lab.synthetic`; printed,
never asserted)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.cache.reader import TeacherCache
from pipeline.cache.summary import array_rows, pca_summary, teacher_accuracy_per_view
from pipeline.data.datasets import load_dataset
from pipeline.lab.synthetic import write_synthetic_cache
from pipeline.report.html import write_report


def bench_inspect(dataset: str = "fashion-mnist", **cache_options: Any) -> dict[str, Any]:
    """Seconds `distillery inspect` spends on a synthetic cache of `dataset`: the printed summary (the
    library calls the CLI makes) and the HTML report (every section, LSH and re-rendered views included)."""
    data = load_dataset(dataset, "train")
    with tempfile.TemporaryDirectory(prefix="distillery-bench-") as tmp:
        root = Path(tmp) / "cache"
        start = time.perf_counter()
        write_synthetic_cache(root, data, **cache_options)
        build = time.perf_counter() - start

        start = time.perf_counter()
        cache = TeacherCache(root)
        array_rows(cache), teacher_accuracy_per_view(cache), pca_summary(cache)
        summary = time.perf_counter() - start

        start = time.perf_counter()
        write_report(TeacherCache(root), root / "report.html")
        report = time.perf_counter() - start
        size = (root / "report.html").stat().st_size
    return {"bench": "inspect", "dataset": dataset, "samples": len(data), "build_seconds": build,
            "summary_seconds": summary, "report_seconds": report, "report_bytes": size}
