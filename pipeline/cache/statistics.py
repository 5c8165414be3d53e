"""Dataset-level statistics of a teacher cache (docs/cache-format.md#statistics), computed from its stored rows.

Every shard yields mergeable partial sums (`shard_statistics`), read from the rows it stored, so the
statistics never need the teacher and the shards may be reduced anywhere; `reduce_statistics` merges them
into PCA, class statistics, CKA interrelations, Gaussian summaries and (with LSH bits) the LSH planes, codes
and index, all committed at once. `recompute_statistics` is `distillery stats`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from pipeline.cache.blocks import block_key
from pipeline.cache.layout import LSH_INDEX_NAME, LSH_STATS_ARRAYS
from pipeline.cache.lock import cache_lock
from pipeline.cache.manifest import CacheError, LshRecord, StatsSection
from pipeline.cache.reader import TeacherCache
from pipeline.cache.targets import GAUSSIAN, LOGITS, POOLED
from pipeline.cache.writer import CacheWriter
from pipeline.checksums import sha256_bytes
from pipeline.stats.classes import ClassMoments
from pipeline.stats.cka import category_interrelations, cka_sample_rows
from pipeline.stats.gaussian import GaussianSummary
from pipeline.stats.lsh import build_index, encode, train_lsh, training_rows
from pipeline.stats.moments import FeatureMoments, pca_from_moments

log = logging.getLogger("distillery.cache")


@dataclass
class ShardStats:
    """A shard's mergeable partial sums; None where the cache stores no rows to compute them from
    (pooled features left out by `--store`: no PCA or class statistics; no Gaussians)."""

    features: FeatureMoments | None
    classes: ClassMoments | None
    gaussian: GaussianSummary | None

    def merge(self, other: ShardStats) -> ShardStats:
        return ShardStats(*(None if a is None else a.merge(b) for a, b in
                            ((self.features, other.features), (self.classes, other.classes),
                             (self.gaussian, other.gaussian))))


def shard_statistics(root: str, index: int) -> ShardStats:
    """Partial sums of shard `index`, from its zarr rows once they match their record (named otherwise)."""
    cache = TeacherCache(root, require_complete=False)
    pooled_arrays, gaussian_arrays = cache.target_arrays(POOLED), cache.target_arrays(GAUSSIAN)
    # The logits are checked too (not summed): CKA reads their rows unchecked.
    rows = cache.shard_rows(index, ["samples/labels", *pooled_arrays, *gaussian_arrays, *cache.target_arrays(LOGITS)])
    features = classes = gaussian = None
    if pooled_arrays:
        pooled = rows[pooled_arrays[0]][:, 0].astype(np.float64)
        features = FeatureMoments.empty(pooled.shape[1])
        features.update(pooled)
        classes = ClassMoments.empty(cache.num_classes, pooled.shape[1])
        classes.update(pooled, rows["samples/labels"])
    if gaussian_arrays:
        mean, std = (rows[n][:, 0].astype(np.float32) for n in gaussian_arrays)
        gaussian = GaussianSummary.empty(mean.shape[-1])
        gaussian.update(mean, std)
    return ShardStats(features, classes, gaussian)


def check_cka_source(source: str, has_logits: bool, has_pooled: bool = True) -> None:
    """Refuse a CKA source the cache cannot serve, before any teacher pass or statistics rewrite starts."""
    if source not in ("logits", "features", "auto"):
        raise CacheError(f"--cka-source must be logits, features or auto, not '{source}'")
    if source == "logits" and not has_logits:
        raise CacheError("--cka-source logits needs stored logits; this cache has none, use "
                           "--cka-source features")
    if source == "features" and not has_pooled:
        raise CacheError("--cka-source features needs stored pooled features; add pooled to --store or use "
                         "--cka-source logits")


def resolved_cka_source(source: str, cache: TeacherCache) -> str | None:
    """`auto` -> logits when stored, else pooled features when stored, else None (no CKA statistics)."""
    available = cache.available_targets()
    check_cka_source(source, LOGITS in available, POOLED in available)
    if source != "auto":
        return source
    return "logits" if LOGITS in available else "features" if POOLED in available else None


def cka_rows(cache: TeacherCache, source: str) -> tuple[np.ndarray, np.ndarray]:
    """View-0 rows used for CKA: the first rows of every class, up to the per-class budget (`cka_sample_rows`)."""
    labels = cache.read("samples/labels")
    take = cka_sample_rows(labels, cache.num_classes)
    if source == "logits":
        rows = {block_key(name): cache.array(name).oindex[take, 0:1] for name in cache.target_arrays(LOGITS)}
        values = cache.dense_logits(rows)[:, 0]
    else:
        values = cache.array(cache.target_arrays(POOLED)[0]).oindex[take, 0].astype(np.float32)
    return values, labels[take]


def lsh_statistics(cache: TeacherCache, bits: int) -> tuple[dict[str, np.ndarray], bytes, LshRecord]:
    """Train LSH planes on the view-0 pooled features and encode every stored sample (README "The teacher
    cache", Statistics): the arrays (planes, thresholds, view-0 codes `lsh/codes` (N, 1, bits/8) uint8), the serialized faiss
    neighbour index and its manifest record. Reads the stored features only (no teacher); memory is one
    shard of features plus the training rows and the codes (N * bits / 8 bytes)."""
    pooled = cache.array(cache.target_arrays(POOLED)[0])
    rows = training_rows(cache.num_samples)
    projection = train_lsh(pooled.oindex[rows, 0].astype(np.float32), bits)
    codes = np.concatenate([encode(pooled[s.start:s.stop, 0].astype(np.float32), projection)
                            for s in cache.manifest.shards])
    index = faiss.serialize_index_binary(build_index(codes)).tobytes()
    arrays = {"stats/lsh/planes": projection.planes, "stats/lsh/thresholds": projection.thresholds,
              "lsh/codes": codes[:, None]}
    return arrays, index, LshRecord(bits=bits, train_rows=len(rows), index=LSH_INDEX_NAME,
                                    index_sha256=sha256_bytes(index))


def reduce_statistics(root: str, parts: list[ShardStats], cka_source: str = "auto",
                      lsh_bits: int | None = None) -> StatsSection:
    """Merge the shards' partials; write PCA, class stats, CKA interrelations, Gaussian summaries and, with
    LSH bits (`lsh_bits`, default the storage's), the LSH planes, codes and index: all committed at once
    (`CacheWriter.write_stats`), with the storage's `lsh_bits` updated to match."""
    total = functools.reduce(ShardStats.merge, parts)
    cache = TeacherCache(root, require_complete=False)
    arrays: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {}
    if total.features is not None:
        if total.features.count >= 2:
            pca = pca_from_moments(total.features)
            arrays.update({"stats/pca/mean": pca.mean, "stats/pca/components": pca.components,
                           "stats/pca/explained_variance": pca.explained_variance})
            info.update(pca_components_90=pca.num_components_for(0.9))
        else:  # a covariance needs two rows: the statistic is left out, as a --store without pooled leaves it
            log.warning("PCA of the pooled features is undefined for a single sample; it is not stored")
        arrays.update({"stats/classes/mean": total.classes.means(), "stats/classes/count": total.classes.counts})
        info.update(features_count=int(total.features.count))
    source = resolved_cka_source(cka_source, cache)
    if source is not None:
        values, labels = cka_rows(cache, source)
        interrelations = category_interrelations(values, labels, cache.num_classes)
        arrays["stats/cka/ir"] = interrelations.ir
        info.update(cka_source=source, cka_samples_per_class=int(interrelations.samples.max()))
        if interrelations.undefined:
            info["cka_undefined_classes"] = sorted(interrelations.undefined)
            log.warning(interrelations.warning(cache.class_names))
    if total.gaussian is not None:
        arrays["stats/gaussian/channel_mean"] = total.gaussian.channel_mean_of_means()
        arrays["stats/gaussian/channel_std"] = total.gaussian.channel_mean_of_stds()
    info["arrays"] = sorted(arrays)
    bits = cache.manifest.storage.lsh_bits if lsh_bits is None else lsh_bits
    if bits and POOLED not in cache.available_targets():
        raise CacheError(f"--lsh-bits {bits} trains LSH planes on the teacher's pooled features, which {root} does "
                         f"not store; re-run `distillery cache` with pooled in --store, or --lsh-bits 0")
    index = None
    if bits:
        lsh_arrays, index, info["lsh"] = lsh_statistics(cache, bits)
        arrays.update(lsh_arrays)
        info["arrays"] = sorted([*info["arrays"], *LSH_STATS_ARRAYS])
    stats = StatsSection(**info)  # the keys in the order computed, as the manifest has always had them
    CacheWriter(root, cache.manifest).write_stats(arrays, stats, lsh_index=index, storage={"lsh_bits": bits})
    return stats


def recompute_statistics(root: str, cka_source: str = "auto", lsh_bits: int | None = None) -> StatsSection:
    """`distillery stats`: rebuild the dataset-level statistics of a complete cache, without the teacher.

    `lsh_bits` replaces the cache's LSH bits (its `storage.lsh_bits`, so the manifest stays truthful;
    0 removes LSH); None rebuilds with the bits it has. The new statistics are committed only once all of
    them are written (`CacheWriter.write_stats`): an interrupted run leaves the previous complete cache as
    it was, and running either command again works.
    """
    with cache_lock(root):
        cache = TeacherCache(root)
        resolved_cka_source(cka_source, cache)
        if lsh_bits is not None:
            cache.manifest.storage.replace(lsh_bits=lsh_bits)  # validates the bits (CacheError)
        parts = [shard_statistics(root, r.index) for r in cache.manifest.records()]
        return reduce_statistics(root, parts, cka_source, lsh_bits=lsh_bits)
