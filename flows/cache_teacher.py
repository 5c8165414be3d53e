"""Prefect flow `cache-teacher`: plan -> map a task over shards -> per-shard statistics -> reduce -> complete.

A thin wrapper over the teacher pass's steps (`pipeline.teacher.cache_pass` lists them); every task is one library
function, and the pass holds the cache's writer lock throughout (`teacher_pass`), whether the command line runs
it or a deployment serves it. A shard already finished in the store is skipped (its files are verified first),
so a killed run resumes. Shards are independent (each writes only its own zarr chunks and files), so the task
runner decides where they run: one thread by default, a Dask cluster (`task_runner("dask")`) fans them out over
processes or machines.
Results are not persisted (`persist_result=False`): the store on disk is the result.

When this run completes a cache it emits the event `distillery.cache.completed` (resource: the cache's
identity fingerprint, path, dataset and teacher), which a deployment trigger can turn into a student sweep
(README, "Prefect in production").
"""

import os
import socket
import time
from typing import Any, Optional

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.events import emit_event
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import PositiveFloat

from flows.runtime import (EVENT_TIMEOUT_S, PUBLISH_TIMEOUT_S, artifact_key, fixed_bound, forward_library_logs,
                           run_path, timeout_named, transient_io)
from pipeline.cache import statistics
from pipeline.cache.manifest import Manifest, ShardRecord, StatsSection
from pipeline.cache.statistics import ShardStats
from pipeline.cache.reader import TeacherCache
from pipeline.cache.summary import array_rows, human_bytes, teacher_accuracy_per_view
from pipeline.object_store import is_url
from pipeline.report.content import gather_report
from pipeline.report.html import write_cache_report
from pipeline.report.markdown import escape, markdown_table, report_markdown
from pipeline.teacher import forward, plan
from pipeline.teacher.cache_pass import CacheResult, pass_result, reused_result, teacher_pass
from pipeline.teacher.plan import CachePlan, CacheRequest
from pipeline.teacher.model import TeacherError

forward_library_logs()

CACHE_COMPLETED = "distillery.cache.completed"
IO_RETRIES = dict(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=transient_io)


@task(name="plan-cache", persist_result=False, **IO_RETRIES)
def plan_task(request: CacheRequest) -> CachePlan:
    return plan.plan_cache(request)


@task(name="cache-shard", persist_result=False, task_run_name="cache-shard-{index}", tags=["accelerator"],
      **IO_RETRIES)
def shard_task(request: CacheRequest, index: int) -> ShardRecord:
    return forward.cache_shard(request, index)


@task(name="shard-statistics", persist_result=False, task_run_name="shard-statistics-{index}", **IO_RETRIES)
def shard_stats_task(root: str, index: int) -> ShardStats:
    return statistics.shard_statistics(root, index)


@task(name="reduce-statistics", persist_result=False, **IO_RETRIES)
def reduce_task(root: str, parts: list[ShardStats], cka_source: str) -> StatsSection:
    return statistics.reduce_statistics(root, parts, cka_source)


@task(name="complete-cache", persist_result=False, **IO_RETRIES)
def complete_task(root: str, records: list[ShardRecord]) -> Manifest:
    return plan.complete_cache(root, records)


def task_runner(spec: str = "thread", workers: int = 2) -> TaskRunner:
    """`thread`: one shard at a time in this process (on CPU torch already uses every core inside a
    forward); `dask`: a local Dask cluster of `workers` processes; `tcp://HOST:PORT`: a running
    `dask.distributed` scheduler (prefect-dask)."""
    if spec == "thread":
        return ThreadPoolTaskRunner(max_workers=1)
    if spec != "dask" and not spec.startswith(("tcp://", "tls://")):
        raise TeacherError(f"--task-runner must be thread, dask or a scheduler address tcp://HOST:PORT, not '{spec}'")
    if workers < 1:
        raise TeacherError(f"--dask-workers must be >= 1, not {workers}")
    from prefect_dask import DaskTaskRunner

    if spec == "dask":
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    return DaskTaskRunner(address=spec)


def summary_rows(cache: TeacherCache) -> list[dict[str, Any]]:
    return [{"array": r.name, "shape": "x".join(map(str, r.shape)), "dtype": r.dtype,
             "stored": human_bytes(r.stored_bytes), "bytes/sample": round(r.bytes_per_sample, 1)}
            for r in array_rows(cache)]


def summary_markdown(cache: TeacherCache, result: CacheResult) -> str:
    """The cache report's sections as markdown (tables and text; the figures are in the HTML report)."""
    report = gather_report(cache, samples=0)
    throughput = (f"Teacher pass: {result.images} images in {result.pass_seconds:.1f} s "
                  f"({result.images_per_second:.0f} images/s; {result.skipped_shards} shards reused).")
    return report_markdown(report, f"Teacher cache `{result.cache}`", intro=["", throughput])


def cache_artifact_key(kind: str, cache: TeacherCache) -> str:
    """`teacher-cache-<kind>-<dataset>-<teacher>-<fingerprint[:12]>`: one history per cache identity."""
    m = cache.manifest
    return artifact_key("teacher-cache", kind, m.dataset.name, m.teacher.model, m.fingerprint()[:12])


@task(name="publish-cache-artifacts", persist_result=False, timeout_seconds=PUBLISH_TIMEOUT_S)
def publish_task(cache: TeacherCache, result: CacheResult) -> Any:
    """The arrays table, the summary and the HTML report's key figures and path, keyed by the cache's identity; returns
    the report's path."""
    create_table_artifact(key=cache_artifact_key("arrays", cache), table=summary_rows(cache),
                          description=f"Arrays stored in {result.cache}")
    create_markdown_artifact(key=cache_artifact_key("summary", cache), markdown=summary_markdown(cache, result),
                             description=f"Teacher cache summary of {result.cache}")
    return publish_report(cache, result)


