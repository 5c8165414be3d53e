"""`distillery` commands of the lab (`pipeline.lab`): experiments, bench, experiment, demo."""

import json
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from flows.cli.display import console, print_table, show_progress
from flows.cli.options import Device, source_constant, source_default

if TYPE_CHECKING:
    from pipeline.lab.input_bench import InputBench
    from pipeline.lab.storage_bench import CacheScaling
    from pipeline.lab.experiments import Experiment, ExperimentResult

group = typer.Typer()
BENCH = "pipeline.lab.bench"  # its `run_benchmarks` declares the bench's defaults (read, not imported: torch)


class BenchPart(str, Enum):
    """A part of `distillery bench` that `--only` runs alone."""

    inputs = "inputs"


@group.command("experiments")
def experiments_cmd() -> None:
    """List the named experiments (`distillery experiment NAME`): teacher, cache, student and each row's methods."""
    from pipeline.lab.experiments import EXPERIMENTS, SUITES

    table = Table(title="experiments: distillery experiment NAME [--row ROW ...]", title_justify="left",
                  show_lines=True)
    for column in ("experiment", "teacher", "cache", "student"):
        table.add_column(column, ratio=1)
    table.add_column("rows: methods (as --combo takes them)", ratio=2, overflow="fold")
    for e in EXPERIMENTS.values():
        objective = "".join([f", {e.teacher_objective}" if e.teacher_objective != "supervised" else "",
                             *(f", {k}={v}" for k, v in e.teacher_fit.items())])
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


@group.command("bench")
def bench_cmd(
    quick: Annotated[bool, typer.Option(help="fewer samples, one round (minutes on 2 idle CPU cores)")]
    = source_default(BENCH, "run_benchmarks", "quick"),
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the results here")] = None,
    device: Annotated[str, Device()] = source_default(BENCH, "run_benchmarks", "device"),
    only: Annotated[Optional[BenchPart], typer.Option(help="only this part: inputs (the input pipeline on a "
                                                      "synthetic ImageNet-like folder and 12 MP photos)")] = None,
) -> None:
    """Print the benchmarks: teacher pass vs bare forward; student step time and peak memory per method; DDP on
    2 CPU processes vs 1; cache bytes per sample-view and the pass + statistics at N, 2N, 4N samples; the input
    pipeline (student stream per core beside what resnet18/50 consume, pass and first step at N, 2N, 4N)."""
    if only is BenchPart.inputs:
        from pipeline.lab.input_bench import bench_input_pipeline

        with show_progress():
            inputs = bench_input_pipeline(quick=quick, device=device)
        print_input_bench(inputs)
        if json_out is not None:
            json_out.write_text(json.dumps(inputs.model_dump(mode="json"), indent=2))
        return
    from pipeline.lab.bench import run_benchmarks

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
    print_input_bench(results.inputs)
    if json_out is not None:
        json_out.write_text(json.dumps(results.model_dump(mode="json"), indent=2))


def print_storage_bench(storage: "CacheScaling") -> None:
    """The storage tables of `distillery bench` (`pipeline.lab.storage_bench`)."""
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


