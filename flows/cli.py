"""The `distillery` command line (docs/ARCHITECTURE.md#command-line-contract: these spellings are a contract scripts rely on).

Every option's default is read from the config class, method or function that declares it (`default_of`),
never restated here; every option has help text (tests/flows/test_cli_listing.py walks them all).
"""

import json
import os
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Optional

from flows.server import default_prefect_home, start_temporary_server

default_prefect_home()  # before anything imports Prefect, which reads PREFECT_HOME once

import typer  # noqa: E402 - after the Prefect home is settled
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,  # noqa: E402
                           TimeRemainingColumn)
from rich.table import Table  # noqa: E402
from rich.text import Text  # noqa: E402

from pipeline import progress  # noqa: E402
from pipeline.bench import run_benchmarks  # noqa: E402
from pipeline.cache.neighbors import lsh_neighbors  # noqa: E402
from pipeline.data.datasets import BAD_IMAGE_POLICIES, dataset_help  # noqa: E402
from pipeline.experiments import DEFAULT_ROOT  # noqa: E402
from pipeline.methods import list_methods  # noqa: E402
from pipeline.options import OptionError, check_device, default_of, help_of  # noqa: E402
from pipeline.cache.statistics import recompute_statistics  # noqa: E402
from pipeline.teacher.plan import CacheRequest  # noqa: E402
from pipeline.teacher.verify import verify_cache  # noqa: E402
from pipeline.train.config import RunSettings  # noqa: E402
from pipeline.train.fit import OBJECTIVES, FitConfig  # noqa: E402
from pipeline.train.optim import OptimConfig  # noqa: E402

if TYPE_CHECKING:
    from pipeline.bench_storage import CacheScaling
    from pipeline.experiments import ExperimentResult
    from pipeline.train.config import StudentSpec
    from pipeline.train.summary import TrainSummary

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's console logs would tear through the progress display and print a traceback before the one-line
# error of bad input; the server keeps every log line (flow, task and library) and the CLI prints results.
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
# Prefect waits 20 s for its temporary server; a busy machine (a shared CI runner, a teacher pass beside it)
# has been measured to need more, and a timed-out start wastes the whole command.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

console = Console(width=None if sys.stdout.isatty() else 140)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distillery: teach once, distill many.")


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        unit = task.fields.get("unit", "it")
        return Text(f"{task.speed:,.0f} {unit}/s" if task.speed else f"- {unit}/s", style="cyan")


class RichReporter:
    """`pipeline.progress` reporter drawing one rich bar per running loop (samples/s, ETA)."""

    def __init__(self, display: Progress) -> None:
        self.display = display
        self.ids: dict[str, int] = {}

    def start(self, key: str, description: str, total: int, unit: str) -> None:
        # Descriptions are plain text: a run's "[ce+kd]" is not rich markup.
        self.ids[key] = self.display.add_task(escape(description), total=total, unit=unit)

    def advance(self, key: str, amount: int) -> None:
        self.display.advance(self.ids[key], amount)

    def finish(self, key: str) -> None:
        task_id = self.ids.pop(key)
        if not self.display.console.is_terminal:
            # A log (a scheduled run, `> file`) gets no live bar: one line per finished loop instead.
            task = next(t for t in self.display.tasks if t.id == task_id)  # shard tasks finish in any order
            rate = f", {task.completed / task.elapsed:,.0f} {task.fields['unit']}/s" if task.elapsed else ""
            self.display.console.print(f"{task.description}: {task.completed:,.0f} {task.fields['unit']} in "
                                       f"{task.elapsed or 0:.1f} s{rate}")
        self.display.remove_task(task_id)


class show_progress:
    """Context manager: a rich progress display wired to the library's progress hooks."""

    def __enter__(self) -> Progress:
        self.display = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                RateColumn(), TimeRemainingColumn(elapsed_when_finished=True),
                                console=console, transient=True, disable=not console.is_terminal)
        self.display.__enter__()
        progress.set_reporter(RichReporter(self.display))
        return self.display

    def __exit__(self, *exc: object) -> None:
        progress.set_reporter(None)
        self.display.__exit__(*exc)


# Choice-like options: typer lists the choices in --help and refuses anything else in one line.
OnBadImage = Literal[BAD_IMAGE_POLICIES]
Objective = Literal[OBJECTIVES]
Optimizer = OptimConfig.model_fields["optimizer"].annotation
CkaSource = Literal["auto", "logits", "features"]
TeacherHead = Literal["keep", "none"]

DATASET_HELP = dataset_help()


def device_option(value: str) -> str:
    """--device: auto, cpu or a CUDA device this machine has, checked while the command line is parsed."""
    check_device(value)
    return value


