"""What `distillery inspect` reports about a cache's storage."""

from __future__ import annotations

from pathlib import Path

from pipeline.cache.reader import TeacherCache
from pipeline.cache.summary import array_rows, featmap_rows


def test_feature_map_bytes_per_sample_view_match_the_zarr_store(featmaps_cache: Path) -> None:
    cache = TeacherCache(featmaps_cache)
    (row,) = featmap_rows(cache)
    arr = cache.array(row.name)
    first = arr[0, 0]
    assert row.map_shape == first.shape and row.dtype == str(first.dtype) and row.raw_bytes == first.nbytes
    assert row.stored_bytes * cache.num_samples * cache.num_views == arr.nbytes_stored()
    assert featmap_rows(TeacherCache(featmaps_cache)) == [row]


def test_statistics_of_large_arrays_read_a_bounded_head(featmaps_cache: Path, monkeypatch) -> None:
    import pipeline.cache.summary as summary

    cache = TeacherCache(featmaps_cache)
    name = next(n for n in cache.manifest.arrays if n.startswith("featmaps/"))
    row_bytes = cache.array(name).nbytes // cache.num_samples
    monkeypatch.setattr(summary, "STATS_BYTES", 3 * row_bytes)
    (row,) = [r for r in array_rows(cache) if r.name == name]
    head = cache.array(name)[:3].astype("float64")
    assert row.mean == head.mean() and row.std == head.std()
