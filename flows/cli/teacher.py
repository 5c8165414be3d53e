"""`distillery` commands of the teacher and its cache: fit-teacher, cache, stats, inspect, neighbors, verify."""

import json
import re
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.markup import escape

from flows.cli.display import console, print_table, report_skipped, show_progress, warn
from flows.cli.options import DATASET_HELP, CkaSource, Declared, Device, OnBadImage, source_default
from flows.server import start_temporary_server
from pipeline.options import OptionError, default_of
from pipeline.teacher.request import CacheRequest
from pipeline.train.fit_config import OBJECTIVES, FitConfig

group = typer.Typer()

Objective = Literal[OBJECTIVES]
# Modules whose functions declare some options' defaults (`source_default`: read, not imported, for the help).
STATISTICS, VERIFY = "pipeline.cache.statistics", "pipeline.teacher.verify"
TeacherHead = Literal["keep", "none"]


def logits_option(value: str) -> str:
    """--logits: dense or topk:K, checked while the command line is parsed."""
    if value != "dense" and not re.fullmatch(r"topk:[1-9][0-9]*", value):
        raise typer.BadParameter(f"must be dense or topk:K (K > 0), not {value!r}")
    return value


def inputs_option(value: str) -> str:
    """--inputs: auto, raw, encoded[:quality=Q] or source, checked while the command line is parsed."""
    from pipeline.cache.inputs import parse_inputs
    from pipeline.cache.manifest import CacheError

    if value != "auto":
        try:
            parse_inputs(value)
        except CacheError as e:
            raise typer.BadParameter(str(e).removeprefix("--inputs ")) from None
    return value


@group.command("fit-teacher")
def fit_teacher_cmd(
    dataset: Annotated[str, typer.Option(help=DATASET_HELP)],
    model: Annotated[str, Declared(FitConfig, "model")],
    out: Annotated[Path, Declared(FitConfig, "out")],
    overwrite: Annotated[bool, Declared(FitConfig, "overwrite")] = default_of(FitConfig, "overwrite"),
    epochs: Annotated[int, Declared(FitConfig, "epochs")] = default_of(FitConfig, "epochs"),
    subset: Annotated[Optional[int], Declared(FitConfig, "subset")] = default_of(FitConfig, "subset"),
    seed: Annotated[int, Declared(FitConfig, "seed")] = default_of(FitConfig, "seed"),
    input_size: Annotated[Optional[int], Declared(FitConfig, "input_size")] = default_of(FitConfig, "input_size"),
    patch_size: Annotated[Optional[int], Declared(FitConfig, "patch_size")] = default_of(FitConfig, "patch_size"),
    batch_size: Annotated[int, Declared(FitConfig, "batch_size")] = default_of(FitConfig, "batch_size"),
    lr: Annotated[float, Declared(FitConfig, "lr")] = default_of(FitConfig, "lr"),
    device: Annotated[str, Device()] = default_of(FitConfig, "device"),
    on_bad_image: Annotated[OnBadImage, Declared(FitConfig, "on_bad_image")] = default_of(FitConfig, "on_bad_image"),
    objective: Annotated[Objective, Declared(FitConfig, "objective")] = default_of(FitConfig, "objective"),
    temperature: Annotated[float, Declared(FitConfig, "temperature")] = default_of(FitConfig, "temperature"),
    jitter: Annotated[float, Declared(FitConfig, "jitter")] = default_of(FitConfig, "jitter"),
    weights: Annotated[Optional[str], Declared(FitConfig, "weights", metavar="FILE|hf-hub:ORG/NAME")] = None,
) -> None:
    """Train a teacher locally, from random weights or fine-tuning --weights (nothing is downloaded), and save a
    checkpoint (Prefect flow when a server is configured)."""
    from flows.server import recorded
    from flows.templates import local_path
    from pipeline.train.fit import check_fit, fit_teacher

    local = not recorded()  # no server to record a flow run: the library runs here, its `out` filled here
    cfg = FitConfig(dataset=dataset, model=model, out=local_path(str(out)) if local else str(out), overwrite=overwrite,
                    epochs=epochs, subset=subset, seed=seed, input_size=input_size, patch_size=patch_size,
                    batch_size=batch_size, lr=lr,
                    device=device, on_bad_image=on_bad_image, objective=objective, temperature=temperature,
                    jitter=jitter, weights=weights)
    check_fit(cfg)  # one line here, not a failed flow run
    with show_progress():
        if local:
            result = fit_teacher(cfg)
        else:  # the flow run, recorded on the server PREFECT_API_URL names
            from flows.fit_teacher import fit_teacher_flow

            result = fit_teacher_flow(cfg)
    report_skipped(dataset, result.skipped_images)
    accuracy = "no head (self-supervised)" if result.val_accuracy is None else f"val accuracy {result.val_accuracy:.2%}"
    # soft_wrap: one line however long the path, for the scripts that read it
    console.print(f"teacher {model}: {accuracy} after {epochs} epochs ({result.train_seconds:.1f} s) -> {result.out}",
                  soft_wrap=True)