def logits_option(value: str) -> str:
    """--logits: dense or topk:K, checked while the command line is parsed."""
    if value != "dense" and not re.fullmatch(r"topk:[1-9][0-9]*", value):
        raise typer.BadParameter(f"must be dense or topk:K (K > 0), not {value!r}")
    return value


def Device(help: str = "auto | cpu | cuda[:N] (checked against this machine)") -> typer.models.OptionInfo:  # noqa: A002,N802
    return typer.Option(help=help, callback=device_option, metavar="auto|cpu|cuda[:N]")


def Declared(config: type, name: str, *decls: str, **kwargs) -> typer.models.OptionInfo:  # noqa: N802
    """An option whose help is the one `config` declares for its field `name` (`help_of`): stated once, and
    shown by the Prefect UI too."""
    return typer.Option(*decls, help=help_of(config, name), **kwargs)


def report_skipped(where: str, skipped: list[str]) -> None:
    """One line on stderr for images left out under --on-bad-image skip (stdout may be a table)."""
    if skipped:
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        Console(stderr=True).print(f"skipped {len(skipped)} undecodable image(s) of {where}: "
                                   f"{', '.join(skipped[:3])}{more}", markup=False, highlight=False)


def print_table(title: str, rows: list[dict], columns: list[str] | None = None) -> None:
    table = Table(title=title, title_justify="left")
    columns = columns or (list(rows[0]) if rows else [])
    for c in columns:
        table.add_column(c, justify="right" if rows and isinstance(rows[0].get(c), (int, float)) else "left")
    for r in rows:
        table.add_row(*[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns])
    console.print(table)


@app.command("fit-teacher")
def fit_teacher_cmd(
    dataset: Annotated[str, typer.Option(help=DATASET_HELP)],
    model: Annotated[str, Declared(FitConfig, "model")],
    out: Annotated[Path, Declared(FitConfig, "out")],
    epochs: Annotated[int, Declared(FitConfig, "epochs")] = default_of(FitConfig, "epochs"),
    subset: Annotated[Optional[int], Declared(FitConfig, "subset")] = default_of(FitConfig, "subset"),
    seed: Annotated[int, Declared(FitConfig, "seed")] = default_of(FitConfig, "seed"),
    input_size: Annotated[Optional[int], Declared(FitConfig, "input_size")] = default_of(FitConfig, "input_size"),
    batch_size: Annotated[int, Declared(FitConfig, "batch_size")] = default_of(FitConfig, "batch_size"),
    lr: Annotated[float, Declared(FitConfig, "lr")] = default_of(FitConfig, "lr"),
    device: Annotated[str, Device()] = default_of(FitConfig, "device"),
    on_bad_image: Annotated[OnBadImage, Declared(FitConfig, "on_bad_image")] = default_of(FitConfig, "on_bad_image"),
    objective: Annotated[Objective, Declared(FitConfig, "objective")] = default_of(FitConfig, "objective"),
    temperature: Annotated[float, Declared(FitConfig, "temperature")] = default_of(FitConfig, "temperature"),
    jitter: Annotated[float, Declared(FitConfig, "jitter")] = default_of(FitConfig, "jitter"),
) -> None:
    """Train a teacher locally (no pretrained weights can be downloaded) and save a checkpoint (Prefect flow)."""
    from flows.fit_teacher import fit_teacher_flow
    from pipeline.train.fit import check_fit

    cfg = FitConfig(dataset=dataset, model=model, out=str(out), epochs=epochs, subset=subset, seed=seed,
                    input_size=input_size, batch_size=batch_size, lr=lr, device=device, on_bad_image=on_bad_image,
                    objective=objective, temperature=temperature, jitter=jitter)
    check_fit(cfg)  # one line here, not a failed flow run
    start_temporary_server()
    with show_progress():
        result = fit_teacher_flow(cfg)
    report_skipped(dataset, result.skipped_images)
    accuracy = "no head (self-supervised)" if result.val_accuracy is None else f"val accuracy {result.val_accuracy:.2%}"
    console.print(f"teacher {model}: {accuracy} after {epochs} epochs ({result.train_seconds:.1f} s) -> {result.out}")


def warn(message: str | None) -> None:
    """A warning line on stderr (stdout may be a table a script reads)."""
    if message:
        Console(stderr=True).print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


def request_default(name: str):  # noqa: ANN201 - any field's type
    return default_of(CacheRequest, name)


