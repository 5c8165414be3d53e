"""Storage rows of `distillery bench` (README "Benchmarks"): what a cache costs per sample-view, array by
array, against TinyViT's top-k logit budget of 4k+4 bytes (k float16 values, k uint16 indices, one float32);
and the teacher pass + statistics at N, 2N and 4N samples, each in a fresh process, so time (which should
grow linearly) and peak RSS (which should stay flat: the pass holds one shard, the statistics mergeable
sums, docs/ARCHITECTURE.md §4-§5) are read side by side in one run.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.cache.store import TeacherCache

TOPK = 5  # Fashion-MNIST has 10 classes (TinyViT keeps k = 10 of ImageNet's 1,000)
SCALES = (1, 2, 4)


def tinyvit_bytes(k: int) -> int:
    """TinyViT's stored logits per sample-view: k float16 values + k uint16 indices + a float32 (4k + 4)."""
    return 4 * k + 4


def cache_bytes(root: str) -> dict[str, Any]:
    """Bytes per sample-view of every per-sample array as stored (zarr, compressed), of the shards (raw
    inputs and their containers) and of the dataset-level statistics, with the total and the top-k logits
    against `tinyvit_bytes`."""
    cache = TeacherCache(root)
    sample_views = cache.num_samples * cache.num_views
    rows = [{"array": name, "dtype": meta["dtype"], "bytes": cache.array(name).nbytes_stored() / sample_views}
            for name, meta in cache.manifest.arrays.items()]
    rows.append({"array": "shards (raw inputs)", "dtype": "uint8",
                 "bytes": sum(r.bytes for r in cache.manifest.records()) / sample_views})
    stats = cache.manifest.stats.get("arrays", [])
    rows.append({"array": f"statistics ({len(stats)} arrays)", "dtype": "-",
                 "bytes": sum(cache.array(n).nbytes_stored() for n in stats) / sample_views})
    logits = sum(r["bytes"] for r in rows if r["array"].startswith("logits/"))
    k = cache.manifest.storage_spec().topk
    return {"cache": root, "samples": cache.num_samples, "views": cache.num_views, "k": k, "rows": rows,
            "total": sum(r["bytes"] for r in rows), "logits": logits,
            "tinyvit": tinyvit_bytes(k) if k else None, "logits_over_tinyvit": logits / tinyvit_bytes(k) if k else None}


def _cache_once(fields: dict[str, Any]) -> dict[str, Any]:
    # Runs in a spawned process, so its peak RSS is this pass's own.
    from pipeline.teacher.cache_pass import run_cache_pass
    from pipeline.teacher.plan import CacheRequest
    from pipeline.train.loop import peak_rss_bytes

    start = time.perf_counter()
    run_cache_pass(CacheRequest(**fields))
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes()}


def bench_cache_scaling(samples: int, teacher: str = "resnet10t", dataset: str = "fashion-mnist",
                        device: str = "auto", shard_size: int = 512) -> dict[str, Any]:
    """The teacher pass + statistics (`run_cache_pass`) at `samples` x `SCALES`, one fresh process each,
    with top-k logits (`TOPK`); then `cache_bytes` of the largest cache."""
    context = multiprocessing.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory(prefix="distillery-storage-") as tmp:
        for scale in SCALES:
            out = str(Path(tmp) / f"cache-{scale}")
            fields = dict(dataset=dataset, teacher=teacher, out=out, subset=samples * scale, views=1,
                          logits=f"topk:{TOPK}", shard_size=shard_size, device=device)
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                run = pool.submit(_cache_once, fields).result()
            rows.append({"samples": samples * scale, **run})
        bytes_ = cache_bytes(out)
    first = rows[0]
    for row in rows:
        row["time_over_first"] = row["seconds"] / first["seconds"]
        row["samples_over_first"] = row["samples"] / first["samples"]
        row["rss_over_first"] = row["peak_rss_bytes"] / first["peak_rss_bytes"]
    return {"bench": "cache_scaling", "teacher": teacher, "dataset": dataset, "rows": rows, "bytes": bytes_}