def publish_report(cache: TeacherCache, result: CacheResult) -> Any:
    """Write `distillery inspect --report`'s HTML page to `<cache>/report.html` and publish, where the UI shows
    it, its key figures and where it lies: a file:// link means nothing off the machine that ran the flow."""
    path = write_cache_report(cache)
    create_markdown_artifact(key=cache_artifact_key("report", cache), markdown=report_pointer(cache, result, path),
                             description=f"Teacher cache report of {cache.root}")
    return path


def report_pointer(cache: TeacherCache, result: CacheResult, path: Any) -> str:
    """The report artifact: the cache's key figures, then the HTML report's path and host."""
    m = cache.manifest
    accuracy = teacher_accuracy_per_view(cache)
    figures = {"teacher": m.teacher.model, "dataset": f"{m.dataset.name} ({m.dataset.split})",
               "samples": f"{cache.num_samples:,}", "classes": cache.num_classes, "views": cache.num_views,
               "teacher accuracy (view 0)": f"{accuracy[0]['accuracy']:.2%}" if accuracy else "- (no logits)",
               "teacher pass": f"{result.images:,} images in {result.pass_seconds:.1f} s",
               "fingerprint": m.fingerprint()[:12]}
    lines = [f"# Teacher cache {escape(result.cache)}", "", markdown_table(["figure", "value"], list(figures.items())),
             "", f"HTML report (figures included): {escape(path)} on host {escape(socket.gethostname())}; "
                 f"write one wherever the cache is readable with: distillery inspect {escape(result.cache)} --report "
                 f"FILE"]
    return "\n".join(lines) + "\n"


def cache_address(root: str) -> str:
    """Where the cache lives, for events and logs: its URL, or its local directory made absolute."""
    return root if is_url(root) else os.path.abspath(root)


@task(name="emit-cache-completed", persist_result=False, timeout_seconds=EVENT_TIMEOUT_S)
def emit_cache_completed(cache: TeacherCache, result: CacheResult) -> None:
    """The event a deployment trigger starts a student sweep on (resource labels are strings)."""
    m, address = cache.manifest, cache_address(result.cache)
    fingerprint = m.fingerprint()
    emit_event(event=CACHE_COMPLETED,
               resource={"prefect.resource.id": f"distillery.cache.{fingerprint}",
                         "prefect.resource.name": address,
                         "distillery.cache.path": address,
                         "distillery.cache.fingerprint": fingerprint,
                         "distillery.dataset": str(m.dataset.name),
                         "distillery.teacher": str(m.teacher.model)},
               payload=result.model_dump(include={"num_samples", "images", "pass_seconds"}))


@flow(name="cache-teacher", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def cache_teacher(request: CacheRequest, task_timeout: Optional[PositiveFloat] = None) -> CacheResult:
    """Run the teacher once over the dataset and store everything students need (README, "The teacher cache").

    Args:
        request: what to cache; `out` may hold {date}, {time}, {flow_run_name} or {flow_run_id} (filled per
            flow run)
        task_timeout: fail a shard task that runs longer than this many seconds (default: no bound)
    """
    logger = get_run_logger()
    request = request.model_copy(update={"out": run_path(request.out)})
    with teacher_pass(request, plan=plan_task) as plan:  # the writer lock, served or not
        if plan.complete:
            logger.info("cache %s is already complete with this identity; nothing to do", plan.root)
            return reused_result(plan)
        logger.info("teacher pass into %s: %d shards to write, %d reused", plan.root, len(plan.pending),
                    len(plan.done))
        start = time.perf_counter()
        futures = shard_task.with_options(timeout_seconds=task_timeout).map(unmapped(request), plan.pending)
        progress = create_progress_artifact(100 * len(plan.done) / plan.num_shards,
                                            description=f"Teacher pass into {plan.root}: shards done")
        for done, _ in enumerate(as_completed(futures), start=len(plan.done) + 1):
            update_progress_artifact(progress, 100 * done / plan.num_shards)
        new_records = []
        for index, future in zip(plan.pending, futures):
            with timeout_named(f"cache-shard-{index}"):
                new_records.append(future.result())
        pass_seconds = time.perf_counter() - start
        records = plan.done + list(new_records)
        parts = shard_stats_task.map(unmapped(plan.root), list(range(plan.num_shards))).result()
        reduce_task(plan.root, parts, request.cka_source)
        manifest = complete_task(plan.root, records)
        result = pass_result(plan, manifest, list(new_records), pass_seconds)
        logger.info("teacher pass: %d images in %.1f s (%.0f images/s); cache complete at %s", result.images,
                    pass_seconds, result.images_per_second, cache_address(plan.root))
        cache = TeacherCache(plan.root)  # opened once: the report, the artifacts and the event read it
        with timeout_named("publish-cache-artifacts", fixed_bound(PUBLISH_TIMEOUT_S)):
            logger.info("HTML report written to %s", publish_task(cache, result))
    with timeout_named("emit-cache-completed", fixed_bound(EVENT_TIMEOUT_S)):
        emit_cache_completed(cache, result)
    return result


def run_cache_teacher(request: CacheRequest, runner: str = "thread", workers: int = 2) -> CacheResult:
    """`cache_teacher(request)` on the task runner named by `runner` (see `task_runner`)."""
    return cache_teacher.with_options(task_runner=task_runner(runner, workers))(request)