@app.command("cache")
def cache_cmd(
    dataset: Annotated[str, typer.Option(help=DATASET_HELP)],
    out: Annotated[str, Declared(CacheRequest, "out")],
    teacher: Annotated[Optional[str], typer.Option(help="timm model name of the teacher (default: the model the "
                                                        "--checkpoint names)")] = None,
    checkpoint: Annotated[Optional[Path], Declared(CacheRequest, "checkpoint")] = None,
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
    batch_size: Annotated[int, Declared(CacheRequest, "batch_size")] = request_default("batch_size"),
    input_size: Annotated[Optional[int], Declared(CacheRequest, "input_size")] = request_default("input_size"),
    cka_source: Annotated[CkaSource, Declared(CacheRequest, "cka_source")] = request_default("cka_source"),
    device: Annotated[str, Device()] = request_default("device"),
    on_bad_image: Annotated[OnBadImage, Declared(CacheRequest, "on_bad_image")] = request_default("on_bad_image"),
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

    teacher = teacher or checkpoint_model(checkpoint)
    if checkpoint is not None:  # before any work: a checkpoint of another dataset wastes the whole pass
        warn(checkpoint_dataset(checkpoint, dataset, on_bad_image, allow_other_dataset))
    request = CacheRequest(dataset=dataset, teacher=teacher, out=str(out), split=split, subset=subset,
                           subset_seed=subset_seed, checkpoint=str(checkpoint) if checkpoint else None,
                           teacher_head=teacher_head == "keep", views=views, view_seed=view_seed, logits=logits,
                           tap=tap, grid=grid, featmaps=featmaps, teacher_tail=teacher_tail, store=store,
                           lsh_bits=lsh_bits,
                           input_size=input_size, shard_size=shard_size, batch_size=batch_size,
                           cka_source=cka_source, device=device, on_bad_image=on_bad_image)
    manifest = check_request(request)  # bad input is one line here, before the flow (and anything) starts
    report_skipped(dataset, manifest.dataset.skipped or [])
    from flows.cache_teacher import run_cache_teacher, task_runner  # Prefect loads once the request is good

    task_runner(task_runner_spec, dask_workers)  # an unknown runner is one line too
    start_temporary_server()
    with show_progress():  # the flow holds the cache's writer lock: a second writer gets one line
        result = run_cache_teacher(request, task_runner_spec, dask_workers)
    console.print(f"cached {result.num_samples} samples into {result.cache}: teacher pass "
                  f"{result.images} images in {result.pass_seconds:.1f} s = "
                  f"{result.images_per_second:.0f} images/s ({result.skipped_shards} shards reused)")
    warn(teacher_near_chance(TeacherCache(out)))


def checkpoint_model(checkpoint: Optional[Path]) -> str:
    """The timm model a `fit-teacher` checkpoint names: --teacher's default."""
    from pipeline.teacher.checkpoint import TeacherCheckpoint

    if checkpoint is None:
        raise OptionError("give --teacher MODEL (a timm name), or --checkpoint FILE whose model is then used")
    return TeacherCheckpoint.load(checkpoint).model


@app.command("stats")
def stats_cmd(
    cache: Annotated[str, typer.Argument(help="a complete teacher cache")],
    cka_source: Annotated[CkaSource, Declared(CacheRequest, "cka_source")]
    = default_of(recompute_statistics, "cka_source"),
    lsh_bits: Annotated[Optional[int], typer.Option(help="rebuild LSH planes, codes and index with this many "
                                                         "bits (0: remove them; default: the cache's)")]
    = default_of(recompute_statistics, "lsh_bits"),
) -> None:
    """Recompute dataset-level statistics from a complete cache (no teacher)."""
    info = recompute_statistics(str(cache), cka_source=cka_source, lsh_bits=lsh_bits)
    console.print_json(json.dumps(info.to_dict()))


@app.command("inspect")
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


@app.command("neighbors")
def neighbors_cmd(
    cache: Annotated[str, typer.Argument(help="teacher cache directory")],
    sample_id: Annotated[int, typer.Argument(metavar="ID", help="sample id (as stored in samples/ids)")],
    k: Annotated[int, typer.Option(help="number of neighbours")] = default_of(lsh_neighbors, "k"),
) -> None:
    """A sample's nearest neighbours in the teacher's LSH space (Hamming distance, faiss index)."""
    from pipeline.cache.reader import TeacherCache

    found = lsh_neighbors(TeacherCache(cache), sample_id, k)
    q = found.query
    rows = [{"rank": i + 1, "id": n.id, "label": n.class_name, "hamming": n.hamming}
            for i, n in enumerate(found.neighbors)]
    print_table(f"{len(rows)} nearest neighbours of sample {q.id} (label {q.class_name}) over {found.bits} "
                f"LSH bits", rows, ["rank", "id", "label", "hamming"])


@app.command("verify")
def verify_cmd(
    cache: Annotated[str, typer.Argument(help="teacher cache directory")],
    samples: Annotated[int, typer.Option(help="random (id, view) pairs to re-run through the teacher")]
    = default_of(verify_cache, "samples"),
    seed: Annotated[int, typer.Option(help="seed of the pair sample")] = default_of(verify_cache, "seed"),
    rtol: Annotated[float, typer.Option(help="tolerance, relative to each array's largest stored value "
                                             "(default: four float16 units; a cache made under bf16 on a GPU and "
                                             "verified on CPU needs ~0.03)")] = default_of(verify_cache, "rtol"),
    device: Annotated[str, Device("where the live teacher runs: auto | cpu | cuda[:N]")]
    = default_of(verify_cache, "device"),
    repair: Annotated[bool, typer.Option(help="first rewrite every shard, statistic and side file that fails its "
                                              "checks, with the teacher checkpoint that made the cache")] = False,
) -> None:
    """Check every file and array of a cache, re-run the live teacher on random cached views; exit 1 on any
    mismatch."""
    from pipeline.teacher.verify import repair_cache

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


METHOD_HELP = (f"method spec NAME[:key=value,...]; repeat to compose one combination; NAME one of "
               f"{', '.join(list_methods())} (`distillery methods` lists their options)")


def combination(spec: str) -> list[str]:
    """`ce+kd:T=2,alpha=0.5` -> [`ce`, `kd:T=2,alpha=0.5`]: a `+` before a method name joins two methods (a
    value such as 1e+3 keeps its `+`)."""
    return [m for m in re.split(r"\+(?=[A-Za-z_])", spec) if m]


@app.command("train")
def train_cmd(
    ctx: typer.Context,
    cache: Annotated[Optional[str], typer.Option(help="teacher cache directory or URL (distillery cache; default: the "
                                                       "--sweep file's)")] = None,
    student: Annotated[Optional[list[str]], typer.Option(help="timm model name; repeat to train several "
                                                              "students")] = None,
    method: Annotated[Optional[list[str]], typer.Option(help=METHOD_HELP)] = None,
    combo: Annotated[Optional[list[str]], typer.Option(help="one more method combination, its methods joined by "
                                                            "+ (ce+kd:T=2); repeat: every --student is trained "
                                                            "with every combination")] = None,
    sweep: Annotated[Optional[Path], typer.Option(help="a sweep file (TOML): the train-students parameters of "
                                                       "deploy/nightly.toml (cache, out, students, a [settings] table "
                                                       "and its [settings.optim]); options given here override its "
                                                       "settings")] = None,
    out: Annotated[Optional[str], typer.Option(help="run directory or fsspec URL (several runs: one subdirectory "
                                                    "each; default: the --sweep file's)")] = None,
    epochs: Annotated[int, Declared(RunSettings, "epochs")] = default_of(RunSettings, "epochs"),
    seed: Annotated[int, Declared(RunSettings, "seed")] = default_of(RunSettings, "seed"),
    online_teacher: Annotated[bool, Declared(RunSettings, "online_teacher")]
    = default_of(RunSettings, "online_teacher"),
    resume: Annotated[bool, Declared(RunSettings, "resume")] = default_of(RunSettings, "resume"),
    batch_size: Annotated[int, Declared(RunSettings, "batch_size")] = default_of(RunSettings, "batch_size"),
    optimizer: Annotated[Optimizer, Declared(OptimConfig, "optimizer")] = default_of(OptimConfig, "optimizer"),
    lr: Annotated[float, Declared(OptimConfig, "lr")] = default_of(OptimConfig, "lr"),
    weight_decay: Annotated[float, Declared(OptimConfig, "weight_decay")] = default_of(OptimConfig, "weight_decay"),
    warmup_epochs: Annotated[float, Declared(OptimConfig, "warmup_epochs")] = default_of(OptimConfig, "warmup_epochs"),
    clip_grad: Annotated[Optional[float], Declared(OptimConfig, "clip_grad")] = default_of(OptimConfig, "clip_grad"),
    input_size: Annotated[Optional[int], Declared(RunSettings, "input_size")] = default_of(RunSettings, "input_size"),
    workers: Annotated[int, Declared(RunSettings, "workers")] = default_of(RunSettings, "workers"),
    device: Annotated[str, Device()] = default_of(RunSettings, "device"),
    on_bad_image: Annotated[OnBadImage, Declared(RunSettings, "on_bad_image")]
    = default_of(RunSettings, "on_bad_image"),
    allow_untrained_classifier: Annotated[bool, typer.Option(help="train a method combination that leaves the "
                                                                  "classifier untrained (refused otherwise)")] = False,
    nproc: Annotated[int, typer.Option(help="train each student with this many DDP processes (torchrun on this "
                                            "machine, outside the Prefect flow; --batch-size is per process)")] = 1,
) -> None:
    """Train students from a teacher cache (Prefect flow; under torchrun or with --nproc N, DDP without the flow):
    every --student with every method combination (or a --sweep file's), in one flow run; prints a comparison
    table."""
    from flows.params import SweepFile
    from flows.train_students import plan_sweep, train_students
    from pipeline.cache.reader import TeacherCache
    from pipeline.object_store import is_url
    from pipeline.preflight import completed_run, teacher_near_chance, untrained_classifier
    from pipeline.train.config import StudentSpec, TrainError
    from pipeline.train.ddp import under_torchrun

    plan = SweepFile.load(sweep) if sweep is not None else SweepFile()
    # A --sweep file's settings (the defaults without one), overridden by the settings options given here.
    settings = plan.settings.with_options(**{
        name: value for name, value in ctx.params.items()
        if name in RunSettings.option_names() and ctx.get_parameter_source(name).name == "COMMANDLINE"})
    combinations = ([list(method)] if method else []) + [combination(c) for c in combo or []]
    if student and not combinations:
        raise TrainError(f"student {student[0]} has no --method; give at least one, e.g. --method ce")
    students = plan.students + [StudentSpec(student=name, methods=m) for name in student or [] for m in combinations]
    cache = cache or plan.cache
    out = out or plan.out
    out = out if out is None or is_url(out) else str(Path(out))  # a local path normalised, as a Path option did
    if cache is None or out is None:
        raise TrainError(f"give --{'cache' if cache is None else 'out'} (or a --sweep file that sets it)")
    if not students:
        raise TrainError("no student given; pass --student TIMM_NAME --method ce (or a --sweep file with students)")
    warn(untrained_classifier(students, allow_untrained_classifier))
    if nproc != 1 or under_torchrun():
        train_distributed(str(cache), students, str(out), settings, nproc)
        return
    configs = plan_sweep(str(cache), students, str(out), settings)  # bad input is one line here, not a failed run
    done = {c.out: completed_run(c) for c in configs}
    for run_dir, summary in done.items():
        if summary is not None:
            console.print(f"{run_dir}: already complete ({summary.epochs} epochs, val accuracy "
                          f"{summary.val_accuracy:.2%}); nothing to train")
    if all(done.values()):
        print_students(f"students trained from {cache} (already complete)", list(done.values()))
        return
    if any(spec.needs for s in students for spec in s.methods):  # ce never reads the teacher's targets
        warn(teacher_near_chance(TeacherCache(cache)))
    start_temporary_server()
    with show_progress():
        summaries = train_students(str(cache), students, str(out), settings, sweep=plan.sweep,
                                   task_timeout=plan.task_timeout, checked=True)
    print_students(f"students trained from {cache}", summaries)
    report_skipped("the val split", summaries[0].val_skipped_images or [])


@app.command("methods")
def methods_cmd(
    name: Annotated[Optional[str], typer.Argument(help="only this method (default: all)")] = None,
) -> None:
    """List the distillation methods: what each needs from the cache (and the `distillery cache` option that adds
    it), whether it trains the classifier, and its options with their defaults and meaning."""
    from pipeline.cache.targets import TARGETS
    from pipeline.methods import method_class

    table = Table(title="methods: compose with --method NAME[:key=value,...] (README, 'Methods')", title_justify="left",
                  show_lines=True)
    for column in ("method", "needs from the cache (cache option)", "trains classifier", "options (default: meaning)"):
        table.add_column(column)
    for method in [name] if name else list_methods():
        cls = method_class(method)  # an unknown name is one line listing the known ones
        summary = re.split(r"(?<=\.)\s", " ".join((cls.__doc__ or "").split()).replace("``", ""))[0]  # 1st sentence
        needs = "\n".join(f"{TARGETS[t].description} ({TARGETS[t].cache_option})" for t in sorted(cls.needs)) or "-"
        helps = cls.option_help()
        options = "\n".join(f"{k}={v}: {helps[k]}" for k, v in cls.options().items()) or "-"
        table.add_row(Text(f"{method}\n", style="bold") + Text(summary, style="dim"), needs,
                      "yes" if cls.trains_classifier({}) else "no", options)
    console.print(table)


@app.command("experiments")
def experiments_cmd() -> None:
    """List the named experiments (`distillery experiment NAME`): teacher, cache, student and each row's methods."""
    from pipeline.experiments import EXPERIMENTS, SUITES

    table = Table(title="experiments: distillery experiment NAME [--row ROW ...]", title_justify="left",
                  show_lines=True)
    for column in ("experiment", "teacher", "cache", "student"):
        table.add_column(column, ratio=1)
    table.add_column("rows: methods (as --combo takes them)", ratio=2, overflow="fold")
    for e in EXPERIMENTS.values():
        objective = "" if e.teacher_objective == "supervised" else f", {e.teacher_objective}"
        cache = ", ".join([f"{e.labelled or 'all'} samples", f"{e.views} views",
                           *(f"{k}={v}" for k, v in e.cache_options.items())])
        table.add_row(Text(f"{e.name}\n", style="bold") + Text(e.description, style="dim"),
                      f"{e.teacher} on {e.dataset}, {e.teacher_epochs} epochs{objective}", cache,
                      f"{e.student}, {e.epochs} epochs", "\n".join(f"{label}: {'+'.join(m)}"
                                                                   for label, m in e.rows.items()))
    for suite, parts in SUITES.items():
        table.add_row(Text(suite, style="bold"), "-", "-", "-", "\n".join(
            f"{part}: {', '.join(rows)}" for part, rows in parts))
    console.print(table)


def train_distributed(cache: str, students: "list[StudentSpec]", out: str, settings: "RunSettings",
                      nproc: int) -> None:
    """DDP students (README "Distributed students"): under torchrun every rank trains each student in turn
    and rank 0 prints the table; with --nproc N this process checks the sweep, then runs torchrun per student."""
    from pipeline.train.config import TrainError, plan_runs
    from pipeline.train.ddp import World, under_torchrun
    from pipeline.train.launch import launch
    from pipeline.train.loop import check_runs, train_student

    world = World.from_env()
    if nproc < 1:
        raise TrainError(f"--nproc {nproc}: give a number of processes >= 1")
    if under_torchrun() and nproc not in (1, world.size):
        raise TrainError(f"--nproc {nproc} under torchrun, whose world size is {world.size}: leave --nproc out "
                         f"(torchrun's --nproc-per-node decides)")
    configs = plan_runs(cache, students, out, settings)
    check_runs(configs, world.size if under_torchrun() else nproc)  # bad input is one line, before any process starts
    if under_torchrun():
        with show_progress() if world.is_main else nullcontext():
            summaries = [train_student(config) for config in configs]
    else:
        summaries = [launch(config, nproc) for config in configs]
    if world.is_main:
        print_students(f"students trained from {cache} by {summaries[0].world_size} processes", summaries)
        report_skipped("the val split", summaries[0].val_skipped_images or [])


@app.command("runs")
def runs_cmd(
    rundirs: Annotated[list[str], typer.Argument(help="run directories or fsspec URLs, or folders holding them "
                                                      "(searched recursively for summary.json)")],
    markdown: Annotated[bool, typer.Option(help="print a markdown table instead")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="also plot accuracy vs training time into this PNG")] = None,
) -> None:
    """Compare student runs; runs that differ only by seed are one row (mean ± std over the seeds)."""
    from pipeline.report.figures import accuracy_vs_time
    from pipeline.report.markdown import markdown_table
    from pipeline.train.runs import compare_runs, formatted_rows, group_label, group_rows

    groups = compare_runs(rundirs)
    rows = group_rows(groups)
    table = formatted_rows(rows)
    if markdown:
        print(markdown_table(list(table[0]), [list(r.values()) for r in table]))
    else:
        print_table(f"{sum(len(g.runs) for g in groups)} runs, {len(groups)} settings", table)
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot.write_bytes(accuracy_vs_time(
            [group_label(r) for r in rows], [r.mean.train_seconds for r in rows], [r.std.train_seconds for r in rows],
            [r.mean.val_accuracy for r in rows], [r.std.val_accuracy for r in rows]))
        Console(stderr=True).print(f"plot written to {plot}")  # stderr: stdout may be a markdown table


