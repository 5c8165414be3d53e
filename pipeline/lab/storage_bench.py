"""Storage rows of `distillery bench` (README "Benchmarks"): what a cache costs per sample-view, array by
array, against TinyViT's top-k logit budget of 4k+4 bytes (k float16 values, k uint16 indices, one float32);
the teacher pass + statistics at N, 2N and 4N samples, each in a fresh process, so time (which should
grow linearly) and peak RSS (which should stay flat: the pass holds one shard, the statistics mergeable
sums, docs/cache-format.md#contract, docs/cache-format.md#statistics) are read side by side in one run; and the student stream's samples/s
over that cache against its format-1 twin (every row also copied into the shards' blocks).
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from pipeline.cache.manifest import Manifest
from pipeline.cache.blocks import decode_block, iter_tar_members
from pipeline.cache.inputs import raw_count, unpack_raw
from pipeline.cache.reader import TeacherCache
from pipeline.cache.writer import CacheWriter
from pipeline.cache.targets import LOGITS, POOLED

TOPK = 5  # Fashion-MNIST has 10 classes (TinyViT keeps k = 10 of ImageNet's 1,000)
SCALES = (1, 2, 4)


def tinyvit_bytes(k: int) -> int:
    """TinyViT's stored logits per sample-view: k float16 values + k uint16 indices + a float32 (4k + 4)."""
    return 4 * k + 4


class BytesRow(BaseModel):
    """One line of `cache_bytes`: an array (or the shards, or the statistics) and its bytes per sample-view."""

    model_config = ConfigDict(frozen=True)

    array: str
    dtype: str
    bytes: float


class CacheBytes(BaseModel):
    """`cache_bytes`: what a cache stores per sample-view, row by row, and its top-k logits against TinyViT's."""

    model_config = ConfigDict(frozen=True)

    cache: str
    samples: int
    views: int
    k: int | None  # top-k logits' k; None for dense logits
    rows: list[BytesRow]
    total: float
    logits: float
    tinyvit: int | None
    logits_over_tinyvit: float | None


def cache_bytes(root: str) -> CacheBytes:
    """Bytes per sample-view of every per-sample array as stored (zarr, compressed), of the shards (raw
    inputs and their containers) and of the dataset-level statistics, with the total and the top-k logits
    against `tinyvit_bytes`."""
    cache = TeacherCache(root)
    sample_views = cache.num_samples * cache.num_views
    rows = [BytesRow(array=name, dtype=meta.dtype, bytes=cache.array(name).nbytes_stored() / sample_views)
            for name, meta in cache.manifest.arrays.items()]
    rows.append(BytesRow(array="shards (raw inputs)", dtype="uint8",
                         bytes=sum(r.bytes for r in cache.manifest.records()) / sample_views))
    stats = cache.manifest.stats.arrays
    rows.append(BytesRow(array=f"statistics ({len(stats)} arrays)", dtype="-",
                         bytes=sum(cache.array(n).nbytes_stored() for n in stats) / sample_views))
    logits = sum(r.bytes for r in rows if r.array.startswith("logits/"))
    k = cache.manifest.storage.topk
    return CacheBytes(cache=root, samples=cache.num_samples, views=cache.num_views, k=k, rows=rows,
                      total=sum(r.bytes for r in rows), logits=logits, tinyvit=tinyvit_bytes(k) if k else None,
                      logits_over_tinyvit=logits / tinyvit_bytes(k) if k else None)


def cache_once(fields: dict[str, Any]) -> dict[str, Any]:
    # Runs in a spawned process, so its peak RSS is this pass's own.
    from pipeline.teacher.cache_pass import run_cache_pass
    from pipeline.teacher.plan import CacheRequest
    from pipeline.environment import peak_rss_bytes

    start = time.perf_counter()
    run_cache_pass(CacheRequest(**fields))
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes()}


class ScalingRow(BaseModel):
    """The pass + statistics at one size, and its ratios to the first (smallest) size."""

    model_config = ConfigDict(frozen=True)

    samples: int
    seconds: float
    peak_rss_bytes: int
    time_over_first: float
    samples_over_first: float
    rss_over_first: float


