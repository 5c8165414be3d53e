"""The `distillery` command line (docs/ARCHITECTURE.md §10: these spellings are a contract scripts rely on)."""

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from flows.server import start_temporary_server
from pipeline import progress

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's console logs would tear through the progress display and print a traceback before the one-line
# error of bad input; the server keeps every log line (flow, task and library) and the CLI prints results.
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")

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


STORE_HELP = ("per-sample targets kept, comma-separated from logits,pooled,gaussian,featmaps (default: every one the "
              "other options produce); statistics need their rows: no pooled, no PCA, class means or LSH")
ON_BAD_IMAGE_HELP = ("an undecodable file in an image folder (any split, checked before any work): 'fail' names "
                     "it, 'skip' leaves it out and reports how many")


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
    dataset: Annotated[str, typer.Option(help="digits | fashion-mnist[:DIR] | imagefolder:DIR")],
    model: Annotated[str, typer.Option(help="timm model name")],
    out: Annotated[Path, typer.Option(help="checkpoint path to write")],
    epochs: Annotated[int, typer.Option(help="training epochs")] = 10,
    subset: Annotated[Optional[int], typer.Option(help="seeded, stratified subset of the train split")] = None,
    seed: int = 0,
    input_size: Annotated[Optional[int], typer.Option(help="render size (default 32 for small images)")] = None,
    batch_size: int = 128,
    lr: float = 2e-3,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
    on_bad_image: Annotated[str, typer.Option(help=ON_BAD_IMAGE_HELP)] = "fail",
    objective: Annotated[str, typer.Option(help="supervised (labels) | ssl (SimCLR two-view NT-Xent, no labels; "
                                                "cache it with --teacher-head none)")] = "supervised",
    temperature: Annotated[float, typer.Option(help="NT-Xent temperature (ssl)")] = 0.2,
) -> None:
    """Train a teacher locally (no pretrained weights can be downloaded) and save a checkpoint (Prefect flow)."""
    from flows.fit_teacher import fit_teacher_flow
    from pipeline.train.fit import FitConfig, check_fit

    cfg = FitConfig(dataset=dataset, model=model, out=str(out), epochs=epochs, subset=subset, seed=seed,
                    input_size=input_size, batch_size=batch_size, lr=lr, device=device, on_bad_image=on_bad_image,
                    objective=objective, temperature=temperature)
    check_fit(cfg)  # one line here, not a failed flow run
    start_temporary_server()
    with show_progress():
        result = fit_teacher_flow(cfg)
    report_skipped(dataset, result["skipped_images"])
    accuracy = "no head (self-supervised)" if result["val_accuracy"] is None else \
        f"val accuracy {result['val_accuracy']:.4f}"
    console.print(f"teacher {model}: {accuracy} after {epochs} epochs ({result['train_seconds']:.1f} s) -> "
                  f"{result['out']}")


