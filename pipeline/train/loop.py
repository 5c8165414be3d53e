"""Train one student from a teacher cache: `train_student(config) -> summary` (docs/ARCHITECTURE.md#data-flow, docs/methods.md#compose, docs/ARCHITECTURE.md#command-line-contract).

The whole loop is in `train_student`, top to bottom: open and check the cache, build the student and
its methods, stream the cache (or, with `--online-teacher`, run the teacher on the same views), step,
evaluate on the val split (labels only), checkpoint every epoch. The teacher is never loaded unless
the run asks for the online twin.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from pipeline.cache.layout import block_sizes
from pipeline.cache.manifest import CacheError
from pipeline.cache.reader import TeacherCache
from pipeline.data.datasets import ImageDataset, load_dataset
from pipeline.environment import describe_environment, peak_rss_bytes
from pipeline.object_store import check_output_location
from pipeline.methods import CacheInfo, MethodSpec, StudentInfo, TrainingProgress
from pipeline.progress import progress_task
from pipeline.stop import raise_if_stopped
from pipeline.options import resolve_device
from pipeline.train.config import StudentSpec, TrainConfig, TrainError
from pipeline.train.ddp import DistillStep, IdLog, World, check_world, equalised, process_group, step_totals, wrap
from pipeline.train.evaluate import evaluate_accuracy
from pipeline.train.online import OnlineTeacher
from pipeline.train.optim import build_optimizer, cosine_schedule
from pipeline.train.rundir import RunDir
from pipeline.train.stream import CacheStream, epoch_seed
from pipeline.train.student import Student
from pipeline.train.summary import TrainSummary

# Per-epoch lines; a Prefect flow forwards the `distillery` logger to its run's logs (flows.runtime).
log = logging.getLogger("distillery.train")


def open_cache(root: str) -> TeacherCache:
    """A complete cache whose shards verify and that stores at least one view, or a one-line error."""
    cache = TeacherCache(root)
    problems = cache.verify_shards()
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CacheError(f"{problems[0]}{more}; re-run the `distillery cache` command that made {root}")
    view_axes = [meta.shape[1] for name, meta in cache.manifest.arrays.items() if not name.startswith("samples/")]
    if cache.num_views < 1 or 0 in view_axes:
        raise CacheError(f"{root} stores 0 views per sample; re-run `distillery cache` (view 0 is always stored)")
    return cache


def check_classes(cache: TeacherCache, val: ImageDataset) -> None:
    """The student's classes (the cache's) must be the val split's and the teacher's logits'."""
    if list(val.class_names) != cache.class_names:
        raise TrainError(f"class mismatch: the cache {cache.root} has {cache.num_classes} classes, the "
                         f"{val.name} val split has {val.num_classes}; re-run `distillery cache` on this dataset")
    width = cache.manifest.teacher.logit_classes
    if "logits" in cache.available_targets() and width != cache.num_classes:
        raise TrainError(f"class mismatch: the cache {cache.root} holds {width}-class teacher logits for "
                         f"{cache.num_classes} dataset classes")


def cache_info(cache: TeacherCache) -> CacheInfo:
    """What methods may know about `cache`: its classes, served targets and their shapes, its statistics."""
    available = cache.available_targets()
    return CacheInfo(num_classes=cache.num_classes, pooled_dim=cache.manifest.teacher.pooled_dim,
                     available=available, target_shapes=cache.target_shapes(available),
                     statistics=cache.statistics(), root=str(cache.root),
                     teacher_tail=cache.teacher_tail)


def build_methods(specs: tuple[MethodSpec, ...], cache: TeacherCache, student: StudentInfo) -> nn.ModuleDict:
    """The run's methods by name; each checks the cache can serve what it needs."""
    info = cache_info(cache)
    return nn.ModuleDict({spec.name: spec.build(info, student) for spec in specs})