class StreamRates(BaseModel):
    """Samples/s of one epoch of the student stream over a cache and over its format-1 twin."""

    # The keys `distillery bench --json` has always written, read back too.
    model_config = ConfigDict(frozen=True, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    format_2: float = Field(alias="format 2")
    format_1: float = Field(alias="format 1")


class CacheScaling(BaseModel):
    """`bench_cache_scaling`: the storage rows of `distillery bench`."""

    model_config = ConfigDict(frozen=True)

    bench: Literal["cache_scaling"] = "cache_scaling"
    teacher: str
    dataset: str
    rows: list[ScalingRow]
    bytes: CacheBytes
    stream_samples_per_s: StreamRates
    stream_format_2_over_1: float


def bench_cache_scaling(samples: int, teacher: str = "resnet10t", dataset: str = "fashion-mnist",
                        device: str = "auto", shard_size: int = 512) -> CacheScaling:
    """The teacher pass + statistics (`run_cache_pass`) at `samples` x `SCALES`, one fresh process each,
    with top-k logits (`TOPK`); then `cache_bytes` of the largest cache."""
    context = multiprocessing.get_context("spawn")
    runs = []
    with tempfile.TemporaryDirectory(prefix="distillery-storage-") as tmp:
        for scale in SCALES:
            out = str(Path(tmp) / f"cache-{scale}")
            fields = dict(dataset=dataset, teacher=teacher, out=out, subset=samples * scale, views=1,
                          logits=f"topk:{TOPK}", shard_size=shard_size, device=device)
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                runs.append({"samples": samples * scale, **pool.submit(cache_once, fields).result()})
        bytes_ = cache_bytes(out)
        twin = format_1_twin(out, str(Path(tmp) / "format-1"))
        stream = {"format 2": 0.0, "format 1": 0.0}
        for _ in range(3):  # interleaved, the best of 3 counts
            for label, root in (("format 2", out), ("format 1", twin)):
                stream[label] = max(stream[label], stream_samples_per_s(root))
    first = runs[0]
    rows = [ScalingRow(**run, time_over_first=run["seconds"] / first["seconds"],
                       samples_over_first=run["samples"] / first["samples"],
                       rss_over_first=run["peak_rss_bytes"] / first["peak_rss_bytes"]) for run in runs]
    return CacheScaling(teacher=teacher, dataset=dataset, rows=rows, bytes=bytes_,
                        stream_samples_per_s=StreamRates(format_2=stream["format 2"], format_1=stream["format 1"]),
                        stream_format_2_over_1=stream["format 2"] / stream["format 1"])


def format_1_twin(root: str, out: str) -> str:
    """The cache at `root` rewritten in format 1 (blocks copying every per-sample row), by the writer's own
    format-1 path: the layout caches had before each byte was stored once."""
    cache = TeacherCache(root)
    manifest = Manifest.load(root)
    manifest.format_version, manifest.status = 1, "partial"
    manifest.shards = [s.planned() for s in manifest.records()]
    writer = CacheWriter.create_or_resume(out, manifest)
    records = []
    for record, path in zip(cache.manifest.records(), cache.shard_paths()):
        rows = cache.shard_rows(record.index, list(cache.manifest.arrays))
        raws = [unpack_raw(block, i) for block in (decode_block(data) for _, data in iter_tar_members(path))
                for i in range(raw_count(block))]
        records.append(writer.write_shard(record.index, record.start, record.stop, rows, raws))
    writer.finalize(records)
    return out


def stream_samples_per_s(root: str, size: int = 32, batch_size: int = 256, workers: int = 0,
                         device: str = "cpu") -> float:
    """One epoch of the student stream alone (logits and pooled features served, inputs rendered by
    `workers` DataLoader workers, or on `device` if it is a GPU), samples/s."""
    from pipeline.train.stream import CacheStream

    cache = TeacherCache(root)
    stream = CacheStream(cache, size=size, targets=frozenset({LOGITS, POOLED}), seed=0)
    start = time.perf_counter()
    seen = sum(len(batch["id"]) for batch in stream.loader(0, batch_size, workers, device != "cpu", device))
    if device != "cpu":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if seen != cache.num_samples:
        raise RuntimeError(f"the stream served {seen} of {cache.num_samples} samples")
    return seen / elapsed
