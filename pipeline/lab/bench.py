"""Benchmarks that print ratios measured side by side in one run (machines are shared and noisy).

Nothing here asserts a speed: `distillery bench` prints the numbers, tests only check they are produced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from pipeline.lab.input_bench import InputBench, bench_input_pipeline
from pipeline.lab.storage_bench import CacheScaling, bench_cache_scaling, stream_samples_per_s
from pipeline.data.views import ViewPlan
from pipeline.teacher.plan import (CacheRequest, manifest_at, plan_cache, request_dataset, shared_teacher, teacher_spec,
                                   view_resize)
from pipeline.teacher.forward import cache_shard, render_pairs, teacher_forward
from pipeline.options import resolve_device


def bare_forward_seconds(request: CacheRequest) -> float:
    """A bare teacher forward loop over the same rendered inputs and batch size as the pass (pre-rendered)."""
    dataset = request_dataset(request)
    spec = teacher_spec(request, dataset)
    device = resolve_device(request.device)
    teacher = shared_teacher(spec, str(device))
    plan = ViewPlan(num_augmented=request.views, seed=request.view_seed, 
                    resize=view_resize(request, manifest_at(request.out), dataset))
    pairs = np.array([(p, v) for p in range(len(dataset)) for v in range(plan.num_views)], dtype=np.int64)
    batches = [render_pairs(dataset, plan, pairs[i:i + request.batch_size], spec, device)
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


class TeacherPassBench(BaseModel):
    """`bench_teacher_pass`: the pass's and the bare loop's images/s (`views` counts view 0)."""

    model_config = ConfigDict(frozen=True)

    bench: Literal["teacher_pass"] = "teacher_pass"
    dataset: str
    teacher: str
    samples: int
    views: int
    batch_size: int
    device: str
    repeats: int
    pass_images_per_s: float
    bare_images_per_s: float
    pass_over_bare: float


def bench_teacher_pass(dataset: str, teacher: str, samples: int, views: int = 2, batch_size: int = 256,
                       shard_size: int = 1024, device: str = "auto", repeats: int = 3) -> TeacherPassBench:
    """Teacher-pass throughput vs a bare forward loop, interleaved bare / pass / bare / ... / bare so both
    share the noise; the fastest of `repeats` timings of each counts (the least disturbed, as timeit)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    with tempfile.TemporaryDirectory(prefix="distillery-bench-") as tmp:
        request = CacheRequest(dataset=dataset, teacher=teacher, out=str(Path(tmp) / "cache"), subset=samples,
                               views=views, batch_size=batch_size, shard_size=shard_size, device=device)
        bare = [bare_forward_seconds(request)]
        passes = []
        for _ in range(repeats):
            passes.append(pass_seconds(request))
            bare.append(bare_forward_seconds(request))
    images = samples * (views + 1)
    return TeacherPassBench(dataset=dataset, teacher=teacher, samples=samples, views=views + 1, batch_size=batch_size,
                            device=str(resolve_device(device)), repeats=repeats,
                            pass_images_per_s=images / min(passes), bare_images_per_s=images / min(bare),
                            pass_over_bare=min(bare) / min(passes))


# Student step times (issues 3-6): each configuration trains in a fresh process (so its peak RSS is its own),
# the configurations take turns round by round (so a noisy neighbour hits them all alike).
ONLINE_KD = "ce+kd online"
STEP_CONFIGS: dict[str, tuple[tuple[str, ...], bool]] = {
    "ce": (("ce",), False),
    "ce+kd": (("ce", "kd"), False),
    ONLINE_KD: (("ce", "kd"), True),
    "ce+dkd": (("ce", "dkd"), False),
    "ce+wkd_l": (("ce", "wkd_l"), False),
    "ce+wkd_f": (("ce", "wkd_f:stage=-2"), False),
    "ce+tcs": (("ce", "tcs"), False),
    "ce+tcs+elsh": (("ce", "tcs", "elsh"), False),
    "ce+scalekd": (("ce", "scalekd:stage=-2"), False),
    "ce+scalekd(tpp)": (("ce", "scalekd:stage=-2,tpp=true"), False),
}