def print_students(title: str, summaries: "list[TrainSummary]") -> None:
    """The comparison table of a sweep, formatted for people (the flow's artifact keeps raw numbers)."""
    from flows.train_students import sweep_rows

    rows = [{**r, "val_accuracy": f"{r['val_accuracy']:.2%}", "train_seconds": f"{r['train_seconds']:.1f} s",
             "mean_step_seconds": f"{1000 * r['mean_step_seconds']:.1f} ms", "params": f"{r['params']:,}"}
            for r in sweep_rows(summaries)]
    print_table(title, rows)


def print_experiment(name: str, result: "ExperimentResult", markdown: bool) -> None:
    """An experiment's results: a rich table, or the markdown the README holds."""
    from pipeline.experiments import get_experiment, results_markdown

    experiment = get_experiment(name)
    teacher = result.teacher
    accuracy = "no head" if teacher.val_accuracy is None else f"val accuracy {teacher.val_accuracy:.2%}"
    console.print(f"teacher {experiment.teacher} ({'reused' if teacher.reused else 'fitted'}): {accuracy}; "
                  f"cache {result.cache.cache}")
    if markdown:
        console.print(results_markdown(result.rows), soft_wrap=True, highlight=False)
        return
    rows = [{"methods": r.methods, "accuracy": f"{r.accuracy:.2f} ± {r.std:.2f}", "seeds": r.seeds,
             "train_s": f"{r.train_s:.0f}", "step_ms": f"{r.step_ms:.1f}"} for r in result.rows]
    print_table(f"{experiment.description} (val accuracy %)", rows)