def _to_device(targets: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {name: tuple(t.to(device, non_blocking=True) for t in v) if isinstance(v, (tuple, list))
            else v.to(device, non_blocking=True) for name, v in targets.items()}


@dataclass
class RunSetup:
    """Everything a run is built from, checked: what `check_run` vouches for before any training."""

    cache: TeacherCache
    val: ImageDataset
    size: int
    student: Student
    methods: nn.ModuleDict
    needs: frozenset[str]
    identity: dict[str, Any]
    checkpoint: dict[str, Any] | None


def setup_run(config: TrainConfig, device: torch.device, world_size: int = 1,
              cache: TeacherCache | None = None) -> RunSetup:
    """Check the device, --out (writable, not in use by another run), the cache, the classes, the student,
    its methods, the online teacher's prerequisites and the run directory (resume); every bad input is a
    one-line DistilleryError, and nothing is written. `cache`: `config.cache` already opened by `open_cache`
    (its shards verified) for another student of the same sweep; None opens and verifies it."""
    s = config.settings
    s.check_machine()
    check_output_location(config.out)
    run = RunDir(config.out)
    run.check_outside_caches(config.cache)
    run.check_unlocked()
    cache = open_cache(config.cache) if cache is None else cache
    manifest = cache.manifest
    # At the training inputs' scale: a camera's full resolution never reaches the evaluation's renders.
    val = load_dataset(manifest.dataset.name, "val", on_bad_image=s.on_bad_image).with_max_side(
        manifest.storage.max_side, manifest.storage.decode_min_side)
    check_classes(cache, val)
    check_world(block_sizes(manifest.shards, manifest.storage.block_size), world_size)
    size = s.input_size or manifest.teacher.input_size
    torch.manual_seed(s.seed)
    student = Student(config.student, cache.num_classes, manifest.teacher.in_chans, size,
                      taps=StudentSpec(student=config.student, methods=config.methods).taps).to(device)
    methods = build_methods(config.methods, cache, student.info()).to(device)
    for method in methods.values():
        method.adopt_student(student.model)
    needs = frozenset().union(*(m.needs for m in methods.values()))
    if s.online_teacher:
        OnlineTeacher.check(cache, needs)
    identity = {**config.identity(), "cache_fingerprint": cache.manifest.fingerprint(),
                **World(size=world_size).identity()}
    checkpoint = run.load_checkpoint(config, identity)
    return RunSetup(cache, val, size, student, methods, needs, identity, checkpoint)


def check_run(config: TrainConfig, world_size: int | None = None, cache: TeacherCache | None = None) -> TeacherCache:
    """Fail fast, before any orchestration starts, on what `train_student` would refuse (with `world_size`
    processes; default: this process's world, one process outside torchrun); returns the opened, verified cache,
    for checking the sweep's other students against it (`setup_run`'s `cache`)."""
    world = World.from_env().size if world_size is None else world_size
    return setup_run(config, torch.device("cpu"), world, cache).cache


def check_runs(configs: list[TrainConfig], world_size: int | None = None) -> None:
    """`check_run` for every run of a sweep, opening the cache and hashing its shards once for all of them."""
    opened = None
    for config in configs:
        opened = check_run(config, world_size, cache=opened)


def train_student(config: TrainConfig) -> TrainSummary:
    """Train `config.student` with `config.methods` from `config.cache`; write RUNDIR; return the summary.

    The summary (also RUNDIR/summary.json, docs/ARCHITECTURE.md#command-line-contract): student, methods, seed, epochs, val_accuracy
    (0..1, view 0 of the val split), train_seconds (training epochs, evaluation excluded),
    mean_step_seconds (wall time per optimiser step including waiting for data and, online, the teacher;
    each epoch's first step, which waits for the loader to start, is left out), first_step_seconds (from
    this call to the end of its first optimiser step: opening the cache and the val split, building the
    models, starting the loader; None if it took none), peak_rss_bytes (this
    process or a finished DataLoader worker, whichever peaked higher; a flow training several students in
    one process reports the process's peak so far), cache, online_teacher, params (student parameters),
    and teacher, dataset, num_samples, input_size, batch_size, steps, final_loss, device, out,
    val_skipped_images (undecodable val images left out under --on-bad-image skip), environment (CPU,
    kernel capability, threads, versions: what must match to reproduce the numbers, `describe_environment`),
    world_size (the processes that trained it).
    The run holds RUNDIR's lock throughout (`RunDir.locked`). Under torchrun the ranks train it together
    with DDP (`pipeline.train.ddp`): rank 0 holds the lock and writes RUNDIR; every rank returns the
    summary.
    """
    called = time.perf_counter()
    world = World.from_env()
    device = world.device(resolve_device(config.settings.device))
    with process_group(world, device):
        setup = setup_run(config, device, world.size)
        run = RunDir(config.out)
        world.barrier()  # every rank has found --out unlocked before rank 0 locks it
        with run.locked() if world.is_main else nullcontext():
            world.barrier()
            # Read again under the lock: a run that held it a moment ago may have checkpointed since the check.
            setup.checkpoint = run.load_checkpoint(config, setup.identity)
            world.barrier()  # every rank has read it before rank 0 rewrites config.json
            return _train(config, setup, run, device, world, called)


def _train(config: TrainConfig, setup: RunSetup, run: RunDir, device: torch.device, world: World,
           called: float) -> TrainSummary:
    s = config.settings
    cache, val, size, student, methods = setup.cache, setup.val, setup.size, setup.student, setup.methods
    manifest = cache.manifest
    mean, std = manifest.teacher.mean, manifest.teacher.std
    online = OnlineTeacher(cache, setup.needs, device) if s.online_teacher else None
    teacher_size = online.input_size if online is not None and online.input_size != size else None
    stream = CacheStream(cache, size, frozenset() if online else setup.needs, s.seed, s.shuffle_buffer, teacher_size,
                         world.rank, world.size)
    steps = stream.steps_per_epoch(s.batch_size, s.workers)  # every rank's; its own may be fewer
    own_steps = stream.batches_per_epoch(s.batch_size, s.workers)
    model = wrap(DistillStep(student, methods), world, device)
    id_log = IdLog.from_env(world)
    # A method may share a module with the student (a head it adopted): each parameter once.
    params = list({id(p): p for p in [*student.parameters(), *methods.parameters()] if p.requires_grad}.values())
    optimizer = build_optimizer(params, s.optim)
    schedule = cosine_schedule(optimizer, s.epochs * steps, round(s.optim.warmup_epochs * steps))

    state: dict[str, Any] = {"epoch": 0, "step": 0, "train_seconds": 0.0, "step_seconds_sum": 0.0,
                             "step_count": 0, "val_accuracy": None, "loss": None}
    ckpt = setup.checkpoint
    if ckpt is not None:
        student.model.load_state_dict(ckpt["student"])
        methods.load_state_dict(ckpt["methods"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        state = ckpt["state"]
    if world.is_main:
        run.start(config, state["epoch"])

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    first_step_seconds = None
    label = f"{config.student} [{'+'.join(methods)}]"
    with progress_task(label, (s.epochs - state["epoch"]) * cache.num_samples, "samples") as bar:
        for epoch in range(state["epoch"], s.epochs):
            if world.size > 1:  # ranks stop together, where each one's checkpointed epoch is the same
                raise_if_stopped()
            # Reseeded per epoch, so a resumed run continues exactly as an uninterrupted one would.
            torch.manual_seed(epoch_seed(s.seed, epoch))
            student.train()
            methods.train()
            records: list[dict[str, Any]] = []
            start = last = time.perf_counter()
            batches = stream.loader(epoch, s.batch_size, s.workers, device.type == "cuda", device)
            real_steps = 0
            for step, (batch, real) in enumerate(equalised(batches, steps)):
                if world.size == 1:  # a signal stops the run here: its checkpoint holds the last whole epoch
                    raise_if_stopped()
                x, y = batch["input"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
                if online is not None:
                    targets = online(batch.get("teacher_input", batch["input"]))
                else:
                    targets = _to_device(batch["targets"], device)
                progress = TrainingProgress(epoch=epoch, step=step, steps_per_epoch=steps, total_epochs=s.epochs)
                with autocast:
                    terms = model(x, targets, y, progress)
                loss = torch.stack([t.float() for t in terms.values()]).sum()
                samples = len(y) if real else 0  # a padding step trains at weight zero
                totals = step_totals(world, samples, loss, terms)
                values = totals.terms
                if not totals.finite:  # stop before the update spoils the weights and the checkpoint
                    raise TrainError(f"{label}: loss is {loss.item()} at epoch {epoch} step {step} "
                                     f"({ {k: v.item() for k, v in terms.items()} }); lower --lr or set --clip-grad")
                optimizer.zero_grad(set_to_none=True)
                (loss * totals.weight(samples, world)).backward()
                if s.optim.clip_grad is not None:
                    nn.utils.clip_grad_norm_(params, s.optim.clip_grad)
                optimizer.step()
                schedule.step()
                now = time.perf_counter()
                if first_step_seconds is None:
                    first_step_seconds = now - called
                if step > 0:  # the first step of an epoch waits for the workers to start and the buffer to fill
                    state["step_seconds_sum"] += now - last
                    state["step_count"] += 1
                if real and id_log is not None:
                    id_log.write(epoch, state["step"], batch["id"], batch["view"])
                records.append({"kind": "step", "epoch": epoch, "step": state["step"], "loss": totals.loss, **values,
                                "lr": schedule.get_last_lr()[0], "step_seconds": now - last})
                last = now
                state["step"] += 1
                real_steps += real
                bar.advance(totals.samples)
            if real_steps != own_steps:
                raise TrainError(f"epoch {epoch} gave {real_steps} batches, {own_steps} were planned; the cache's "
                                 f"shards do not match its manifest")
            state["train_seconds"] += time.perf_counter() - start
            evaluated = {}
            if world.is_main and ((epoch + 1) % s.eval_every == 0 or epoch + 1 == s.epochs):
                state["val_accuracy"] = evaluate_accuracy(student.model, val, size, mean, std, device=device)
                evaluated = {"val_accuracy": state["val_accuracy"]}
            state["loss"] = sum(r["loss"] for r in records) / len(records)
            terms_mean = {k: sum(r[k] for r in records) / len(records) for k in values}
            state["epoch"] = epoch + 1
            if not world.is_main:
                continue
            run.log(records + [{"kind": "epoch", "epoch": epoch, "step": state["step"], "loss": state["loss"],
                                **terms_mean, **evaluated}])
            log.info("%s epoch %d/%d: loss %.4f (%s)%s", label, epoch + 1, s.epochs, state["loss"],
                     ", ".join(f"{k} {v:.4f}" for k, v in terms_mean.items()),
                     f", val accuracy {state['val_accuracy']:.4f}" if evaluated else "")
            run.save_checkpoint({"config": config.to_dict(), "identity": setup.identity, "state": state,
                                 "student": student.model.state_dict(), "methods": methods.state_dict(),
                                 "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()})

    exported = any([method.export_student(student.model) for method in methods.values()])  # every method exports
    if exported and world.is_main:
        state["val_accuracy"] = evaluate_accuracy(student.model, val, size, mean, std, device=device)
    summary = TrainSummary(
        student=config.student, methods=[str(m) for m in config.methods], seed=s.seed, epochs=s.epochs,
        val_accuracy=state["val_accuracy"], train_seconds=state["train_seconds"],
        mean_step_seconds=state["step_seconds_sum"] / max(1, state["step_count"]),
        first_step_seconds=first_step_seconds, peak_rss_bytes=peak_rss_bytes(), cache=config.cache,
        online_teacher=s.online_teacher,
        params=student.num_parameters(), teacher=manifest.teacher.model, dataset=manifest.dataset.name,
        num_samples=cache.num_samples, input_size=size, batch_size=s.batch_size, steps=state["step"],
        final_loss=state["loss"], device=str(device), out=config.out,
        val_skipped_images=list(val.skipped), environment=describe_environment(device),
        world_size=world.size, finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if world.is_main:
        run.finish(student.model.state_dict(), summary.to_dict())
    return summary
