"""Synthetic teacher caches: a dataset's samples with made-up teacher outputs, written as a teacher pass writes them.

`write_synthetic_cache` writes a complete cache of a dataset (its ids, labels, raw images and view plan, so
views re-render) with the real `CacheWriter` and, unless told not to, the real statistics reducers, but with
made-up teacher outputs instead of a teacher pass: pooled features are class centres (scaled by
`separation`; 0 is a teacher that has learnt nothing) plus noise, logits their similarity to the centres,
Gaussians random, LSH codes signed random projections with median thresholds (docs/cache-format.md#statistics).
It writes any layout a pass writes (dense, top-k or no logits; pooled features of view 0 only) and, for the
tests of old caches, an older format. The `inspect` benchmark measures a 60,000-sample one; the report's and
the student stage's tests run on small ones (of `random_images` for the latter), where a teacher pass would
cost more than the test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.cache.codecs import topk_encode
from pipeline.cache.manifest import FORMAT_VERSION, ArraySpec, Manifest, ShardRange, StorageSpec, shard_ranges
from pipeline.cache.statistics import reduce_statistics, shard_statistics
from pipeline.cache.reader import TeacherCache
from pipeline.cache.targets import class_index_dtype
from pipeline.cache.writer import CacheWriter
from pipeline.data.datasets import ArrayDataset, ImageDataset
from pipeline.data.views import ViewPlan

LSH_ARRAYS = ("stats/lsh/planes", "stats/lsh/thresholds")
STAGES = ("layer1", "layer2", "layer3")  # the made-up teacher's stages; its Gaussians are of the deepest


def random_images(n: int, classes: int = 10, size: int = 8, seed: int = 0, name: str = "digits") -> ArrayDataset:
    """`n` random grey `size` x `size` images whose labels cycle through `classes` classes named "0", "1", ...;
    ids are 3 * i + 7, so that nothing can mistake a position for an id. Named digits by default: the digits
    val split evaluates the students trained from its cache."""
    rng = np.random.default_rng(seed)
    return ArrayDataset(name=name, split="train", ids=np.arange(n, dtype=np.int64) * 3 + 7,
                        labels=np.arange(n) % classes, class_names=[str(c) for c in range(classes)], channels=1,
                        images=rng.integers(0, 256, size=(n, size, size, 1), dtype=np.uint8))


def _teacher_rows(pooled0: np.ndarray, centres: np.ndarray, codes: np.ndarray, views: int, channels: int,
                  storage: StorageSpec, index_dtype: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The made-up teacher outputs of the samples whose clean pooled features are `pooled0`, as `storage` keeps them."""
    m, dim = pooled0.shape
    # Augmented views: the clean features moved a little, as a crop moves a teacher's features.
    pooled = pooled0[:, None] + 0.5 * rng.normal(size=(m, views, dim)).astype(np.float32)
    pooled[:, 0] = pooled0
    rows = {"features/pooled": (pooled if storage.pooled_views == "all" else pooled[:, :1]).astype(np.float16),
            "gaussian/mean": rng.normal(size=(m, views, 1, channels)).astype(np.float16),
            "gaussian/std": rng.uniform(0.1, 2.0, size=(m, views, 1, channels)).astype(np.float16)}
    if storage.lsh_bits:
        rows["lsh/codes"] = codes
    logits = pooled @ centres.T / np.sqrt(dim)
    if storage.topk is not None:
        values, indices, tail = topk_encode(torch.from_numpy(logits), storage.topk)
        rows.update({"logits/topk_values": values.numpy().astype(np.float16),
                     "logits/topk_indices": indices.numpy().astype(index_dtype),
                     "logits/tail_logsumexp": tail.numpy()})
    elif storage.logits == "dense":
        rows["logits/dense"] = logits.astype(np.float16)
    return rows