@app.command("bench")
def bench_cmd(
    quick: Annotated[bool, typer.Option(help="fewer samples, one round (about 2 minutes on 2 CPU cores)")]
    = default_of(run_benchmarks, "quick"),
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the results here")] = None,
    device: Annotated[str, Device()] = default_of(run_benchmarks, "device"),
) -> None:
    """Print the benchmarks: teacher pass vs bare forward; student step time and peak memory per method; DDP on
    2 CPU processes vs 1; cache bytes per sample-view and the pass + statistics at N, 2N, 4N samples."""
    with show_progress():
        results = run_benchmarks(quick=quick, device=device)
    passes = results.teacher_pass
    rows = [{"teacher": r.teacher, "inputs": f"{r.samples} {r.dataset} x {r.views} views",
             "device": r.device, "pass images/s": f"{r.pass_images_per_s:.0f}",
             "bare forward images/s": f"{r.bare_images_per_s:.0f}", "pass / bare": f"{r.pass_over_bare:.2f}"}
            for r in passes]
    print_table(f"teacher pass vs a bare forward loop over the same rendered inputs (batch {passes[0].batch_size}, "
                f"best of {passes[0].repeats} interleaved)", rows)

    def ratio(value: float | None) -> str:  # None: the reference configuration was not benchmarked
        return "-" if value is None else f"{value:.2f}"

    for steps in (results.student_steps, *results.tcs_vs_online_kd):
        rows = [{"config": r.config, "ms / step": f"{r.step_ms:.1f}", "samples/s": f"{r.samples_per_s:.0f}",
                 "stream / this": f"{r.stream_over_config:.1f}", "/ ce": ratio(r.over_ce),
                 "/ ce+kd": ratio(r.over_kd), "/ online kd": ratio(r.over_online_kd),
                 "RSS MiB: peak (run's)": f"{r.peak_rss_mb:.0f} ({r.run_rss_mb:.0f})",
                 "RSS / online kd: peak (run's)": f"{ratio(r.rss_over_online_kd)} ({ratio(r.run_rss_over_online_kd)})"}
                for r in steps.rows]
        print_table(f"student {steps.student} step time from the cache of {steps.teacher} (teacher forward = "
                    f"{steps.teacher_over_student_flops:.1f}x the student's FLOPs; best of {steps.rounds} "
                    f"round(s)); the cache stream alone: {steps.stream_samples_per_s:.0f} samples/s (batch "
                    f"{steps.batch_size}, {steps.workers} worker(s)); run's RSS: the peak less the RSS before "
                    f"the run began", rows)
    ddp = results.ddp
    print_table(f"DDP: student {ddp.student} (ce+kd) on {ddp.cpus} CPUs, {ddp.num_samples} samples x "
                f"{ddp.epochs} epoch(s), batch {ddp.batch_size_per_process} per process, best of {ddp.rounds} "
                f"round(s); / 1 process: over the first row",
                [{"processes": r.processes, "threads each": r.threads, "samples / s": f"{r.samples_per_s:.0f}",
                  "/ 1 process": f"{r.over_one:.2f}"} for r in ddp.rows])
    print_storage_bench(results.storage)
    if json_out is not None:
        json_out.write_text(json.dumps(results.model_dump(mode="json"), indent=2))