def request_default(name: str):  # noqa: ANN201 - any field's type
    return default_of(CacheRequest, name)


@group.command("cache")
def cache_cmd(
    dataset: Annotated[str, typer.Option(help=DATASET_HELP)],
    out: Annotated[str, Declared(CacheRequest, "out")],
    teacher: Annotated[Optional[str], typer.Option(help="timm model name of the teacher (default: the model the "
                                                        "--checkpoint or hf-hub: --weights names)")] = None,
    checkpoint: Annotated[Optional[Path], Declared(CacheRequest, "checkpoint")] = None,
    weights: Annotated[Optional[str], Declared(CacheRequest, "weights", metavar="FILE|hf-hub:ORG/NAME")] = None,
    class_map: Annotated[Optional[Path], Declared(CacheRequest, "class_map", metavar="FILE")] = None,
    teacher_head: Annotated[TeacherHead, typer.Option(help="keep: logits too | none: features and statistics "
                                                           "only")] = "keep" if request_default("teacher_head") else "none",
    views: Annotated[int, Declared(CacheRequest, "views")] = request_default("views"),
    view_seed: Annotated[int, Declared(CacheRequest, "view_seed")] = request_default("view_seed"),
    logits: Annotated[str, Declared(CacheRequest, "logits", callback=logits_option, metavar="dense|topk:K")]
    = request_default("logits"),
    tap: Annotated[str, Declared(CacheRequest, "tap", metavar="auto|none|STAGE")] = request_default("tap"),
    grid: Annotated[int, Declared(CacheRequest, "grid")] = request_default("grid"),
    featmaps: Annotated[bool, Declared(CacheRequest, "featmaps")] = request_default("featmaps"),
    lsh_bits: Annotated[int, Declared(CacheRequest, "lsh_bits")] = request_default("lsh_bits"),
    teacher_tail: Annotated[int, Declared(CacheRequest, "teacher_tail")] = request_default("teacher_tail"),
    store: Annotated[Optional[str], Declared(CacheRequest, "store")] = request_default("store"),
    subset: Annotated[Optional[int], Declared(CacheRequest, "subset")] = request_default("subset"),
    subset_seed: Annotated[int, Declared(CacheRequest, "subset_seed")] = request_default("subset_seed"),
    split: Annotated[Literal["train", "val"], Declared(CacheRequest, "split")] = request_default("split"),
    shard_size: Annotated[int, Declared(CacheRequest, "shard_size")] = request_default("shard_size"),
    shard_bytes: Annotated[int, Declared(CacheRequest, "shard_bytes", metavar="BYTES")]
    = request_default("shard_bytes"),
    batch_size: Annotated[int, Declared(CacheRequest, "batch_size")] = request_default("batch_size"),
    input_size: Annotated[Optional[int], Declared(CacheRequest, "input_size")] = request_default("input_size"),
    cka_source: Annotated[CkaSource, Declared(CacheRequest, "cka_source")] = request_default("cka_source"),
    device: Annotated[str, Device()] = request_default("device"),
    on_bad_image: Annotated[OnBadImage, Declared(CacheRequest, "on_bad_image")] = request_default("on_bad_image"),
    inputs: Annotated[str, Declared(CacheRequest, "inputs", callback=inputs_option,
                                    metavar="auto|raw|encoded[:quality=Q]|source")] = request_default("inputs"),
    max_side: Annotated[Optional[int], Declared(CacheRequest, "max_side", min=1, metavar="PIXELS")]
    = request_default("max_side"),
    task_runner_spec: Annotated[str, typer.Option("--task-runner", metavar="thread|dask|tcp://HOST:PORT",
                                                  help="where shard tasks run: thread | dask (a local cluster of "
                                                       "--dask-workers processes) | tcp://SCHEDULER:PORT")]
    = "thread",
    dask_workers: Annotated[int, typer.Option(help="worker processes of --task-runner dask")]
    = 2,
    allow_other_dataset: Annotated[bool, typer.Option(help="cache with a checkpoint fitted on another dataset "
                                                           "(refused otherwise)")] = False,
) -> None:
    """Run the teacher once over a dataset and store everything students need (Prefect flow)."""
    from pipeline.cache.reader import TeacherCache
    from pipeline.preflight import checkpoint_dataset, teacher_near_chance
    from pipeline.teacher.plan import check_request

    if weights is not None and checkpoint is not None:
        raise OptionError("--checkpoint and --weights both give the teacher's weights; give one")
    if weights is None:
        teacher = teacher or checkpoint_model(checkpoint)
    if checkpoint is not None:  # before any work: a checkpoint of another dataset wastes the whole pass
        warn(checkpoint_dataset(checkpoint, dataset, on_bad_image, allow_other_dataset))
    request = CacheRequest(dataset=dataset, teacher=teacher, out=str(out), split=split, subset=subset,
                           subset_seed=subset_seed, checkpoint=str(checkpoint) if checkpoint else None,
                           weights=weights, class_map=str(class_map) if class_map else None,
                           teacher_head=teacher_head == "keep", views=views, view_seed=view_seed, logits=logits,
                           tap=tap, grid=grid, featmaps=featmaps, teacher_tail=teacher_tail, store=store,
                           lsh_bits=lsh_bits,
                           input_size=input_size, shard_size=shard_size, shard_bytes=shard_bytes, batch_size=batch_size,
                           cka_source=cka_source, device=device, on_bad_image=on_bad_image, inputs=inputs,
                           max_side=max_side)
    manifest = check_request(request)  # bad input is one line here, before the flow (and anything) starts
    report_skipped(dataset, manifest.dataset.skipped or [])
    from flows.server import recorded

    if recorded() or task_runner_spec != "thread":  # a flow run: recorded, or its shards fanned out by Dask
        from flows.cache_teacher import run_cache_teacher, task_runner  # Prefect loads once the request is good

        task_runner(task_runner_spec, dask_workers)  # an unknown runner is one line too
        start_temporary_server()
        with show_progress():  # the pass holds the cache's writer lock: a second writer gets one line
            result = run_cache_teacher(request, task_runner_spec, dask_workers)
    else:
        from flows.templates import local_path
        from pipeline.report.html import write_cache_report
        from pipeline.teacher.cache_pass import run_cache_pass

        with show_progress():  # the pass holds the cache's writer lock: a second writer gets one line
            result = run_cache_pass(request.model_copy(update={"out": local_path(request.out)}))
            write_cache_report(TeacherCache(result.cache))
    console.print(f"cached {result.num_samples} samples into {result.cache}: teacher pass "
                  f"{result.images} images in {result.pass_seconds:.1f} s = "
                  f"{result.images_per_second:.0f} images/s ({result.skipped_shards} shards reused)")
    warn(teacher_near_chance(TeacherCache(result.cache)))


