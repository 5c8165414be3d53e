"""What `distillery train` trains: a --sweep file merged with the command line, and the DDP path.

Plain functions, no Prefect (the CLI calls them before any flow starts, so bad input is one line and costs
no server start): `train_plan` reads the sweep file (deploy/nightly.toml's `train-students` parameters),
lets the settings options given on the command line override its settings, adds every --student times
every method combination, and checks the result; `train_distributed` runs that plan with DDP
(docs/operations.md#distributed-students).
"""

import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from flows.params import SweepFile
from flows.signals import polled
from pipeline.object_store import is_url
from pipeline.train.config import RunSettings, StudentSpec, TrainConfig, TrainError
from pipeline.train.summary import TrainSummary


def combination(spec: str) -> list[str]:
    """`ce+kd:T=2,alpha=0.5` -> [`ce`, `kd:T=2,alpha=0.5`]: a `+` before a method name joins two methods (a
    value such as 1e+3 keeps its `+`)."""
    return [m for m in re.split(r"\+(?=[A-Za-z_])", spec) if m]


@dataclass(frozen=True)
class TrainPlan:
    """The `train-students` parameters of one `distillery train`: a sweep file's, completed by the command line."""

    cache: str
    out: str
    students: list[StudentSpec]
    settings: RunSettings
    sweep: Optional[str] = None
    task_timeout: Optional[float] = None


def train_plan(sweep: Optional[Path], cache: Optional[str], out: Optional[str], students: list[str],
               methods: list[str], combos: list[str], options: dict[str, Any]) -> TrainPlan:
    """The plan of `distillery train`: the `sweep` file's (if any) students, settings, cache and out; `options`
    (the settings typed on the command line, named as `RunSettings.option_names` lists them) override the
    file's settings (the defaults without a file); every one of `students` is trained with `methods` (one
    combination) and with each of `combos`."""
    plan = SweepFile.load(sweep) if sweep is not None else SweepFile()
    settings = plan.settings.with_options(**options)
    combinations = ([list(methods)] if methods else []) + [combination(c) for c in combos]
    if students and not combinations:
        raise TrainError(f"student {students[0]} has no --method; give at least one, e.g. --method ce")
    planned = plan.students + [StudentSpec(student=name, methods=m) for name in students for m in combinations]
    cache = cache or plan.cache
    out = out or plan.out
    out = out if out is None or is_url(out) else str(Path(out))  # a local path normalised, as a Path option did
    if cache is None or out is None:
        raise TrainError(f"give --{'cache' if cache is None else 'out'} (or a --sweep file that sets it)")
    if not planned:
        raise TrainError("no student given; pass --student TIMM_NAME --method ce (or a --sweep file with students)")
    return TrainPlan(cache=str(cache), out=out, students=planned, settings=settings, sweep=plan.sweep,
                     task_timeout=plan.task_timeout)


def plan_sweep(cache: str, students: list[StudentSpec], out: str, settings: RunSettings,
               check: bool = True) -> list[TrainConfig]:
    """One `TrainConfig` per student, checked (`check`): bad input fails here, before any student trains."""
    from pipeline.train.layout import plan_runs
    from pipeline.train.loop import check_runs

    configs = plan_runs(cache, students, out, settings)
    if check:
        check_runs(configs)
    return configs


def sweep_rows(summaries: list[TrainSummary]) -> list[dict[str, str]]:
    """One row per run: the columns people compare students by, formatted as everywhere else (percent, seconds,
    milliseconds per step), and the run directory's name in --out: the command's table and the flow's artifact
    show the same text."""
    return [{"student": s.student, "methods": "+".join(s.methods), "run": PurePosixPath(s.out).name if s.out else "-",
             "epochs": str(s.epochs), "seed": str(s.seed),
             "val_accuracy": f"{s.val_accuracy:.2%}", "train_seconds": f"{s.train_seconds:.1f} s",
             "mean_step_seconds": f"{1000 * s.mean_step_seconds:.1f} ms", "params": f"{s.params:,}"}
            for s in summaries]


def train_locally(configs: list[TrainConfig], task_timeout: Optional[float] = None) -> list[TrainSummary]:
    """The `train-students` flow's work without Prefect (no server to record it: `flows.server.recorded`):
    each student in turn in this process; a signal stops the one training at its next step and the rest
    before they start (`flows.signals.polled`), and so does a student running past `task_timeout` seconds
    (the flow's per-task timeout): `pipeline.stop.TimedOut`, one line naming the student."""
    from pipeline.stop import raise_if_stopped, time_limit
    from pipeline.train.loop import train_student

    summaries = []
    with polled():
        for config in configs:
            raise_if_stopped()
            with time_limit(task_timeout, f"student {config.student} [{'+'.join(map(str, config.methods))}]",
                            f"{config.out} resumes from its last whole epoch (rerun with --resume), or raise "
                            f"task_timeout in the sweep file"):
                summaries.append(train_student(config))
    return summaries


def train_distributed(plan: TrainPlan, nproc: int,
                      display: Callable[[], AbstractContextManager[Any]] = nullcontext) -> list[TrainSummary] | None:
    """DDP students (docs/operations.md#distributed-students): under torchrun every rank trains each student in
    turn (rank 0 inside `display`); with --nproc N this process checks the sweep, then runs torchrun per
    student. The summaries on rank 0 (which prints them), None on the other ranks."""
    from pipeline.train.ddp import World, under_torchrun
    from pipeline.train.launch import launch
    from pipeline.train.loop import train_student

    world = World.from_env()
    if nproc < 1:
        raise TrainError(f"--nproc {nproc}: give a number of processes >= 1")
    if under_torchrun() and nproc not in (1, world.size):
        raise TrainError(f"--nproc {nproc} under torchrun, whose world size is {world.size}: leave --nproc out "
                         f"(torchrun's --nproc-per-node decides)")
    from pipeline.train.layout import plan_runs
    from pipeline.train.loop import check_runs

    configs = plan_runs(plan.cache, plan.students, plan.out, plan.settings)
    check_runs(configs, world.size if under_torchrun() else nproc)  # bad input is one line, before any process starts
    if under_torchrun():
        with display() if world.is_main else nullcontext():
            summaries = [train_student(config) for config in configs]
    else:
        summaries = [launch(config, nproc) for config in configs]
    return summaries if world.is_main else None
