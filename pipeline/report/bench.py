"""How long `inspect` takes on a large cache, measured on a synthetic one (printed, never asserted).

`write_synthetic_cache` writes a complete cache for a real dataset (its ids, labels, raw images and view
plan, so views re-render) with the real `CacheWriter` and the real statistics reducers, but with made-up
teacher outputs instead of a teacher pass: pooled features are class centres plus noise, logits their
similarity to the centres, LSH codes signed random projections with median thresholds (docs/cache-format.md#statistics).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.manifest import ArraySpec, Manifest, ShardRange, StorageSpec, shard_ranges
from pipeline.cache.reader import TeacherCache
from pipeline.cache.writer import CacheWriter
from pipeline.cache.summary import array_rows, pca_summary, teacher_accuracy_per_view
from pipeline.data.datasets import ImageDataset, load_dataset
from pipeline.data.views import ViewPlan
from pipeline.report.html import write_report
from pipeline.cache.statistics import reduce_statistics, shard_statistics

LSH_ARRAYS = ("stats/lsh/planes", "stats/lsh/thresholds")


def write_synthetic_cache(root: str | Path, dataset: ImageDataset, views: int = 3, dim: int = 512,
                          channels: int = 256, lsh_bits: int = 256, shard_size: int = 4096, block_size: int = 256,
                          seed: int = 0) -> TeacherCache:
    """A complete cache of `dataset` with synthetic, class-structured teacher outputs (see the module doc)."""
    rng = np.random.default_rng(seed)
    n, c = len(dataset), dataset.num_classes
    labels = dataset.labels.astype(np.int32)
    centres = rng.normal(size=(c, dim)).astype(np.float32)
    pooled0 = centres[labels] + 1.5 * rng.normal(size=(n, dim)).astype(np.float32)
    planes = rng.normal(size=(lsh_bits, dim)).astype(np.float32)
    projections = pooled0 @ planes.T
    thresholds = np.median(projections, axis=0).astype(np.float32)
    codes = np.packbits(projections > thresholds, axis=1, bitorder="little")[:, None]
    shapes = {"samples/ids": ((n,), "int64"), "samples/labels": ((n,), "int32"),
              "logits/dense": ((n, views, c), "float16"), "features/pooled": ((n, views, dim), "float16"),
              "gaussian/mean": ((n, views, 1, channels), "float16"), "gaussian/std": ((n, views, 1, channels), "float16"),
              "lsh/codes": ((n, 1, lsh_bits // 8), "uint8")}
    plan = ViewPlan(num_augmented=views - 1, seed=seed)
    storage = StorageSpec(tap="layer3", lsh_bits=lsh_bits, shard_size=shard_size, block_size=block_size)
    ranges = shard_ranges(n, shard_size)
    manifest = Manifest(
        teacher={"model": "synthetic", "num_classes": c, "in_chans": dataset.channels, "input_size": 32,
                 "mean": [0.5] * dataset.channels, "std": [0.25] * dataset.channels, "checkpoint": None,
                 "checkpoint_sha256": None, "taps": ["layer3"], "head": True, "model_kwargs": {},
                 "stages": ["layer1", "layer2", "layer3"], "pooled_dim": dim},
        dataset={"name": dataset.name, "split": dataset.split, "num_samples": n, "num_classes": c,
                 "class_names": list(dataset.class_names), "channels": dataset.channels,
                 "fingerprint": dataset.fingerprint(), "subset": None, "subset_seed": 0},
        views=plan.to_dict(), storage=storage,
        arrays={name: ArraySpec(shape=list(shape), dtype=dtype) for name, (shape, dtype) in shapes.items()},
        shards=[ShardRange(index=i, start=a, stop=b) for i, (a, b) in enumerate(ranges)])
    writer = CacheWriter.create_or_resume(root, manifest)
    records = []
    for i, (a, b) in enumerate(ranges):
        m = b - a
        # Augmented views: the clean features moved a little, as a crop moves a teacher's features.
        pooled = pooled0[a:b, None] + 0.5 * rng.normal(size=(m, views, dim)).astype(np.float32)
        pooled[:, 0] = pooled0[a:b]
        rows = {"samples/ids": dataset.ids[a:b], "samples/labels": labels[a:b],
                "logits/dense": (pooled @ centres.T / np.sqrt(dim)).astype(np.float16),
                "features/pooled": pooled.astype(np.float16),
                "gaussian/mean": rng.normal(size=(m, views, 1, channels)).astype(np.float16),
                "gaussian/std": rng.uniform(0.1, 2.0, size=(m, views, 1, channels)).astype(np.float16),
                "lsh/codes": codes[a:b]}
        records.append(writer.write_shard(i, a, b, rows, [dataset.raw(p) for p in range(a, b)]))
    reduce_statistics(str(root), [shard_statistics(str(root), i) for i in range(len(ranges))])
    writer = CacheWriter(root, Manifest.load(root))
    stats = writer.manifest.stats
    writer.write_stats({"stats/lsh/planes": planes, "stats/lsh/thresholds": thresholds},
                       stats.model_copy(update={"arrays": sorted({*stats.arrays, *LSH_ARRAYS})}))
    writer.finalize(records)
    return TeacherCache(root)


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
