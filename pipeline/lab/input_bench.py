"""The input-pipeline rows of `distillery bench` (`--only inputs`; README "Large datasets", issue 28), on a
synthetic ImageNet-like folder (`pipeline.lab.image_folder`), all measured side by side in one run:

- per `--inputs` mode (`INPUT_MODES`): the cache's input bytes over the source JPEGs' bytes, and the student
  stream's samples/s at 224 px per core (one thread, no workers; also per CPU-second, which other sessions'
  load does not lower) and with a worker per core, on CPU and, when present, rendered on CUDA; beside it the
  stages alone (decoding a JPEG, rendering a view);
- what resnet18 and resnet50 consume per training step on the same machine (samples/s), so "cores to feed"
  is how many cores of stream each needs;
- the teacher pass + statistics at N, 2N and 4N images, each in a fresh process (time should grow linearly,
  peak RSS stay flat), and `train`'s time to its first step from each of those caches (should not grow with
  N); the same for 12 MP photos.
"""

from __future__ import annotations

import functools
import glob
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from pipeline.lab.image_folder import FolderSpec, folder_bytes, write_image_folder
from pipeline.lab import storage_bench
from pipeline.lab.storage_bench import ScalingRow, cache_once, stream_samples_per_s
from pipeline.options import resolve_device

# `--inputs` modes measured, each as the CacheRequest fields that select it (docs/cache-format.md#inputs).
# The first is what `bench_scaling` caches at N, 2N, 4N: an image folder's default (`--inputs auto`).
INPUT_MODES: dict[str, dict[str, Any]] = {"encoded": {"inputs": "encoded"}, "raw": {"inputs": "raw"},
                                          "encoded, max-side 256": {"inputs": "encoded", "max_side": 256},
                                          "source": {"inputs": "source"}}
MODELS = ("resnet18", "resnet50")
SIZE = 224
CLASSES = 10
TEACHER = "test_resnet"  # the pass's teacher: the rows measure the inputs, not a teacher's forward
STUDENT = "test_resnet"


class StreamRow(BaseModel):
    """The student stream over one mode's cache: samples/s in all, per core it used, and (without workers) per
    CPU-second this process spent, which other load on a shared machine does not lower (a worker's CPU is
    another process's: None with workers)."""

    model_config = ConfigDict(frozen=True)

    mode: str
    device: str
    workers: int
    cores: int
    samples_per_s: float
    per_core: float
    per_cpu_second: float | None = None


class StageRow(BaseModel):
    """One stage alone on one thread: samples/s."""

    model_config = ConfigDict(frozen=True)

    stage: str
    per_core: float


class ModelRow(BaseModel):
    """A model's training step (forward, backward, SGD) on random 224 px inputs: samples/s it consumes, and
    the cores of the first mode's stream (per core, CPU) it takes to feed it."""

    model_config = ConfigDict(frozen=True)

    model: str
    device: str
    batch_size: int
    samples_per_s: float
    cores_to_feed: float


class ModeBytes(BaseModel):
    """A mode's cache inputs (its shards) over the source JPEGs."""

    model_config = ConfigDict(frozen=True)

    mode: str
    cache_bytes: int
    source_bytes: int
    over_source: float


class FirstStepRow(ScalingRow):
    """The pass + statistics at one size, and `train`'s time to its first step from that cache (and over the
    first size's)."""

    first_step_seconds: float
    first_step_over_first: float


class Scaling(BaseModel):
    """The pass + statistics and `train`'s first step at N, 2N, 4N images of one kind (folder or photos)."""

    model_config = ConfigDict(frozen=True)

    images: str
    rows: list[FirstStepRow]


class InputBench(BaseModel):
    """`bench_input_pipeline`: every row of the input-pipeline bench, on `cpus` CPUs, the streams over caches of
    `images` images."""

    model_config = ConfigDict(frozen=True)

    images: int
    cpus: int
    bench: Literal["input_pipeline"] = "input_pipeline"
    bytes: list[ModeBytes]
    stages: list[StageRow]
    streams: list[StreamRow]
    models: list[ModelRow]
    scaling: list[Scaling]


def linked_subset(source: Path, out: Path, train: int, val: int) -> Path:
    """OUT with the first `train` train and `val` val images of a `write_image_folder` folder (by index),
    hard-linked: the same bytes, and one folder per size without writing the images again."""
    for path in sorted(source.rglob("*.jpg")):
        split, index = path.stem.split("-")
        if int(index) < (train if split == "train" else val):
            target = out / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    return out