@app.command("cache")
def cache_cmd(
    dataset: Annotated[str, typer.Option(help="digits | fashion-mnist[:DIR] | imagefolder:DIR")],
    teacher: Annotated[str, typer.Option(help="timm model name of the teacher")],
    out: Annotated[Path, typer.Option(help="cache directory")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="teacher checkpoint (distillery fit-teacher)")] = None,
    teacher_head: Annotated[str, typer.Option(help="'keep' or 'none' (features and statistics only)")] = "keep",
    views: Annotated[int, typer.Option(help="augmented views per sample, besides the clean view 0")] = 2,
    view_seed: int = 0,
    logits: Annotated[str, typer.Option(help="dense | topk:K")] = "dense",
    tap: Annotated[str, typer.Option(help="stage for Gaussian stats: auto | none | name | index")] = "auto",
    grid: Annotated[int, typer.Option(help="G x G grid of Gaussian cells")] = 1,
    featmaps: Annotated[bool, typer.Option(help="also store the tapped feature maps (large)")] = False,
    lsh_bits: Annotated[int, typer.Option(help="LSH bits per sample (multiple of 8; 0: none) for eLSH and "
                                               "`distillery neighbors`")] = 0,
    teacher_tail: Annotated[int, typer.Option(help="save the N teacher stages ending at the tap for ScaleKD's "
                                                    "tpp=true (needs --featmaps)")] = 0,
    store: Annotated[Optional[str], typer.Option(help=STORE_HELP)] = None,
    subset: Annotated[Optional[int], typer.Option(help="seeded, stratified subset")] = None,
    subset_seed: int = 0,
    split: str = "train",
    shard_size: int = 1024,
    batch_size: int = 256,
    input_size: Optional[int] = None,
    cka_source: Annotated[str, typer.Option(help="logits | features | auto (logits if stored)")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
    on_bad_image: Annotated[str, typer.Option(help=ON_BAD_IMAGE_HELP)] = "fail",
    task_runner_spec: Annotated[str, typer.Option("--task-runner", help="where shard tasks run: thread | dask (a local cluster of "
                                                  "--dask-workers processes) | tcp://SCHEDULER:PORT")] = "thread",
    dask_workers: Annotated[int, typer.Option(help="worker processes of --task-runner dask")] = 2,
) -> None:
    """Run the teacher once over a dataset and store everything students need (Prefect flow)."""
    from pipeline.cache.lock import cache_lock
    from pipeline.teacher.plan import CacheRequest, check_request

    if teacher_head not in ("keep", "none"):
        raise typer.BadParameter("--teacher-head must be 'keep' or 'none'")
    request = CacheRequest(dataset=dataset, teacher=teacher, out=str(out), split=split, subset=subset,
                           subset_seed=subset_seed, checkpoint=str(checkpoint) if checkpoint else None,
                           teacher_head=teacher_head == "keep", views=views, view_seed=view_seed, logits=logits,
                           tap=tap, grid=grid, featmaps=featmaps, teacher_tail=teacher_tail, store=store,
                           lsh_bits=lsh_bits,
                           input_size=input_size, shard_size=shard_size, batch_size=batch_size,
                           cka_source=cka_source, device=device, on_bad_image=on_bad_image)
    manifest = check_request(request)  # bad input is one line here, before the flow (and anything) starts
    report_skipped(dataset, manifest.dataset.get("skipped", []))
    from flows.cache_teacher import run_cache_teacher, task_runner  # Prefect loads once the request is good

    task_runner(task_runner_spec, dask_workers)  # an unknown runner is one line too
    start_temporary_server()
    with cache_lock(out), show_progress():  # one writer per cache: a second gets one line
        result = run_cache_teacher(request, task_runner_spec, dask_workers)
    console.print(f"cached {result['num_samples']} samples into {result['cache']}: teacher pass "
                  f"{result['images']} images in {result['pass_seconds']:.1f} s = "
                  f"{result['images_per_second']:.0f} images/s ({result['skipped_shards']} shards reused)")


@app.command("stats")
def stats_cmd(
    cache: Path,
    cka_source: Annotated[str, typer.Option(help="logits | features | auto (logits if stored)")] = "auto",
    lsh_bits: Annotated[Optional[int], typer.Option(help="rebuild LSH planes, codes and index with this many "
                                                         "bits (0: remove them; default: the cache's)")] = None,
) -> None:
    """Recompute dataset-level statistics from a complete cache (no teacher)."""
    from pipeline.cache.statistics import recompute_statistics

    info = recompute_statistics(str(cache), cka_source=cka_source, lsh_bits=lsh_bits)
    console.print_json(json.dumps(info))


