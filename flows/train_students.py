"""Prefect flow `train-students`: many students against one teacher cache (DESIGN.md §2, §7).

A thin wrapper over `pipeline.train`: one task per student, each `train_student(config)`, then a table
artifact comparing them. The cache is streamed by every task; the teacher is never loaded (unless the
runs ask for the online twin).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.train.config import RunSettings, StudentSpec, TrainConfig, plan_runs
from pipeline.train.loop import train_student

COMPARISON_COLUMNS = ("student", "methods", "val_accuracy", "train_seconds", "mean_step_seconds", "params")


@task(name="train-student", persist_result=False, task_run_name="train-{config.student}")
def train_task(config: TrainConfig) -> dict[str, Any]:
    return train_student(config)


def comparison_rows(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: the columns people compare students by."""
    return [{**{k: s[k] for k in COMPARISON_COLUMNS}, "methods": "+".join(s["methods"])} for s in summaries]


@flow(name="train-students", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def train_students(cache: str, students: list[StudentSpec], out: str,
                   settings: RunSettings | None = None) -> list[dict[str, Any]]:
    """Train every student of `students` from `cache` (one run directory each, see `plan_runs`).

    One student at a time by default: on CPU one training run already uses every core.
    """
    configs = plan_runs(cache, students, out, settings or RunSettings())
    summaries = list(train_task.map(configs).result())
    create_table_artifact(key="train-students", table=comparison_rows(summaries),
                          description=f"Students trained from {cache}")
    return summaries