def checkpoint_model(checkpoint: Optional[Path]) -> str:
    """The timm model a `fit-teacher` checkpoint names: --teacher's default."""
    from pipeline.teacher.checkpoint import TeacherCheckpoint

    if checkpoint is None:
        raise OptionError("give --teacher MODEL (a timm name), --checkpoint FILE whose model is then used, or "
                          "--weights SOURCE")
    return TeacherCheckpoint.load(checkpoint).model


@group.command("stats")
def stats_cmd(
    cache: Annotated[str, typer.Argument(help="a complete teacher cache")],
    cka_source: Annotated[CkaSource, Declared(CacheRequest, "cka_source")]
    = source_default(STATISTICS, "recompute_statistics", "cka_source"),
    lsh_bits: Annotated[Optional[int], typer.Option(help="rebuild LSH planes, codes and index with this many "
                                                         "bits (0: remove them; default: the cache's)")]
    = source_default(STATISTICS, "recompute_statistics", "lsh_bits"),
) -> None:
    """Recompute dataset-level statistics from a complete cache (no teacher)."""
    from pipeline.cache.statistics import recompute_statistics

    info = recompute_statistics(str(cache), cka_source=cka_source, lsh_bits=lsh_bits)
    console.print_json(json.dumps(info.to_dict()))