def _first_step_once(fields: dict[str, Any]) -> float:
    # Runs in a spawned process, as `distillery train` would start.
    from pipeline.train.config import RunSettings, TrainConfig
    from pipeline.train.loop import train_student

    settings = RunSettings(epochs=1, batch_size=16, device=fields["device"], workers=1)
    summary = train_student(TrainConfig(cache=fields["cache"], student=STUDENT, methods=("ce", "kd"),
                                        out=fields["out"], settings=settings))
    return float(summary.first_step_seconds)


def _in_fresh_process(function: Any, fields: dict[str, Any]) -> Any:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, fields).result()


def cache_fields(folder: Path, out: str, shard_size: int, device: str, mode: dict[str, Any]) -> dict[str, Any]:
    """The CacheRequest of every bench cache: one augmented view, shards of `shard_size` images (fixed, so a
    pass holds the same per shard at every N; small enough that each core's worker streams shards of its own)."""
    return dict(dataset=f"imagefolder:{folder}", teacher=TEACHER, out=out, views=1, shard_size=shard_size,
                device=device, **mode)


def bench_scaling(tmp: Path, source: Path, spec: FolderSpec, n: int, shard_size: int,
                  device: str) -> tuple[Scaling, list[str]]:
    """Pass + statistics (`cache_once`) and `train`'s first step at n x `SCALES` images of `source` (the
    first mode); returns the rows and the caches."""
    runs, firsts, caches = [], [], []
    images = "photos" if spec.photos else "jpegs"
    for scale in storage_bench.SCALES:  # the storage rows' sizes
        count = n * scale
        folder = linked_subset(source, tmp / f"{images}-{count}", count, max(spec.classes, count // 4))
        cache = str(tmp / f"{images}-{count}-cache")
        fields = cache_fields(folder, cache, shard_size, device, next(iter(INPUT_MODES.values())))
        runs.append({"samples": count, **_in_fresh_process(cache_once, fields)})
        firsts.append(_in_fresh_process(_first_step_once, {"cache": cache, "device": device,
                                                           "out": str(tmp / f"{images}-{count}-run")}))
        caches.append(cache)
    first = runs[0]
    rows = [FirstStepRow(**run, time_over_first=run["seconds"] / first["seconds"],
                         samples_over_first=run["samples"] / first["samples"],
                         rss_over_first=run["peak_rss_bytes"] / first["peak_rss_bytes"],
                         first_step_seconds=step, first_step_over_first=step / firsts[0])
            for run, step in zip(runs, firsts)]
    return Scaling(images="12 MP photos" if spec.photos else "~400x350 px JPEGs", rows=rows), caches


def cache_input_bytes(root: str) -> int:
    """Bytes of a cache's shards: its inputs and their containers."""
    from pipeline.cache.reader import TeacherCache

    return sum(r.bytes for r in TeacherCache(root).manifest.records())


def stage_rates(folder: Path, count: int) -> list[StageRow]:
    """Decoding the folder's JPEGs (PIL, to RGB uint8) and rendering a random-resized-crop view of each at
    224 px (`render_views`, batches of 64) with each resize arithmetic (`RESIZES`; the bench's caches are
    new, so their streams resize in uint8), one thread each: samples/s."""
    from PIL import Image

    from pipeline.data.views import RESIZES, ViewPlan, render_views

    paths = sorted(glob.glob(str(folder / "train" / "*" / "*.jpg")))[:count]
    start = time.perf_counter()
    raws = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    decode = len(paths) / (time.perf_counter() - start)
    rows = [StageRow(stage="decode JPEG (PIL)", per_core=decode)]
    for resize in RESIZES:
        plan = ViewPlan(num_augmented=1, resize=resize)
        views = [plan.params(i, 1) for i in range(len(raws))]
        start = time.perf_counter()
        for i in range(0, len(raws), 64):
            render_views(raws[i:i + 64], views[i:i + 64], SIZE, (0.5,) * 3, (0.25,) * 3)
        rows.append(StageRow(stage=f"render view 224 px, {resize} resize",
                             per_core=len(raws) / (time.perf_counter() - start)))
    return rows


def stream_rates(cache: str, workers: int, device: str) -> tuple[float, float | None]:
    """One epoch of the student stream at `SIZE` px over `cache`: samples per second and, without workers,
    per CPU-second of this process."""
    from pipeline.cache.reader import TeacherCache

    cpu = time.process_time()
    rate = stream_samples_per_s(cache, SIZE, 64, workers, device)
    cpu = time.process_time() - cpu
    return rate, (TeacherCache(cache).num_samples / cpu if workers == 0 else None)


def model_samples_per_s(model: str, device: torch.device, batch_size: int, steps: int) -> float:
    """Training steps of `model` (1000 classes) on random `SIZE` px inputs: samples/s (bf16 autocast on CUDA)."""
    from pipeline.nets.tapped import create_timm_model

    net = create_timm_model(model, 1000, 3, SIZE).to(device).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, SIZE, SIZE, device=device)
    y = torch.randint(0, 1000, (batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocator, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def one_thread_rate(function: Any, *args: Any) -> float:
    """`function(*args)` on one torch thread (one core): its samples/s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function(*args)
    finally:
        torch.set_num_threads(threads)


def bench_input_pipeline(quick: bool = False, device: str = "auto", n: int | None = None,
                         photos: int | None = None) -> InputBench:
    """Every row of the module doc. Folder: n, 2n, 4n train images (n = 500, quick 32) of ~400x350 px in
    `CLASSES` classes; photos: `photos`, 2x, 4x 12 MP images (8, quick 2; 0: no photo rows). The stream rows
    use the 4n-image caches."""
    n = n if n is not None else (32 if quick else 500)
    photos = photos if photos is not None else (2 if quick else 8)
    if n < CLASSES or photos == 1 or photos < 0:
        raise ValueError(f"need n >= {CLASSES} (an image per class) and photos 0 or >= 2, got n={n}, photos={photos}")
    cpus = len(os.sched_getaffinity(0))
    target = resolve_device(device)
    rounds = 2 if quick else 3  # the first epoch with workers also starts the fork server (once per process)
    with tempfile.TemporaryDirectory(prefix="distillery-inputs-") as name:
        tmp = Path(name)
        largest = n * storage_bench.SCALES[-1]
        spec = FolderSpec(largest, max(CLASSES, largest // 4), classes=CLASSES)
        source = write_image_folder(tmp / "source", spec)
        shard_size = max(2, largest // (4 * cpus))
        scaling, caches = bench_scaling(tmp, source, spec, n, shard_size, str(target))
        scalings = [scaling]
        if photos:
            photo_spec = FolderSpec(photos * storage_bench.SCALES[-1], 2, classes=2, photos=True)
            photo_source = write_image_folder(tmp / "photo-source", photo_spec)
            scalings.append(bench_scaling(tmp, photo_source, photo_spec, photos,
                                          max(1, photo_spec.train // (4 * cpus)), str(target))[0])
        folder = tmp / f"jpegs-{largest}"
        mode_caches = {next(iter(INPUT_MODES)): caches[-1]}
        for mode, fields in list(INPUT_MODES.items())[1:]:
            mode_caches[mode] = str(tmp / f"cache-{mode}")
            _in_fresh_process(cache_once, cache_fields(folder, mode_caches[mode], shard_size, str(target), fields))
        source_bytes = folder_bytes(folder)
        sizes = [ModeBytes(mode=mode, cache_bytes=cache_input_bytes(c), source_bytes=source_bytes,
                           over_source=cache_input_bytes(c) / source_bytes) for mode, c in mode_caches.items()]
        stages = one_thread_rate(stage_rates, folder, min(largest, 256))
        streams = []
        for mode, cache in mode_caches.items():
            configs = [("cpu", 0, 1), ("cpu", cpus, cpus)] + ([("cuda", cpus, cpus)] if target.type == "cuda" else [])
            for kind, workers, cores in configs:
                rate = functools.partial(stream_rates, cache, workers, kind)
                runs = [(one_thread_rate(rate) if workers == 0 else rate()) for _ in range(rounds)]
                best = max(wall for wall, _ in runs)
                streams.append(StreamRow(mode=mode, device=kind, workers=workers, cores=cores, samples_per_s=best,
                                         per_core=best / cores,
                                         per_cpu_second=None if workers else max(cpu for _, cpu in runs)))
    # A model on a device is fed by the first mode's stream rendering there, at its rate per core (on CPU the
    # one-thread row, per CPU-second: reversed, so the first row of a device is the one kept).
    per_core = {row.device: row.per_cpu_second or row.per_core for row in reversed(streams)
                if row.mode == streams[0].mode}
    models = []
    for model in MODELS:
        for dev in [torch.device("cpu")] + ([target] if target.type == "cuda" else []):
            batch = 64 if dev.type == "cuda" else (8 if quick else 16)
            steps = (2 if quick else 5) * (10 if dev.type == "cuda" else 1)
            rate = model_samples_per_s(model, dev, batch, steps)
            models.append(ModelRow(model=model, device=str(dev), batch_size=batch, samples_per_s=rate,
                                   cores_to_feed=rate / per_core[dev.type]))
    return InputBench(images=largest, cpus=cpus, bytes=sizes, stages=stages, streams=streams, models=models,
                      scaling=scalings)
