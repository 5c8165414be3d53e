"""Prefect flow `experiment`: a named scenario end to end (`pipeline.experiments`).

Fit the teacher (or reuse the checkpoint fitted with the same settings), run the `cache-teacher` flow
once, then the `train-students` flow once per seed from that one cache, and publish the results table
as a markdown artifact. Every step resumes: a rerun only does what is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.cache_teacher import cache_teacher
from flows.train_students import train_students
from pipeline.experiments import get_experiment, markdown_table, result_rows, reusable_teacher
from pipeline.teacher.fit import fit_teacher
from pipeline.teacher.model import load_checkpoint
from pipeline.train.config import StudentSpec


@task(name="fit-or-reuse-teacher", persist_result=False)
def fit_or_reuse_teacher(name: str, root: str) -> dict[str, Any]:
    """The experiment's teacher checkpoint: reused when fitted with the same settings, else fitted now."""
    config = get_experiment(name).fit_config(Path(root))
    path = Path(config.out)
    if path.exists() and reusable_teacher(load_checkpoint(path).get("config"), config):
        return {"out": str(path), "reused": True, "val_accuracy": load_checkpoint(path)["val_accuracy"]}
    return {**fit_teacher(config), "reused": False}


@flow(name="experiment", log_prints=True)
def run_experiment(name: str, seeds: list[int], root: str = "runs/experiments",
                   rows: list[str] | None = None) -> dict[str, Any]:
    """Run experiment `name` (only `rows`, if given) for `seeds` under `root`; return the teacher, cache and
    result rows."""
    experiment = get_experiment(name).select(rows)
    teacher = fit_or_reuse_teacher(name, root)
    cached = cache_teacher(experiment.cache_request(Path(root)))
    summaries: dict[str, list[dict[str, Any]]] = {label: [] for label in experiment.rows}
    for seed in seeds:
        for label, methods in experiment.rows.items():
            run = experiment.run_dir(Path(root), label, seed)
            # One flow run per student keeps each run directory named by its row, not by its slug.
            [summary] = train_students(cached["cache"], [StudentSpec(experiment.student, methods)], str(run),
                                       experiment.run_settings(seed))
            summaries[label].append(summary)
    rows = result_rows(experiment, summaries)
    create_markdown_artifact(key=f"experiment-{name}", markdown=f"{experiment.description}\n\n{markdown_table(rows)}",
                             description=f"experiment {name}, seeds {seeds}")
    return {"teacher": teacher, "cache": cached, "rows": rows}