def _train_once(config: dict[str, Any]) -> dict[str, Any]:
    # Runs in a spawned process: import here so the parent's state (threads, allocations) is not inherited.
    import timm  # noqa: F401 - imported on first use by the run; resident before it, like torch

    from pipeline.train.config import TrainConfig
    from pipeline.environment import rss_bytes
    from pipeline.train.loop import train_student

    # Python, torch, timm and the project are resident before anything of the run exists: the peak above this
    # is what the run itself holds (models, optimizer, activations, data), the part a GPU would hold.
    start = rss_bytes()
    summary = train_student(TrainConfig(**config))
    return {"start_rss_bytes": start,
            **summary.model_dump(include={"mean_step_seconds", "peak_rss_bytes", "steps", "params"})}


def model_flops(model: str, num_classes: int, in_chans: int, size: int) -> int:
    """Forward FLOPs of one image through a timm model (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.nets.tapped import create_timm_model

    net = create_timm_model(model, num_classes, in_chans, size).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, in_chans, size, size))
    return int(counter.get_total_flops())


class StepRow(BaseModel):
    """One configuration of `bench_student_steps`: its best round's step time and samples/s, the stream's rate
    over its own, its peak RSS and the run's part of it (MiB), and each ratio to a reference configuration
    (None when that configuration was not benchmarked)."""

    model_config = ConfigDict(frozen=True)

    config: str
    step_ms: float
    samples_per_s: float
    stream_over_config: float
    peak_rss_mb: float
    run_rss_mb: float
    over_ce: float | None
    over_kd: float | None
    over_online_kd: float | None
    rss_over_online_kd: float | None
    run_rss_over_online_kd: float | None


class StudentSteps(BaseModel):
    """`bench_student_steps`: one student from one cache, a row per configuration."""

    model_config = ConfigDict(frozen=True)

    bench: Literal["student_steps"] = "student_steps"
    cache: str
    student: str
    teacher: str
    teacher_over_student_flops: float
    rounds: int
    stream_samples_per_s: float
    workers: int
    batch_size: int
    rows: list[StepRow]


def bench_student_steps(cache: str, student: str, configs: dict[str, tuple[tuple[str, ...], bool]],
                        epochs: int = 1, rounds: int = 2, batch_size: int = 64) -> StudentSteps:
    """Mean step time, samples/s consumed and peak RSS of each (methods, online) configuration for the same
    student and cache, beside the samples/s of the cache stream alone (same batch size and workers, no student):
    a configuration consuming close to the stream's rate is waiting for its data."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from pipeline.cache.reader import TeacherCache
    from pipeline.train.config import RunSettings

    results: dict[str, list[dict[str, Any]]] = {label: [] for label in configs}
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="distillery-steps-") as tmp:
        for r in range(rounds):
            for label, (methods, online) in configs.items():
                settings = RunSettings(epochs=epochs, batch_size=batch_size, online_teacher=online, device="cpu",
                                       eval_every=epochs)
                config = {"cache": cache, "student": student, "methods": methods,
                          "out": str(Path(tmp) / f"{len(results[label])}-{r}-{label}"), "settings": settings}
                # Not multiprocessing.Pool: its daemonic workers cannot start the run's DataLoader workers.
                with ProcessPoolExecutor(1, mp_context=context) as pool:
                    results[label].append(pool.submit(_train_once, config).result())
    manifest = TeacherCache(cache).manifest
    teacher, num_classes = manifest.teacher, manifest.dataset.num_classes
    size = teacher.input_size
    workers = RunSettings().workers  # what the runs above used
    stream = max(stream_samples_per_s(cache, size, batch_size, workers) for _ in range(rounds))
    measured = {}
    for label, runs in results.items():
        step = min(run["mean_step_seconds"] for run in runs)  # the least disturbed round
        measured[label] = {"step_ms": 1000 * step, "samples_per_s": batch_size / step,
                           "stream_over_config": stream * step / batch_size,
                           "peak_rss_mb": max(r["peak_rss_bytes"] for r in runs) / 2**20,
                           "run_rss_mb": max(r["peak_rss_bytes"] - r["start_rss_bytes"] for r in runs) / 2**20}

    def over(row: dict[str, float], reference: str, key: str = "step_ms") -> float | None:
        return row[key] / measured[reference][key] if reference in measured else None

    rows = [StepRow(config=label, **row, over_ce=over(row, "ce"), over_kd=over(row, "ce+kd"),
                    over_online_kd=over(row, ONLINE_KD), rss_over_online_kd=over(row, ONLINE_KD, "peak_rss_mb"),
                    run_rss_over_online_kd=over(row, ONLINE_KD, "run_rss_mb")) for label, row in measured.items()]
    return StudentSteps(cache=cache, student=student, teacher=teacher.model,
                        teacher_over_student_flops=model_flops(teacher.model, num_classes, teacher.in_chans, size)
                        / model_flops(student, num_classes, teacher.in_chans, size),
                        rounds=rounds, stream_samples_per_s=stream, workers=workers, batch_size=batch_size, rows=rows)


