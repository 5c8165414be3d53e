"""Prefect flow `experiment`: a named scenario end to end (`pipeline.lab.experiments`).

Fit the teacher (or reuse the checkpoint fitted with the same settings), run the `cache-teacher` flow
once, then the `train-students` flow once per seed from that one cache, and publish the results table
as a markdown artifact. Every step resumes: a rerun only does what is missing.
"""

from pathlib import Path
from typing import Optional

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.cache_teacher import cache_teacher
from flows.runtime import PUBLISH_TIMEOUT_S, artifact_key, forward_library_logs, run_path
from flows.train_students import train_students
from pipeline.lab.experiments import (DEFAULT_ROOT, ExperimentResult, ExperimentTeacher, fit_or_reuse_teacher,
                                      get_experiment, results_markdown, run_steps)
from pipeline.train.config import RunSettings, StudentSpec
from pipeline.train.summary import TrainSummary

forward_library_logs()


@task(name="fit-or-reuse-teacher", persist_result=False)
def teacher_task(name: str, root: str) -> ExperimentTeacher:
    """The experiment's teacher checkpoint: reused when fitted with the same settings, else fitted now."""
    return fit_or_reuse_teacher(get_experiment(name), Path(root))


def train_flow_run(cache: str, student: StudentSpec, out: Path, settings: RunSettings, sweep: str) -> TrainSummary:
    """One `train-students` flow run per row, into the row's own --out."""
    [summary] = train_students(cache, [student], str(out), settings, sweep=sweep)
    return summary


@task(name="publish-results", persist_result=False, timeout_seconds=PUBLISH_TIMEOUT_S)
def publish_results(name: str, seeds: list[int], markdown: str) -> None:
    create_markdown_artifact(key=artifact_key("experiment", name), markdown=markdown,
                             description=f"experiment {name}, seeds {seeds}")


@flow(name="experiment", log_prints=True)
def run_experiment(name: str, seeds: list[int], root: str = DEFAULT_ROOT,
                   rows: Optional[list[str]] = None) -> ExperimentResult:
    """Run experiment `name` (only `rows`, if given) for `seeds` under `root`; return the teacher, cache and
    result rows.

    Args:
        name: a named experiment (`distillery experiment --help` lists them), e.g. digits-demo
        seeds: student seeds; every row is trained once per seed
        root: experiments directory (teachers, caches and runs found there are reused); may hold {date},
            {time}, {flow_run_name}, {flow_run_id}
        rows: only these rows (method combinations); all by default
    """
    root = run_path(root)
    experiment = get_experiment(name).select(rows)
    result = run_steps(experiment, seeds, Path(root), lambda: teacher_task(name, root), cache_teacher, train_flow_run)
    publish_results(name, seeds, f"{experiment.description}\n\n{results_markdown(result.rows)}")
    return result