@app.command("inspect")
def inspect_cmd(
    cache: Path,
    report: Annotated[Optional[Path], typer.Option(help="also write a self-contained HTML report (figures "
                                                        "included) to this file")] = None,
) -> None:
    """Print the manifest summary and every array's shape, dtype, bytes and a few statistics."""
    from pipeline.cache.store import TeacherCache
    from pipeline.cache.summary import (array_rows, featmap_rows, human_bytes, pca_summary,
                                        teacher_accuracy_per_view)

    start = time.perf_counter()
    c = TeacherCache(cache, require_complete=False)
    m = c.manifest
    console.print(f"[bold]{cache}[/bold]  status={m.status}  format={m.format_version}  created={m.created}")
    console.print(f"teacher   {m.teacher['model']}  checkpoint sha256={str(m.teacher['checkpoint_sha256'])[:12]}  "
                  f"input={m.teacher['input_size']}px  taps={m.teacher['taps']}  head={m.teacher['head']}")
    console.print(f"dataset   {m.dataset['name']} ({m.dataset['split']})  N={c.num_samples}  "
                  f"classes={c.num_classes}  fingerprint={m.dataset['fingerprint'][:12]}")
    console.print(f"views     {c.num_views} stored (view 0 clean + {c.num_views - 1} x {m.views['recipe']}, "
                  f"seed {m.views['seed']})")
    console.print(f"storage   logits={m.storage['logits']}  grid={m.storage['grid']}  shards={len(m.shards)} "
                  f"x {m.storage['shard_size']} samples  lsh_bits={m.storage['lsh_bits']}")
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
        console.print(f"teacher tail  {tail['file']}  {tail['family']} stages {', '.join(tail['stages'])}  "
                      f"{human_bytes(tail['bytes'])}  sha256={tail['sha256'][:12]}")
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
    cache: Path,
    sample_id: Annotated[int, typer.Argument(metavar="ID", help="sample id (as stored in samples/ids)")],
    k: Annotated[int, typer.Option(help="number of neighbours")] = 8,
) -> None:
    """A sample's nearest neighbours in the teacher's LSH space (Hamming distance, faiss index)."""
    from pipeline.cache.neighbors import lsh_neighbors
    from pipeline.cache.store import TeacherCache

    found = lsh_neighbors(TeacherCache(cache), sample_id, k)
    q = found.query
    rows = [{"rank": i + 1, "id": n.id, "label": n.class_name, "hamming": n.hamming}
            for i, n in enumerate(found.neighbors)]
    print_table(f"{len(rows)} nearest neighbours of sample {q.id} (label {q.class_name}) over {found.bits} "
                f"LSH bits", rows, ["rank", "id", "label", "hamming"])


@app.command("verify")
def verify_cmd(
    cache: Path,
    samples: Annotated[int, typer.Option(help="random (id, view) pairs to re-run through the teacher")] = 64,
    seed: Annotated[int, typer.Option(help="seed of the pair sample")] = 0,
    rtol: Annotated[float, typer.Option(help="tolerance, relative to each array's largest stored value "
                                             "(default: four float16 units; a cache made under bf16 on a GPU and "
                                             "verified on CPU needs ~0.03)")] = 2.0 ** -8,
    device: str = "cpu",
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


@app.command("train")
def train_cmd(
    cache: Annotated[Path, typer.Option(help="teacher cache directory (distillery cache)")],
    student: Annotated[list[str], typer.Option(help="timm model name; repeat to train several students")],
    method: Annotated[list[str], typer.Option(help="method spec (ce, kd, kd:T=2,alpha=0.5, dkd, fitnet); "
                                                   "repeat to compose")],
    out: Annotated[Path, typer.Option(help="run directory (several students: one subdirectory each)")],
    epochs: int = 10,
    seed: int = 0,
    online_teacher: Annotated[bool, typer.Option(help="compute the targets live from the teacher (the cached "
                                                      "run's twin, for comparison)")] = False,
    resume: Annotated[bool, typer.Option(help="continue from the run directory's checkpoint")] = False,
    batch_size: int = 64,
    optimizer: Annotated[str, typer.Option(help="adamw | sgd")] = "adamw",
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1.0,
    clip_grad: Annotated[Optional[float], typer.Option(help="clip the gradient norm to this value")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="student render size (default: the teacher's)")] = None,
    workers: Annotated[int, typer.Option(help="DataLoader workers streaming the cache")] = 1,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
    on_bad_image: Annotated[str, typer.Option(help="an undecodable val image of an image folder: 'fail' names "
                                                    "it, 'skip' leaves it out (summary.json lists it)")] = "fail",
) -> None:
    """Train students from a teacher cache (Prefect flow); prints a comparison table."""
    from flows.params import Student, TrainSettings
    from flows.train_students import plan_sweep, train_students
    from pipeline.train.config import RunSettings
    from pipeline.train.optim import OptimConfig

    optim = OptimConfig(optimizer=optimizer, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                        clip_grad=clip_grad)
    settings = RunSettings(epochs=epochs, seed=seed, batch_size=batch_size, optim=optim, input_size=input_size,
                           online_teacher=online_teacher, workers=workers, device=device, resume=resume,
                           on_bad_image=on_bad_image)
    students = [Student(student=name, methods=list(method)) for name in student]
    params = TrainSettings.of(settings)
    plan_sweep(str(cache), students, str(out), params)  # bad input is one line here, not a failed flow run
    start_temporary_server()
    with show_progress():
        summaries = train_students(str(cache), students, str(out), params)
    print_students(f"students trained from {cache}", summaries)
    report_skipped("the val split", summaries[0]["val_skipped_images"])