def print_storage_bench(storage: "CacheScaling") -> None:
    """The storage tables of `distillery bench` (`pipeline.bench_storage`)."""
    rows = [{"samples": r.samples, "pass + statistics s": f"{r.seconds:.1f}",
             "samples / first": f"{r.samples_over_first:.0f}", "time / first": f"{r.time_over_first:.2f}",
             "peak RSS MiB": f"{r.peak_rss_bytes / 2**20:.0f}", "RSS / first": f"{r.rss_over_first:.2f}"}
            for r in storage.rows]
    print_table(f"teacher pass + statistics of {storage.teacher} on {storage.dataset}, each in a fresh process "
                f"(time should grow with the samples, memory stay flat)", rows)
    b = storage.bytes
    rows = [{"array": r.array, "dtype": r.dtype, "bytes / sample-view": f"{r.bytes:.1f}"} for r in b.rows]
    rows.append({"array": "total", "dtype": "", "bytes / sample-view": f"{b.total:.1f}"})
    rows.append({"array": f"logits (top-{b.k}) / TinyViT's 4k+4 = {b.tinyvit}", "dtype": "",
                 "bytes / sample-view": f"{b.logits:.1f} ({b.logits_over_tinyvit:.2f}x)"})
    print_table(f"bytes per sample-view of the {b.samples}-sample cache ({b.views} views), as stored", rows)
    speed = storage.stream_samples_per_s
    console.print(f"student stream over that cache: {speed.format_2:.0f} samples/s, its format-1 twin (rows also "
                  f"in the blocks) {speed.format_1:.0f} samples/s: {storage.stream_format_2_over_1:.2f}x")


