"""What is in a cache, as rows people read: arrays with bytes, and the statistics worth a glance.

Used by `distillery inspect`, the teacher flow's Prefect artifact, and the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.cache.reader import TeacherCache

PCA_FRACTIONS = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class ArrayRow:
    name: str
    shape: tuple[int, ...]
    dtype: str
    stored_bytes: int  # on disk, after compression
    bytes_per_sample: float
    mean: float | None
    std: float | None


STATS_BYTES = 64 * 2**20
"""At most this many bytes of an array are read for its mean/std (feature maps are ~150 KB a sample-view)."""


def array_rows(cache: TeacherCache, sample_stats: int = 2048) -> list[ArrayRow]:
    """Every zarr array: shape, dtype, stored bytes, and mean/std over the first rows (cheap on big caches)."""
    rows = []
    n = cache.num_samples
    for name in _all_array_names(cache):
        arr = cache.array(name)
        stored = int(arr.nbytes_stored())
        per_sample = not name.startswith("stats/")  # per-sample arrays, in the shards or (LSH codes) not
        row_bytes = max(1, arr.nbytes // max(1, arr.shape[0])) if arr.ndim else 1
        head = np.asarray(arr[: max(1, min(sample_stats, arr.shape[0], STATS_BYTES // row_bytes))]
                          if arr.ndim else arr[...])
        numeric = head.dtype.kind in "fiu" and head.size > 0
        values = head.astype(np.float64) if numeric else None
        rows.append(ArrayRow(name=name, shape=tuple(arr.shape), dtype=str(arr.dtype), stored_bytes=stored,
                             bytes_per_sample=stored / n if per_sample else 0.0,
                             mean=float(values.mean()) if numeric else None,
                             std=float(values.std()) if numeric else None))
    return rows


@dataclass(frozen=True)
class FeatmapRow:
    """Storage cost of one stored feature-map array (ScaleKD, docs/methods.md#scalekd), per sample-view."""

    name: str
    map_shape: tuple[int, int, int]  # (Cf, H, W)
    dtype: str
    raw_bytes: int  # one map in the stored dtype, before compression
    stored_bytes: float  # zarr bytes on disk per sample-view, after compression


def featmap_rows(cache: TeacherCache) -> list[FeatmapRow]:
    """Bytes per sample-view of every `featmaps/<tap>` array, uncompressed and as zarr stores them (their only
    copy; a format-1 cache's shards hold them uncompressed too)."""
    rows = []
    for name in sorted(n for n in cache.manifest.arrays if n.startswith("featmaps/")):
        arr = cache.array(name)
        n, v = arr.shape[:2]
        rows.append(FeatmapRow(name=name, map_shape=tuple(arr.shape[2:]), dtype=str(arr.dtype),
                               raw_bytes=int(np.prod(arr.shape[2:])) * arr.dtype.itemsize,
                               stored_bytes=arr.nbytes_stored() / max(1, n * v)))
    return rows


def _all_array_names(cache: TeacherCache) -> list[str]:
    return sorted(cache.manifest.arrays) + sorted(cache.manifest.stats.arrays)


def teacher_accuracy_per_view(cache: TeacherCache) -> list[dict[str, float]]:
    """Top-1 accuracy and mean max-probability of the cached teacher logits, per stored view."""
    if "logits" not in cache.available_targets():
        return []
    labels = cache.read("samples/labels")
    out = []
    for v in range(cache.num_views):
        rows = {name.replace("/", "."): cache.array(name)[:, v:v + 1]
                for name in cache.manifest.arrays if name.startswith("logits/")}
        for key, value in rows.items():  # read a view at a time, unlike `read`: checked here
            cache.check_finite(f"view {v}: ", key.replace(".", "/"), value)
        logits = cache.dense_logits(rows)[:, 0]
        z = logits - logits.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        out.append({"view": v, "accuracy": float((logits.argmax(1) == labels).mean()),
                    "confidence": float(p.max(1).mean())})
    return out


def pca_cumulative_ratio(cache: TeacherCache) -> np.ndarray | None:
    """Fraction of the view-0 pooled-feature variance explained by the first 1..D PCA components."""
    if not cache.has("stats/pca/explained_variance"):
        return None
    ev = cache.read("stats/pca/explained_variance").astype(np.float64)
    return np.cumsum(ev) / ev.sum() if ev.sum() > 0 else np.zeros_like(ev)


def components_reaching(ratio: np.ndarray, fraction: float) -> int:
    """How many leading components explain at least `fraction` of the variance (`ratio`: cumulative)."""
    return int(np.searchsorted(ratio, fraction) + 1)


def pca_summary(cache: TeacherCache) -> dict[str, Any]:
    ratio = pca_cumulative_ratio(cache)
    if ratio is None:
        return {}
    reach = {f"components_for_{int(f * 100)}pct": components_reaching(ratio, f) for f in PCA_FRACTIONS}
    return {"top10_variance_ratio": float(ratio[min(9, len(ratio) - 1)]), **reach}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
