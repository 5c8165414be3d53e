"""The teacher pass in one process, without Prefect (docs/ARCHITECTURE.md#data-flow): the same steps as the
`cache-teacher` flow (`flows.cache_teacher`), which wraps each as a task. Both run them inside `teacher_pass`,
which holds the cache's writer lock from the plan to the end.

    plan_cache(request)            -> CachePlan       pipeline.teacher.plan
    cache_shard(request, index)    -> ShardRecord     pipeline.teacher.forward
    shard_statistics(root, index)  -> ShardStats      pipeline.cache.statistics
    reduce_statistics(root, parts) -> StatsSection    pipeline.cache.statistics
    complete_cache(root, records)  -> Manifest        pipeline.teacher.plan
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pydantic import BaseModel, ConfigDict, computed_field

from pipeline.cache.lock import cache_lock
from pipeline.cache.manifest import Manifest, ShardRecord
from pipeline.cache.statistics import reduce_statistics, shard_statistics
from pipeline.stop import polled, raise_if_stopped
from pipeline.teacher.forward import cache_shard
from pipeline.teacher.plan import CachePlan, CacheRequest, complete_cache, plan_cache


class CacheResult(BaseModel):
    """What a teacher pass did (the `cache-teacher` flow's result): the cache, its samples, and the pass's
    throughput over the shards it wrote (shards reused from an earlier run are counted, not timed)."""

    model_config = ConfigDict(frozen=True)

    cache: str
    num_samples: int
    images: int  # sample-views rendered and run through the teacher by this pass
    pass_seconds: float
    skipped_shards: int
    written_shards: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def images_per_second(self) -> float:
        return self.images / self.pass_seconds if self.pass_seconds > 0 else 0.0


@contextmanager
def teacher_pass(request: CacheRequest,
                 plan: Callable[[CacheRequest], CachePlan] = plan_cache) -> Iterator[CachePlan]:
    """A teacher pass into `request.out`: its plan, made and used under the cache's writer lock.

    The pass takes the lock itself, whoever runs it (`run_cache_pass`, the `cache-teacher` flow from the
    command line or served by a deployment), before the plan creates or resumes the cache, and holds it
    until the block ends: a second writer of the same cache gets one line. `plan` is the planning step as
    the caller runs it (the flow's is a task).
    """
    with cache_lock(request.out):
        yield plan(request)


def run_cache_pass(request: CacheRequest) -> CacheResult:
    """The whole teacher pass in this process, without Prefect (same steps as `flows.cache_teacher`); what it
    did."""
    with teacher_pass(request) as plan:
        if plan.complete:
            return reused_result(plan)
        start = time.perf_counter()
        # A signal (Ctrl-C, SIGTERM: flows/signals.py) stops the pass before its next batch: the shards written
        # stay, the one in progress writes nothing, the manifest stays partial, so the same command resumes.
        with polled():
            new_records = [cache_shard(request, i) for i in plan.pending]
            raise_if_stopped()
        pass_seconds = time.perf_counter() - start
        parts = [shard_statistics(plan.root, i) for i in range(plan.num_shards)]
        reduce_statistics(plan.root, parts, request.cka_source)
        manifest = complete_cache(plan.root, plan.done + new_records)
    return pass_result(plan, manifest, new_records, pass_seconds)


def reused_result(plan: CachePlan) -> CacheResult:
    """The result of a pass that found its cache complete with the requested identity: nothing written."""
    return CacheResult(cache=plan.root, num_samples=Manifest.load(plan.root).dataset.num_samples, images=0,
                       pass_seconds=0.0, skipped_shards=plan.num_shards, written_shards=0)


def pass_result(plan: CachePlan, manifest: Manifest, new_records: list[ShardRecord],
                pass_seconds: float) -> CacheResult:
    """The result of a pass that wrote `new_records` in `pass_seconds` and completed `manifest`."""
    images = sum(r.count for r in new_records) * (manifest.views.num_augmented + 1)
    return CacheResult(cache=plan.root, num_samples=manifest.dataset.num_samples, images=images,
                       pass_seconds=pass_seconds, skipped_shards=len(plan.done), written_shards=len(new_records))