# TCS against online KD (TCS's claim: about half the training time and 75 % of the memory, the teacher never
# running during training) for teachers far costlier than the student at 32 px: resnet50 (25.6 M parameters),
# and wide_resnet101_2 (126.9 M), the size of the large teachers TCS and ScaleKD distill from, whose weights
# outweigh the memory every process holds before it builds anything.
TCS_TEACHERS = ("resnet50", "wide_resnet101_2")
TCS_CONFIGS = {k: STEP_CONFIGS[k] for k in ("ce", ONLINE_KD, "ce+tcs", "ce+tcs+elsh")}


def bench_tcs_vs_online_kd(tmp: str, teacher: str, quick: bool = False, device: str = "auto") -> StudentSteps:
    """Student step time and peak RSS of CE, online KD, TCS and TCS+eLSH from a `teacher` cache on digits."""
    from pipeline.teacher.cache_pass import run_cache_pass
    from pipeline.train.fit import FitConfig, fit_teacher

    checkpoint = str(Path(tmp) / f"tcs-teacher-{teacher}.pt")
    # Step times do not depend on how well the teacher is trained: a short fit on a subset is enough.
    fit_teacher(FitConfig(dataset="digits", model=teacher, out=checkpoint, epochs=1, subset=256, device=device))
    cache = str(Path(tmp) / f"tcs-cache-{teacher}")
    run_cache_pass(CacheRequest(dataset="digits", teacher=teacher, checkpoint=checkpoint, out=cache,
                                subset=256 if quick else None, views=2, lsh_bits=64, device=device))
    return bench_student_steps(cache, "test_resnet", TCS_CONFIGS, epochs=1 if quick else 2, rounds=1 if quick else 2)


# (processes, torch threads per process) of `bench_ddp`: the machine's cores shared by 1 or 2 processes, and
# 1 process on 1 thread, the per-core reference that tells DDP's gain from the threads' (in)efficiency.
DDP_CONFIGS = ((1, None), (2, None), (1, 1))


class DdpRow(BaseModel):
    """One (processes, threads each) configuration of `bench_ddp`: its best samples/s, and that over the first's."""

    model_config = ConfigDict(frozen=True)

    processes: int
    threads: int
    samples_per_s: float
    over_one: float


class DdpBench(BaseModel):
    """`bench_ddp`: one student trained by each configuration of `DDP_CONFIGS`."""

    model_config = ConfigDict(frozen=True)

    bench: Literal["ddp"] = "ddp"
    student: str
    num_samples: int
    epochs: int
    batch_size_per_process: int
    rounds: int
    cpus: int
    rows: list[DdpRow]