def print_input_bench(inputs: "InputBench") -> None:
    """The input-pipeline tables of `distillery bench` (`pipeline.lab.input_bench`)."""
    print_table(f"cache inputs / source JPEGs ({inputs.images} images of ~400x350 px), per --inputs mode",
                [{"mode": r.mode, "cache inputs MiB": f"{r.cache_bytes / 2**20:.1f}",
                  "source MiB": f"{r.source_bytes / 2**20:.1f}", "cache / source": f"{r.over_source:.2f}"}
                 for r in inputs.bytes])
    rows = [{"what": f"stream, {r.mode} inputs, rendered on {r.device}", "workers": r.workers, "cores": r.cores,
             "samples/s": f"{r.samples_per_s:.0f}", "per core": f"{r.per_core:.0f}",
             "per CPU-s": "-" if r.per_cpu_second is None else f"{r.per_cpu_second:.0f}", "cores to feed": "-"}
            for r in inputs.streams]
    rows += [{"what": f"stage alone: {r.stage}", "workers": 0, "cores": 1, "samples/s": f"{r.per_core:.0f}",
              "per core": f"{r.per_core:.0f}", "per CPU-s": "-", "cores to feed": "-"} for r in inputs.stages]
    rows += [{"what": f"{r.model} training step on {r.device} (batch {r.batch_size})", "workers": "-",
              "cores": inputs.cpus if r.device == "cpu" else "-", "samples/s": f"{r.samples_per_s:.0f}",
              "per core": "-", "per CPU-s": "-", "cores to feed": f"{r.cores_to_feed:.2f}"} for r in inputs.models]
    print_table(f"student stream at 224 px beside what resnet18 and resnet50 consume ({inputs.cpus} CPUs; per "
                f"CPU-s: samples per CPU-second of the bench's process, without workers; cores to feed: the "
                f"model's samples/s over the stream's per core on that device, per CPU-s where measured)", rows)
    for scaling in inputs.scaling:
        print_table(f"{scaling.images}: teacher pass + statistics and train's first step, each in a fresh process "
                    f"(pass time should grow with the images, memory and time to first step stay flat)",
                    [{"images": r.samples, "pass + statistics s": f"{r.seconds:.1f}",
                      "time / first": f"{r.time_over_first:.2f}", "peak RSS MiB": f"{r.peak_rss_bytes / 2**20:.0f}",
                      "RSS / first": f"{r.rss_over_first:.2f}",
                      "train: first step s": f"{r.first_step_seconds:.1f}",
                      "first step / first": f"{r.first_step_over_first:.2f}"} for r in scaling.rows])


@group.command("experiment")
def experiment_cmd(
    name: Annotated[str, typer.Argument(help="an experiment or suite (`distillery experiments` lists them)")],
    seed: Annotated[list[int], typer.Option(help="student seed; repeat for several")] = [0, 1, 2],  # noqa: B006
    root: Annotated[Path, typer.Option(help="experiments directory (teachers, caches and runs are reused)")]
    = Path(source_constant("pipeline.lab.experiments", "DEFAULT_ROOT")),
    row: Annotated[Optional[list[str]], typer.Option(help="only this row (method combination); repeat")] = None,
    markdown: Annotated[bool, typer.Option(help="print the results as a markdown table")] = False,
) -> None:
    """Run a named experiment end to end (fit or reuse the teacher, cache once, train every row per seed; a Prefect
    flow when a server is configured)."""
    from pipeline.lab.experiments import suite_parts

    parts = suite_parts(name, row)  # an unknown name or row is one line, before any flow starts
    for part in parts:  # a suite (e.g. tcs) runs its experiments one after the other
        print_experiment(part.name, run_part(part, list(seed), root), markdown)


@group.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option(help="demo directory; a teacher, cache and runs found here are reused")]
    = Path("runs/demo"),
) -> None:
    """The main job on digits: fit (or reuse) a teacher, cache it once, train a CE and a CE+KD student."""
    from pipeline.lab.experiments import get_experiment

    start = time.perf_counter()
    result = run_part(get_experiment("digits-demo"), [0], out)
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s; everything is under {out}")
    print_experiment("digits-demo", result, markdown=False)


def run_part(experiment: "Experiment", seeds: list[int], root: Path) -> "ExperimentResult":
    """One experiment: here, in this process, without a server to record it (docs/operations.md#local-runs);
    else the `experiment` flow run, recorded on the server PREFECT_API_URL names."""
    from flows.server import recorded
    from flows.templates import local_path
    from pipeline.lab.experiments import run_here

    with show_progress():
        if not recorded():
            return run_here(experiment, seeds, Path(local_path(str(root))))
        from flows.experiments import run_experiment

        return run_experiment(experiment.name, seeds, str(root), list(experiment.rows))


def print_experiment(name: str, result: "ExperimentResult", markdown: bool) -> None:
    """An experiment's results: a rich table, or the markdown the README holds."""
    from pipeline.lab.experiments import get_experiment, results_markdown

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
