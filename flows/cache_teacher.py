"""Prefect flow `cache-teacher`: plan -> map a task over shards -> per-shard statistics -> reduce -> complete.

A thin wrapper over `pipeline.teacher.cache_pass`; every task is one library function. A shard already
finished in the store is skipped (its files are verified first), so a killed run resumes.
Results are not persisted (`persist_result=False`): the store on disk is the result.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.cache.manifest import Manifest, ShardRecord
from pipeline.cache.store import TeacherCache
from pipeline.cache.summary import array_rows, human_bytes
from pipeline.report.content import gather_report
from pipeline.report.markdown import report_markdown
from pipeline.teacher import cache_pass
from pipeline.teacher.cache_pass import CachePlan, CacheRequest, ShardStats


@task(name="plan-cache", persist_result=False)
def plan_task(request: CacheRequest) -> CachePlan:
    return cache_pass.plan_cache(request)


@task(name="cache-shard", persist_result=False, task_run_name="cache-shard-{index}")
def shard_task(request: CacheRequest, index: int) -> ShardRecord:
    return cache_pass.cache_shard(request, index)


@task(name="shard-statistics", persist_result=False, task_run_name="shard-statistics-{index}")
def shard_stats_task(root: str, index: int) -> ShardStats:
    return cache_pass.shard_statistics(root, index)


@task(name="reduce-statistics", persist_result=False)
def reduce_task(root: str, parts: list[ShardStats], cka_source: str) -> dict[str, Any]:
    return cache_pass.reduce_statistics(root, parts, cka_source)


@task(name="complete-cache", persist_result=False)
def complete_task(root: str, records: list[ShardRecord]) -> Manifest:
    return cache_pass.complete_cache(root, records)


def summary_rows(root: str) -> list[dict[str, Any]]:
    cache = TeacherCache(root)
    return [{"array": r.name, "shape": "x".join(map(str, r.shape)), "dtype": r.dtype,
             "stored": human_bytes(r.stored_bytes), "bytes/sample": round(r.bytes_per_sample, 1)}
            for r in array_rows(cache)]


def summary_markdown(root: str, result: dict[str, Any]) -> str:
    """The cache report's sections as markdown (tables and text; the figures are in the HTML report)."""
    report = gather_report(TeacherCache(root), samples=0)
    throughput = (f"Teacher pass: {result['images']} images in {result['pass_seconds']:.1f} s "
                  f"({result['images_per_second']:.0f} images/s; {result['skipped_shards']} shards reused).")
    return report_markdown(report, f"Teacher cache `{root}`", intro=["", throughput])


@flow(name="cache-teacher", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def cache_teacher(request: CacheRequest) -> dict[str, Any]:
    """Run the teacher once over the dataset and store everything students need (DESIGN.md §2, §4).

    One shard at a time by default: on CPU, torch already uses every core inside a forward. Swap the
    task runner (e.g. a Dask one) to fan shards out over machines.
    """
    plan = plan_task(request)
    if plan.complete:
        return {"cache": plan.root, "num_samples": Manifest.load(plan.root).dataset["num_samples"], "images": 0,
                "pass_seconds": 0.0, "images_per_second": 0.0, "skipped_shards": plan.num_shards,
                "written_shards": 0}
    start = time.perf_counter()
    futures = shard_task.map(unmapped(request), plan.pending)
    new_records = futures.result()
    pass_seconds = time.perf_counter() - start
    records = plan.done + list(new_records)
    parts = shard_stats_task.map(unmapped(plan.root), list(range(plan.num_shards))).result()
    reduce_task(plan.root, parts, request.cka_source)
    manifest = complete_task(plan.root, records)
    images = sum(r.count for r in new_records) * (manifest.views["num_augmented"] + 1)
    result = {"cache": plan.root, "num_samples": manifest.dataset["num_samples"], "images": images,
              "pass_seconds": pass_seconds, "images_per_second": images / pass_seconds if pass_seconds > 0 else 0.0,
              "skipped_shards": len(plan.done), "written_shards": len(new_records)}
    create_table_artifact(key="teacher-cache-arrays", table=summary_rows(plan.root),
                          description=f"Arrays stored in {plan.root}")
    create_markdown_artifact(key="teacher-cache-summary", markdown=summary_markdown(plan.root, result),
                             description="Teacher cache summary")
    return result