@group.command("inspect")
def inspect_cmd(
    cache: Annotated[str, typer.Argument(help="teacher cache directory")],
    report: Annotated[Optional[Path], typer.Option(help="also write a self-contained HTML report (figures "
                                                        "included) to this file")] = None,
) -> None:
    """Print the manifest summary and every array's shape, dtype, bytes and a few statistics."""
    from pipeline.cache.reader import TeacherCache
    from pipeline.cache.summary import (array_rows, featmap_rows, human_bytes, pca_summary,
                                        teacher_accuracy_per_view)

    start = time.perf_counter()
    c = TeacherCache(cache, require_complete=False)
    m = c.manifest
    console.print(f"[bold]{cache}[/bold]  status={m.status}  format={m.format_version}  created={m.created}")
    console.print(f"teacher   {m.teacher.model}  checkpoint sha256={str(m.teacher.checkpoint_sha256)[:12]}  "
                  f"input={m.teacher.input_size}px  taps={m.teacher.taps}  head={m.teacher.head}")
    console.print(f"dataset   {m.dataset.name} ({m.dataset.split})  N={c.num_samples}  "
                  f"classes={c.num_classes}  fingerprint={m.dataset.fingerprint[:12]}")
    console.print(f"views     {c.num_views} stored (view 0 clean + {c.num_views - 1} x {m.views.recipe}, "
                  f"seed {m.views.seed})")
    console.print(f"storage   logits={m.storage.logits}  grid={m.storage.grid}  shards={len(m.shards)} "
                  f"x {m.storage.shard_size} samples  lsh_bits={m.storage.lsh_bits}")
    rows = [{"array": r.name, "shape": "x".join(map(str, r.shape)), "dtype": r.dtype,
             "stored": human_bytes(r.stored_bytes), "bytes/sample": f"{r.bytes_per_sample:.1f}",
             "mean": "-" if r.mean is None else f"{r.mean:.4g}", "std": "-" if r.std is None else f"{r.std:.4g}"}
            for r in array_rows(c)]
    print_table("arrays", rows)
    maps = [{"array": r.name, "map": "x".join(map(str, r.map_shape)), "dtype": r.dtype,
             "uncompressed": human_bytes(r.raw_bytes), "zarr (compressed)": human_bytes(r.stored_bytes)}
            for r in featmap_rows(c)]
    if maps:
        print_table("feature maps, bytes per sample-view", maps)
    tail = m.files.get("teacher_tail")
    if tail:
        console.print(f"teacher tail  {tail.file}  {tail.family} stages {', '.join(tail.stages or [])}  "
                      f"{human_bytes(tail.bytes)}  sha256={tail.sha256[:12]}")
    acc = teacher_accuracy_per_view(c)
    if acc:
        print_table("teacher per view", acc)
    pca = pca_summary(c)
    if pca:
        console.print("PCA  " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in pca.items()))
    if report is not None:
        from pipeline.report.html import write_report

        notes = write_report(c, report).notes
        console.print(f"report written to {report}" + "".join(f"\n  {k}: {v}" for k, v in notes.items()),
                      markup=False, highlight=False)
    console.print(f"[dim]inspected in {time.perf_counter() - start:.2f} s[/dim]")