def bench_ddp(tmp: str, quick: bool = False, student: str = "test_resnet", batch_size: int = 64) -> DdpBench:
    """Training samples/s of one student (CE+KD) on 2 DDP processes vs 1, all under torchrun on CPU, from a
    digits cache of an untrained resnet10t (README "Distributed students"). Threads per process: the CPUs
    this process may use divided by the processes, or as `DDP_CONFIGS` says. `batch_size` is per process,
    as DDP scales: 2 processes take half the steps of twice the samples. Throughput is samples trained
    over train_seconds (evaluation excluded); configurations alternate, the best of the rounds counts."""
    from pipeline.teacher.cache_pass import run_cache_pass
    from pipeline.train.config import RunSettings, TrainConfig
    from pipeline.train.launch import launch

    cache = str(Path(tmp) / "ddp-cache")
    # Quick: blocks of 64 samples, so that 256 samples still give each process blocks of its own.
    run_cache_pass(CacheRequest(dataset="digits", teacher="resnet10t", out=cache, subset=256 if quick else None,
                                views=2, block_size=64 if quick else 256, device="cpu"))
    epochs, rounds = (1, 1) if quick else (2, 2)
    cpus = len(os.sched_getaffinity(0))
    configs = list(dict.fromkeys((nproc, threads or max(1, cpus // nproc)) for nproc, threads in DDP_CONFIGS))
    rates: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    for r in range(rounds):
        for nproc, threads in configs:
            settings = RunSettings(epochs=epochs, batch_size=batch_size, device="cpu", eval_every=epochs)
            out = str(Path(tmp) / f"ddp-{nproc}x{threads}-{r}")
            config = TrainConfig(cache=cache, student=student, methods=("ce", "kd"), out=out, settings=settings)
            summary = launch(config, nproc, True, threads)
            rates[(nproc, threads)].append(summary.num_samples * epochs / summary.train_seconds)
    best = {c: max(v) for c, v in rates.items()}
    return DdpBench(student=student, num_samples=summary.num_samples, epochs=epochs, batch_size_per_process=batch_size,
                    rounds=rounds, cpus=cpus,
                    rows=[DdpRow(processes=n, threads=t, samples_per_s=best[(n, t)],
                                 over_one=best[(n, t)] / best[configs[0]]) for n, t in best])


# Teacher-pass rows of `distillery bench`: the demo teacher, and one whose forward costs 4x more per image
# and whose outputs are 4x wider (2048-d pooled features, 1024-channel Gaussians), so writing costs more too.
PASS_TEACHERS = ("resnet10t", "resnet50")


class BenchResults(BaseModel):
    """`run_benchmarks`: every benchmark of `distillery bench` (its `--json` file is `model_dump(mode="json")`)."""

    model_config = ConfigDict(frozen=True)

    teacher_pass: list[TeacherPassBench]
    student_steps: StudentSteps
    tcs_vs_online_kd: list[StudentSteps]  # one per teacher of `TCS_TEACHERS`
    ddp: DdpBench
    storage: CacheScaling
    inputs: InputBench


def run_benchmarks(quick: bool = False, device: str = "auto") -> BenchResults:
    """`distillery bench`: the teacher pass against a bare forward loop (per teacher in `PASS_TEACHERS`),
    then student step times and peak memory per method (cached vs online KD included) for a test_resnet
    student of a resnet10t teacher on digits, then TCS against online KD for each `TCS_TEACHERS` teacher, then
    DDP on 2 CPU processes against 1 (`bench_ddp`), then the storage rows (`bench_cache_scaling`), then the
    input pipeline (`bench_input_pipeline`).
    `quick`: the first teacher of each list only, fewer samples, one round."""
    from pipeline.teacher.cache_pass import run_cache_pass
    from pipeline.train.fit import FitConfig, fit_teacher

    teachers = PASS_TEACHERS[:1] if quick else PASS_TEACHERS
    passes = [bench_teacher_pass("digits", teacher, samples=300 if quick else 1437, device=device,
                                 repeats=1 if quick else 3) for teacher in teachers]
    with tempfile.TemporaryDirectory(prefix="distillery-bench-") as tmp:
        checkpoint = str(Path(tmp) / "teacher.pt")
        # Step times do not depend on how well the teacher is trained; online KD needs a checkpoint.
        fit_teacher(FitConfig(dataset="digits", model="resnet10t", out=checkpoint, epochs=1,
                              subset=256 if quick else None, device=device))
        cache = str(Path(tmp) / "cache")
        run_cache_pass(CacheRequest(dataset="digits", teacher="resnet10t", checkpoint=checkpoint, out=cache,
                                    subset=256 if quick else None, views=2, featmaps=True, teacher_tail=1,
                                    lsh_bits=64, device=device))
        steps = bench_student_steps(cache, "test_resnet", STEP_CONFIGS, epochs=1 if quick else 2,
                                    rounds=1 if quick else 2)
        tcs = [bench_tcs_vs_online_kd(tmp, teacher, quick, device)
               for teacher in (TCS_TEACHERS[:1] if quick else TCS_TEACHERS)]
        ddp = bench_ddp(tmp, quick)
    storage = bench_cache_scaling(samples=250 if quick else 2000, device=device)
    inputs = bench_input_pipeline(quick=quick, device=device)
    return BenchResults(teacher_pass=passes, student_steps=steps, tcs_vs_online_kd=tcs, ddp=ddp, storage=storage,
                        inputs=inputs)
