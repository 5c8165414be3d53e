"""`distillery` commands of the students: train, methods, runs."""

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from flows.cli.display import console, print_table, report_skipped, show_progress, warn
from flows.cli.options import Declared, Device, OnBadImage
from pipeline.methods import list_methods
from pipeline.options import default_of
from pipeline.train.config import RunSettings
from pipeline.train.optim import OptimConfig
from pipeline.train.runs import GROUPINGS, compare_runs

if TYPE_CHECKING:
    from pipeline.train.summary import TrainSummary

group = typer.Typer()

Optimizer = OptimConfig.model_fields["optimizer"].annotation
Grouping = Literal[GROUPINGS]
METHOD_HELP = (f"method spec NAME[:key=value,...]; repeat to compose one combination; NAME one of "
               f"{', '.join(list_methods())} (`distillery methods` lists their options)")


@group.command("train")
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
    from flows.server import recorded
    from flows.sweep import plan_sweep, train_distributed, train_locally, train_plan
    from flows.templates import local_path
    from pipeline.cache.reader import TeacherCache
    from pipeline.preflight import completed_run, teacher_near_chance, untrained_classifier
    from pipeline.train.ddp import under_torchrun

    given = {name: value for name, value in ctx.params.items()
             if name in RunSettings.option_names() and ctx.get_parameter_source(name).name == "COMMANDLINE"}
    plan = train_plan(sweep, cache, out, student or [], method or [], combo or [], given)
    warn(untrained_classifier(plan.students, allow_untrained_classifier))
    if nproc != 1 or under_torchrun():
        summaries = train_distributed(plan, nproc, show_progress)
        if summaries is not None:
            print_students(f"students trained from {plan.cache} by {summaries[0].world_size} processes", summaries)
            report_skipped("the val split", summaries[0].val_skipped_images or [])
        return
    local = not recorded()  # no server to record a flow run: the library runs here, its `out` filled here
    configs = plan_sweep(plan.cache, plan.students, local_path(plan.out) if local else plan.out,
                         plan.settings)  # bad input is one line, not a failed run
    done = {c.out: completed_run(c) for c in configs}
    for run_dir, summary in done.items():
        if summary is not None:
            console.print(f"{run_dir}: already complete ({summary.epochs} epochs, val accuracy "
                          f"{summary.val_accuracy:.2%}); nothing to train")
    if all(done.values()):
        print_students(f"students trained from {plan.cache} (already complete)", list(done.values()))
        return
    if any(spec.needs for s in plan.students for spec in s.methods):  # ce never reads the teacher's targets
        warn(teacher_near_chance(TeacherCache(plan.cache)))
    with show_progress():
        if local:
            summaries = train_locally(configs)
        else:  # the flow run, recorded on the server PREFECT_API_URL names
            from flows.train_students import train_students

            summaries = train_students(plan.cache, plan.students, plan.out, plan.settings, sweep=plan.sweep,
                                       task_timeout=plan.task_timeout, checked=True)
    print_students(f"students trained from {plan.cache}", summaries)
    report_skipped("the val split", summaries[0].val_skipped_images or [])


@group.command("methods")
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


@group.command("runs")
def runs_cmd(
    rundirs: Annotated[list[str], typer.Argument(help="run directories or fsspec URLs, or folders holding them "
                                                      "(searched recursively for summary.json)")],
    markdown: Annotated[bool, typer.Option(help="print a markdown table instead")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="also plot accuracy vs training time into this PNG")] = None,
    by: Annotated[Grouping, typer.Option(help="one row per setting (config: its seeds averaged), also per day the "
                                              "run finished (date: a nightly sweep's trend), or per folder holding "
                                              "the run (flow-run: a deployment's --out)")]
    = default_of(compare_runs, "by"),
) -> None:
    """Compare student runs; runs that differ only by seed are one row (mean ± std over the seeds)."""
    from pipeline.report.figures import accuracy_vs_time
    from pipeline.report.markdown import markdown_table
    from pipeline.train.runs import formatted_rows, group_label, group_rows

    groups = compare_runs(rundirs, by)
    rows = group_rows(groups)
    table = formatted_rows(rows)
    if markdown:
        print(markdown_table(list(table[0]), [list(r.values()) for r in table]))
    else:
        rows_are = "settings" if by == "config" else f"rows (settings x {by})"
        print_table(f"{sum(len(g.runs) for g in groups)} runs, {len(groups)} {rows_are}", table)
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot.write_bytes(accuracy_vs_time(
            [group_label(r) for r in rows], [r.mean.train_seconds for r in rows], [r.std.train_seconds for r in rows],
            [r.mean.val_accuracy for r in rows], [r.std.val_accuracy for r in rows]))
        Console(stderr=True).print(f"plot written to {plot}")  # stderr: stdout may be a markdown table


def print_students(title: str, summaries: "list[TrainSummary]") -> None:
    """The comparison table of a sweep (the flow's artifact shows the same)."""
    from flows.sweep import sweep_rows

    print_table(title, sweep_rows(summaries))
