"""Prefect flow `train-students`: many students against one teacher cache (README, "Teach once, distill many").

A thin wrapper over `pipeline.train`: one task per student, each `train_student(config)`, then a table
artifact comparing them. The cache is streamed by every task; the teacher is never loaded (unless the
runs ask for the online twin). Per-epoch loss and validation accuracy reach the run's logs on the server
(the library's `distillery` logger, forwarded by `flows.runtime`).
"""

from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.runtime import task_run
from prefect.states import Cancelled, State
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import PositiveFloat

from flows.signals import polled
from flows.runtime import PUBLISH_TIMEOUT_S, artifact_key, fixed_bound, forward_library_logs, run_path, timeout_named
from flows.sweep import plan_sweep, sweep_rows
from pipeline.cache.reader import TeacherCache
from pipeline.stop import raise_if_stopped, stop_requested
from pipeline.train.config import RunSettings, StudentSpec, TrainConfig
from pipeline.train.loop import train_student
from pipeline.train.summary import TrainSummary

forward_library_logs()


def student_label(config: TrainConfig) -> str:
    """`train-<student>-<methods>`: the run graph tells CE from CE+KD apart."""
    return f"train-{config.student}-{'+'.join(map(str, config.methods))}"


def student_task_name() -> str:
    return student_label(task_run.parameters["config"])


@task(name="train-student", persist_result=False, task_run_name=student_task_name, tags=["accelerator"])
def train_task(config: TrainConfig) -> TrainSummary | State:
    """One student; Cancelled when a signal stopped it (or the sweep before it started)."""
    try:
        raise_if_stopped()
        summary = train_student(config)
    except BaseException:  # noqa: BLE001 - whatever a stop ended (a DataLoader worker Ctrl-C killed included)
        if stop_requested() is None:
            raise
        return Cancelled(message=f"stopped by a signal; {config.out} resumes from its last whole epoch")
    get_run_logger().info("%s [%s]: val accuracy %.4f after %d epochs (%.1f s); run directory %s", config.student,
                          "+".join(map(str, config.methods)), summary.val_accuracy, summary.epochs,
                          summary.train_seconds, config.out)
    return summary


def sweep_artifact_key(cache: str, sweep: Optional[str]) -> str:
    """`students-<sweep>`, or `students-<dataset>-<teacher>-<cache fingerprint[:12]>` for an unnamed sweep."""
    if sweep:
        return artifact_key("students", sweep)
    m = TeacherCache(cache).manifest
    return artifact_key("students", m.dataset.name, m.teacher.model, m.fingerprint()[:12])


@task(name="publish-comparison", persist_result=False, timeout_seconds=PUBLISH_TIMEOUT_S)
def publish_comparison(cache: str, sweep: Optional[str], out: str, summaries: list[TrainSummary]) -> None:
    create_table_artifact(key=sweep_artifact_key(cache, sweep), table=sweep_rows(summaries),
                          description=f"Students trained from {cache} into {out}")


@flow(name="train-students", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def train_students(cache: str, students: list[StudentSpec], out: str, settings: RunSettings = RunSettings(),
                   sweep: Optional[str] = None, task_timeout: Optional[PositiveFloat] = None,
                   checked: bool = False) -> list[TrainSummary] | State:
    """Train every student of `students` from `cache`, one run directory each, one at a time (on CPU one
    training run already uses every core).

    Args:
        cache: teacher cache directory (`distillery cache`)
        students: the sweep: timm student and methods per entry
        out: folder of the runs: each student's run directory is `out/<student>-<methods>-s<seed>/`. May
            hold {date}, {time}, {flow_run_name}, {flow_run_id}, filled per flow run, so scheduled runs never
            collide.
        settings: training settings shared by every student (the optimiser's under `optim`)
        sweep: the sweep's name, the key of its comparison artifact (default: from the cache's identity)
        task_timeout: fail a student's task that runs longer than this many seconds (default: no bound)
        checked: the caller already ran `plan_sweep` on these parameters (the CLI does, before Prefect
            starts), so the sweep is planned without opening and hashing the cache again; each student's
            run still verifies it before training
    """
    out = run_path(out)
    configs = plan_sweep(cache, students, out, settings, check=not checked)
    get_run_logger().info("training %d student(s) from %s into %s", len(configs), cache, out)
    with polled():  # a signal stops the student training now at its next step, the rest before they start
        futures = train_task.with_options(timeout_seconds=task_timeout).map(configs)
        futures.wait()
    if stop_requested() is not None:
        return Cancelled(message="stopped by a signal; rerun with resume to continue each student from its last "
                                 "whole epoch")
    summaries = []
    for config, future in zip(configs, futures):
        with timeout_named(student_label(config)):
            summaries.append(future.result())
    with timeout_named("publish-comparison", fixed_bound(PUBLISH_TIMEOUT_S)):
        publish_comparison(cache, sweep, out, summaries)
    return summaries