@group.command("neighbors")
def neighbors_cmd(
    cache: Annotated[str, typer.Argument(help="teacher cache directory")],
    sample_id: Annotated[int, typer.Argument(metavar="ID", help="sample id (as stored in samples/ids)")],
    k: Annotated[int, typer.Option(help="number of neighbours")] = source_default("pipeline.cache.neighbors", "lsh_neighbors", "k"),
) -> None:
    """A sample's nearest neighbours in the teacher's LSH space (Hamming distance, faiss index)."""
    from pipeline.cache.neighbors import lsh_neighbors
    from pipeline.cache.reader import TeacherCache

    found = lsh_neighbors(TeacherCache(cache), sample_id, k)
    q = found.query
    rows = [{"rank": i + 1, "id": n.id, "label": n.class_name, "hamming": n.hamming}
            for i, n in enumerate(found.neighbors)]
    print_table(f"{len(rows)} nearest neighbours of sample {q.id} (label {q.class_name}) over {found.bits} "
                f"LSH bits", rows, ["rank", "id", "label", "hamming"])


@group.command("verify")
def verify_cmd(
    cache: Annotated[str, typer.Argument(help="teacher cache directory")],
    samples: Annotated[int, typer.Option(help="random (id, view) pairs to re-run through the teacher")]
    = source_default(VERIFY, "verify_cache", "samples"),
    seed: Annotated[int, typer.Option(help="seed of the pair sample")] = source_default(VERIFY, "verify_cache", "seed"),
    rtol: Annotated[float, typer.Option(help="tolerance, relative to each array's largest stored value "
                                             "(default: four float16 units; a cache made under bf16 on a GPU and "
                                             "verified on CPU needs ~0.03)")] = source_default(VERIFY, "verify_cache", "rtol"),
    device: Annotated[str, Device("where the live teacher runs: auto | cpu | cuda[:N]")]
    = source_default(VERIFY, "verify_cache", "device"),
    repair: Annotated[bool, typer.Option(help="first rewrite every shard, statistic and side file that fails its "
                                              "checks, with the teacher checkpoint that made the cache")] = False,
) -> None:
    """Check every file and array of a cache, re-run the live teacher on random cached views; exit 1 on any
    mismatch."""
    from pipeline.teacher.verify import repair_cache, verify_cache

    start = time.perf_counter()
    if repair:
        found = repair_cache(str(cache), device=device)
        console.print(f"repaired {cache}: {len(found)} problems found and rewritten" +
                      "".join(f"\n  {p}" for p in found), markup=False, highlight=False)
    result = verify_cache(str(cache), samples=samples, seed=seed, rtol=rtol, device=device)
    rows = [{"array": c.name, "values": c.values, "max |live - stored|": f"{c.max_abs_diff:.3g}",
             "tolerance": f"{c.tolerance:.3g}", "worst (id, view)": "-" if c.values == 0 else f"{c.worst}",
             "ok": "yes" if c.ok else "[red]NO[/red]"} for c in result.checks]
    print_table(f"{cache}: live teacher vs cache on {result.pairs} (id, view) pairs", rows)
    for problem in result.problems:
        console.print(f"[red]mismatch:[/red] {escape(problem)}", highlight=False)
    for note in result.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    verdict = "[green]OK[/green]" if result.ok else "[red]MISMATCH[/red]"
    console.print(f"{verdict}: {result.shards} shard checksums, {len(result.checks)} arrays checked in "
                  f"{time.perf_counter() - start:.1f} s")
    if not result.ok:
        raise typer.Exit(1)