@app.command("runs")
def runs_cmd(
    rundirs: Annotated[list[Path], typer.Argument(help="run directories, or folders holding them (searched "
                                                       "recursively for summary.json)")],
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
            [group_label(r) for r in rows], [r["mean"]["train_seconds"] for r in rows],
            [r["std"]["train_seconds"] for r in rows], [r["mean"]["val_accuracy"] for r in rows],
            [r["std"]["val_accuracy"] for r in rows]))
        Console(stderr=True).print(f"plot written to {plot}")  # stderr: stdout may be a markdown table


def print_students(title: str, summaries: list[dict]) -> None:
    """The comparison table of a sweep, formatted for people (the flow's artifact keeps raw numbers)."""
    from flows.train_students import sweep_rows

    rows = [{**r, "val_accuracy": f"{r['val_accuracy']:.2%}", "train_seconds": f"{r['train_seconds']:.1f} s",
             "mean_step_seconds": f"{1000 * r['mean_step_seconds']:.1f} ms", "params": f"{r['params']:,}"}
            for r in sweep_rows(summaries)]
    print_table(title, rows)


def print_experiment(name: str, result: dict, markdown: bool) -> None:
    """An experiment's results: a rich table, or the markdown the README holds."""
    from pipeline.experiments import get_experiment, results_markdown

    experiment = get_experiment(name)
    teacher = result["teacher"]
    accuracy = "no head" if teacher["val_accuracy"] is None else f"val accuracy {teacher['val_accuracy']:.2%}"
    console.print(f"teacher {experiment.teacher} ({'reused' if teacher['reused'] else 'fitted'}): {accuracy}; "
                  f"cache {result['cache']['cache']}")
    if markdown:
        console.print(results_markdown(result["rows"]), soft_wrap=True, highlight=False)
        return
    rows = [{"methods": r["methods"], "accuracy": f"{r['accuracy']:.2f} ± {r['std']:.2f}", "seeds": r["seeds"],
             "train_s": f"{r['train_s']:.0f}", "step_ms": f"{r['step_ms']:.1f}"} for r in result["rows"]]
    print_table(f"{experiment.description} (val accuracy %)", rows)