@app.command("experiment")
def experiment_cmd(
    name: Annotated[str, typer.Argument(help="an experiment or suite (`distillery experiments` lists them)")],
    seed: Annotated[list[int], typer.Option(help="student seed; repeat for several")] = [0, 1, 2],  # noqa: B006
    root: Annotated[Path, typer.Option(help="experiments directory (teachers, caches and runs are reused)")]
    = DEFAULT_ROOT,
    row: Annotated[Optional[list[str]], typer.Option(help="only this row (method combination); repeat")] = None,
    markdown: Annotated[bool, typer.Option(help="print the results as a markdown table")] = False,
) -> None:
    """Run a named experiment end to end (fit or reuse the teacher, cache once, train every row per seed)."""
    from flows.experiments import run_experiment
    from pipeline.experiments import suite_parts

    parts = suite_parts(name, row)  # an unknown name or row is one line, before any flow starts
    start_temporary_server()
    for part in parts:  # a suite (e.g. tcs) runs its experiments one after the other
        with show_progress():
            result = run_experiment(part.name, list(seed), str(root), list(part.rows))
        print_experiment(part.name, result, markdown)


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option(help="demo directory; a teacher, cache and runs found here are reused")]
    = Path("runs/demo"),
) -> None:
    """The main job on digits: fit (or reuse) a teacher, cache it once, train a CE and a CE+KD student."""
    from flows.experiments import run_experiment

    start = time.perf_counter()
    start_temporary_server()
    with show_progress():
        result = run_experiment("digits-demo", [0], str(out))
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s; everything is under {out}")
    print_experiment("digits-demo", result, markdown=False)


