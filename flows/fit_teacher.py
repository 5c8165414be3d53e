"""Prefect flow `fit-teacher`: train a teacher locally (`pipeline.train.fit`), schedulable like the others.

Nothing is downloaded here (pretrained weights to fine-tune come from disk, `FitConfig.weights`), so a
deployment that fits a teacher (say weekly) and a `cache-teacher` deployment after it give the nightly
student sweeps a fresh cache to reuse.
"""

from typing import Optional

from prefect import flow, get_run_logger, task
from pydantic import PositiveFloat

from flows.runtime import forward_library_logs, run_path, timeout_named
from pipeline.train.fit import FitConfig, FitResult, fit_teacher

forward_library_logs()


@task(name="fit-teacher", persist_result=False, tags=["accelerator"])
def fit_task(config: FitConfig) -> FitResult:
    return fit_teacher(config)


@flow(name="fit-teacher", log_prints=True)
def fit_teacher_flow(config: FitConfig, task_timeout: Optional[PositiveFloat] = None) -> FitResult:
    """Fit `config.model` on `config.dataset` and write the checkpoint to `config.out`.

    Args:
        config: what to fit; `out` may hold {date}, {time}, {flow_run_name} or {flow_run_id} (filled per flow run)
        task_timeout: fail the fit if it runs longer than this many seconds (default: no bound)
    """
    config = config.model_copy(update={"out": run_path(config.out)})
    with timeout_named("fit-teacher"):
        result = fit_task.with_options(timeout_seconds=task_timeout)(config)
    accuracy = "no head (self-supervised)" if result.val_accuracy is None else f"val accuracy {result.val_accuracy:.4f}"
    get_run_logger().info("teacher %s: %s after %d epochs (%.1f s) -> %s", config.model, accuracy, config.epochs,
                          result.train_seconds, result.out)
    return result