@app.command("bench")
def bench_cmd(
    quick: Annotated[bool, typer.Option(help="fewer samples, one round (about 2 minutes on 2 CPU cores)")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the results here")] = None,
    device: str = "auto",
) -> None:
    """Print the benchmarks: teacher pass vs bare forward; student step time and peak memory per method;
    cache bytes per sample-view and the pass + statistics at N, 2N, 4N samples."""
    from pipeline.bench import run_benchmarks
    from pipeline.bench_storage import bench_cache_scaling

    with show_progress():
        results = run_benchmarks(quick=quick, device=device)
        results["storage"] = bench_cache_scaling(samples=250 if quick else 2000, device=device)
    passes, steps = results["teacher_pass"], results["student_steps"]
    rows = [{"teacher": r["teacher"], "inputs": f"{r['samples']} {r['dataset']} x {r['views']} views",
             "device": r["device"], "pass images/s": f"{r['pass_images_per_s']:.0f}",
             "bare forward images/s": f"{r['bare_images_per_s']:.0f}", "pass / bare": f"{r['pass_over_bare']:.2f}"}
            for r in passes]
    print_table(f"teacher pass vs a bare forward loop over the same rendered inputs (batch {passes[0]['batch_size']}, "
                f"best of {passes[0]['repeats']} interleaved)", rows)

    def ratio(value: float | None) -> str:  # None: the reference configuration was not benchmarked
        return "-" if value is None else f"{value:.2f}"

    for steps in (steps, results["tcs_vs_online_kd"]):
        rows = [{"config": r["config"], "ms / step": f"{r['step_ms']:.1f}", "/ ce": ratio(r["over_ce"]),
                 "/ ce+kd": ratio(r["over_kd"]), "/ online kd": ratio(r["over_online_kd"]),
                 "peak RSS MiB": f"{r['peak_rss_mb']:.0f}", "RSS / online kd": ratio(r["rss_over_online_kd"])}
                for r in steps["rows"]]
        print_table(f"student {steps['student']} step time from the cache of {steps['teacher']} (teacher forward = "
                    f"{steps['teacher_over_student_flops']:.1f}x the student's FLOPs; best of {steps['rounds']} "
                    f"round(s))", rows)
    print_storage_bench(results["storage"])
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=2))


def print_storage_bench(storage: dict) -> None:
    """The storage tables of `distillery bench` (`pipeline.bench_storage`)."""
    rows = [{"samples": r["samples"], "pass + statistics s": f"{r['seconds']:.1f}",
             "samples / first": f"{r['samples_over_first']:.0f}", "time / first": f"{r['time_over_first']:.2f}",
             "peak RSS MiB": f"{r['peak_rss_bytes'] / 2**20:.0f}", "RSS / first": f"{r['rss_over_first']:.2f}"}
            for r in storage["rows"]]
    print_table(f"teacher pass + statistics of {storage['teacher']} on {storage['dataset']}, each in a fresh process "
                f"(time should grow with the samples, memory stay flat)", rows)
    b = storage["bytes"]
    rows = [{"array": r["array"], "dtype": r["dtype"], "bytes / sample-view": f"{r['bytes']:.1f}"} for r in b["rows"]]
    rows.append({"array": "total", "dtype": "", "bytes / sample-view": f"{b['total']:.1f}"})
    rows.append({"array": f"logits (top-{b['k']}) / TinyViT's 4k+4 = {b['tinyvit']}", "dtype": "",
                 "bytes / sample-view": f"{b['logits']:.1f} ({b['logits_over_tinyvit']:.2f}x)"})
    print_table(f"bytes per sample-view of the {b['samples']}-sample cache ({b['views']} views), as stored", rows)
    speed = storage["stream_samples_per_s"]
    console.print(f"student stream over that cache: {speed['format 2']:.0f} samples/s, its format-1 twin (rows also "
                  f"in the blocks) {speed['format 1']:.0f} samples/s: {storage['stream_format_2_over_1']:.2f}x")


@app.command("experiment")
def experiment_cmd(
    name: Annotated[str, typer.Argument(help="digits-demo | fmnist-5k | ...")],
    seed: Annotated[list[int], typer.Option(help="student seed; repeat for several")] = [0, 1, 2],  # noqa: B006
    root: Annotated[Path, typer.Option(help="experiments directory (teachers, caches and runs are reused)")]
    = Path("runs/experiments"),
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

    from pydantic import ValidationError

    from pipeline.errors import DistilleryError

    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError:
        app()  # the normal help screen, as `distillery` alone always printed
    except DistilleryError as e:
        fail(str(e))
    except ValidationError as e:  # a parameter model's own range check (e.g. TrainSettings)
        err = e.errors()[0]
        fail(f"--{'-'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}")
    except ClickException as e:  # an option typer cannot parse (`--views x`), an unknown command or option
        ctx = getattr(e, "ctx", None)
        fail(f"{e.format_message()} (see `{ctx.command_path if ctx else 'distillery'} --help`)")
    except typer.Abort:  # Ctrl-C outside a flow
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