def fail(message: str) -> None:
    """The CLI's one error line on stderr, exit code 2."""
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)


@app.command("deploy")
def deploy_cmd(
    spec: Annotated[Path, typer.Argument(help="deployment spec (TOML), e.g. deploy/nightly.toml")],
    check: Annotated[bool, typer.Option(help="only check the spec and list its deployments")] = False,
    limit: Annotated[Optional[int], typer.Option(help="most flow runs at once in this process")] = None,
) -> None:
    """Serve the spec's flows as deployments (schedules, event triggers) against PREFECT_API_URL."""
    from flows.deploy import load_spec, serve_spec

    if check:
        loaded = load_spec(spec)
        rows = [{"deployment": f"{d.flow_name}/{d.name}", "schedule": ", ".join(
            str(s.schedule.cron if hasattr(s.schedule, "cron") else s.schedule.interval) for s in d.schedules)
            or "-", "triggers": len(d.triggers)} for d in loaded.deployments]
        print_table(f"{spec}: {len(rows)} deployments", rows)
        return
    serve_spec(spec, limit)


def main() -> None:
    # typer vendors click as typer._click; its usage errors would otherwise be a multi-line panel.
    from typer._click.exceptions import ClickException, NoArgsIsHelpError

    from pipeline.errors import DistilleryError

    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError:
        app()  # the normal help screen, as `distillery` alone always printed
    except DistilleryError as e:
        fail(str(e))
    except ClickException as e:  # an option typer cannot parse (`--views x`), an unknown command or option
        ctx = getattr(e, "ctx", None)
        # typer checks a Literal choice through pydantic, whose message starts "Value error, ".
        fail(f"{e.format_message().replace('Value error, ', '')} (see `{ctx.command_path if ctx else 'distillery'} "
             f"--help`)")
    except typer.Abort:  # Ctrl-C outside a flow
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