def write_synthetic_cache(root: str | Path, dataset: ImageDataset, views: int = 3, dim: int = 512,
                          channels: int = 256, lsh_bits: int = 256, logits: str = "dense", pooled_views: str = "all",
                          separation: float = 1.0, statistics: bool = True, input_size: int = 32,
                          shard_size: int = 4096, block_size: int = 256, seed: int = 0,
                          index_dtype: str | None = None, format_version: int = FORMAT_VERSION) -> TeacherCache:
    """A complete cache of `dataset` with synthetic, class-structured teacher outputs (see the module doc):
    `views` stored views per sample (view 0 the clean one), `dim`-d pooled features (of view 0 only if
    `pooled_views` is "first"), one Gaussian cell of `channels` channels, logits "dense", "topk:K" or "none",
    `lsh_bits` LSH bits (0: none) and the dataset-level statistics (which LSH needs) unless `statistics` is
    False. `index_dtype` and `format_version` write the top-k indices and the layout an older cache had."""
    if lsh_bits and not statistics:
        raise ValueError("LSH codes need their planes, which are statistics: give statistics=True or lsh_bits=0")
    rng = np.random.default_rng(seed)
    n, c = len(dataset), dataset.num_classes
    labels = dataset.labels.astype(np.int32)
    centres = rng.normal(size=(c, dim)).astype(np.float32)
    pooled0 = separation * centres[labels] + 1.5 * rng.normal(size=(n, dim)).astype(np.float32)
    planes = rng.normal(size=(lsh_bits, dim)).astype(np.float32)
    projections = pooled0 @ planes.T
    thresholds = np.median(projections, axis=0).astype(np.float32) if lsh_bits else np.zeros(0, np.float32)
    codes = np.packbits(projections > thresholds, axis=1, bitorder="little")[:, None]
    storage = StorageSpec(logits=logits, pooled_views=pooled_views, tap=STAGES[-1], lsh_bits=lsh_bits,
                          shard_size=shard_size, block_size=block_size)
    index_dtype = index_dtype or class_index_dtype(c)

    def shard_rows(a: int, b: int) -> dict[str, np.ndarray]:
        return {"samples/ids": dataset.ids[a:b], "samples/labels": labels[a:b],
                **_teacher_rows(pooled0[a:b], centres, codes[a:b], views, channels, storage, index_dtype, rng)}

    ranges = shard_ranges(n, shard_size)
    first = shard_rows(*ranges[0])  # its arrays' shapes and dtypes are the manifest's
    mean, std = dataset.pixel_stats()
    manifest = Manifest(
        teacher={"model": "synthetic", "num_classes": c, "in_chans": dataset.channels, "input_size": input_size,
                 "mean": list(mean), "std": list(std), "checkpoint": None, "checkpoint_sha256": None,
                 "taps": [STAGES[-1]], "head": logits != "none", "model_kwargs": {}, "stages": list(STAGES),
                 "pooled_dim": dim},
        dataset={"name": dataset.name, "split": dataset.split, "num_samples": n, "num_classes": c,
                 "class_names": list(dataset.class_names), "channels": dataset.channels,
                 "fingerprint": dataset.fingerprint(), "subset": None, "subset_seed": 0},
        views=ViewPlan(num_augmented=views - 1, seed=seed).to_dict(), storage=storage,
        arrays={name: ArraySpec(shape=[n, *a.shape[1:]], dtype=str(a.dtype)) for name, a in first.items()},
        shards=[ShardRange(index=i, start=a, stop=b) for i, (a, b) in enumerate(ranges)],
        format_version=format_version)
    writer = CacheWriter.create_or_resume(root, manifest)
    records = [writer.write_shard(i, a, b, first if i == 0 else shard_rows(a, b), [dataset.raw(p) for p in range(a, b)])
               for i, (a, b) in enumerate(ranges)]
    if statistics:
        reduce_statistics(str(root), [shard_statistics(str(root), i) for i in range(len(ranges))])
        writer = CacheWriter(root, Manifest.load(root))
        if lsh_bits:
            stats = writer.manifest.stats
            writer.write_stats({"stats/lsh/planes": planes, "stats/lsh/thresholds": thresholds},
                               stats.model_copy(update={"arrays": sorted({*stats.arrays, *LSH_ARRAYS})}))
    writer.finalize(records)
    return TeacherCache(root)
