"""Benchmarks that print ratios measured side by side in one run (machines are shared and noisy).

Nothing here asserts a speed: `distillery bench` prints the numbers, tests only check they are produced.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.views import ViewPlan
from pipeline.teacher.cache_pass import (CacheRequest, cache_shard, plan_cache,
                                         render_pairs, request_dataset, resolve_device, shared_teacher,
                                         teacher_forward, teacher_spec)


def bare_forward_seconds(request: CacheRequest) -> float:
    """A bare teacher forward loop over the same rendered inputs and batch size as the pass (pre-rendered)."""
    dataset = request_dataset(request)
    spec = teacher_spec(request, dataset)
    device = resolve_device(request.device)
    teacher = shared_teacher(spec, str(device))
    plan = ViewPlan(num_augmented=request.views, seed=request.view_seed)
    pairs = np.array([(p, v) for p in range(len(dataset)) for v in range(plan.num_views)], dtype=np.int64)
    batches = [render_pairs(dataset, plan, pairs[i:i + request.batch_size], spec)
               for i in range(0, len(pairs), request.batch_size)]
    teacher_forward(teacher, batches[0], device)  # warm-up (allocator, kernels)
    start = time.perf_counter()
    for x in batches:
        teacher_forward(teacher, x, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def pass_seconds(request: CacheRequest) -> float:
    """The teacher pass's shard phase (render, forward, encode, write zarr + tar, checksums)."""
    shutil.rmtree(request.out, ignore_errors=True)
    plan = plan_cache(request)
    start = time.perf_counter()
    for index in plan.pending:
        cache_shard(request, index)
    return time.perf_counter() - start


def bench_teacher_pass(dataset: str, teacher: str, samples: int, views: int = 2, batch_size: int = 256,
                       shard_size: int = 1024, device: str = "auto") -> dict[str, Any]:
    """Teacher-pass throughput vs a bare forward loop, interleaved bare/pass/bare to share the noise."""
    with tempfile.TemporaryDirectory(prefix="distillery-bench-") as tmp:
        request = CacheRequest(dataset=dataset, teacher=teacher, out=str(Path(tmp) / "cache"), subset=samples,
                               views=views, batch_size=batch_size, shard_size=shard_size, device=device)
        bare_a = bare_forward_seconds(request)
        passed = pass_seconds(request)
        bare_b = bare_forward_seconds(request)
    images = samples * (views + 1)
    bare = (bare_a + bare_b) / 2
    return {"bench": "teacher_pass", "dataset": dataset, "teacher": teacher, "samples": samples, "views": views + 1,
            "batch_size": batch_size, "device": str(resolve_device(device)),
            "pass_images_per_s": images / passed, "bare_images_per_s": images / bare,
            "pass_over_bare": bare / passed}
