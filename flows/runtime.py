"""What every flow shares: run directories templated per flow run, artifact keys, library logs, retries.

- `run_path`: a scheduled deployment runs with the same parameters every night; `out = "runs/{date}/
  {flow_run_name}"` gives each run its own directory (a fixed `out` would refuse the second run: "already
  holds a run").
- `artifact_key`: Prefect keeps one history per artifact key, so keys are derived from what the artifact
  is about (a cache's identity, a sweep's name) and unrelated caches never share one.
- Library logs: `pipeline` logs with stdlib `logging` under the `distillery` logger (it never imports
  Prefect); while a flow or task run is active those records also go to the Prefect server, so per-epoch
  loss and accuracy show in the run's logs in the UI.
- `transient_io`: retry a task only when it failed on I/O (a network filesystem, object storage); bad input
  and bugs fail the same way every time and are not retried.
- Timeouts: steps that only read small summaries and talk to the server (artifacts, events) are bounded,
  so an unreachable API fails the run instead of holding it (and its accelerator slot) forever. They are
  called directly in the flow, so they run in its main thread, where Prefect's timeout interrupts even a
  blocked socket. Teacher passes and training have no fixed bound (a legitimate one may take days): a
  deployment or a sweep file sets one with the parameter `task_timeout`. A timeout that fires is one line
  (`timeout_named`) naming the task and the bound to raise, and is never retried as if it were I/O.
"""

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler
from prefect.runtime import flow_run
from prefect.task_engine import TaskRunTimeoutError

from flows.templates import fill_template, template_fields
from pipeline.errors import DistilleryError

PUBLISH_TIMEOUT_S = 600  # artifacts, including the cache's HTML report (figures from dataset-level arrays)
EVENT_TIMEOUT_S = 60

LIBRARY_LOGGER = "distillery"

RAISE_TASK_TIMEOUT = ("raise task_timeout (seconds: a sweep file's or a deployment's parameter), or leave it out "
                      "for no bound")


def fixed_bound(seconds: int) -> str:
    """What to do when a step bounded at a fixed `seconds` (it only talks to the server) times out."""
    return (f"its bound is a fixed {seconds} s, as it only talks to the Prefect server: check that the server "
            f"PREFECT_API_URL names answers, then rerun")


class TaskTimedOut(DistilleryError):
    """A task Prefect stopped at its timeout (state TimedOut), named with the bound that stopped it."""


@contextmanager
def timeout_named(task: str, remedy: str = RAISE_TASK_TIMEOUT) -> Iterator[None]:
    """Prefect's TaskRunTimeoutError, raised where a task's result is taken, as one `TaskTimedOut` line naming
    `task` and `remedy`: Prefect's own names neither ("Scope timed out after 1.0 second(s)."), and the CLI
    would print its traceback. The flow run fails with the same line."""
    try:
        yield
    except TaskRunTimeoutError as e:
        raise TaskTimedOut(f"task {task} ran past its timeout ({e}); {remedy}") from None


def run_path(template: str) -> str:
    """`template` with {date} (YYYY-MM-DD) and {time} (HHMMSS) of the run's scheduled start in UTC,
    {flow_run_name} and {flow_run_id} (each as one directory name) filled in; a path without braces is returned
    as is."""
    if not template_fields(template):
        return template
    start = flow_run.scheduled_start_time or datetime.now(timezone.utc)
    return fill_template(template, datetime.fromtimestamp(start.timestamp(), timezone.utc),
                         flow_run.name or "local", flow_run.id or "local")


def slug(text: str, length: int = 40) -> str:
    """Lowercase letters, digits and dashes (what Prefect allows in an artifact key)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", text.lower())).strip("-")[:length].strip("-")


def artifact_key(*parts: str) -> str:
    return "-".join(slug(p) for p in parts if p)


def _in_a_run(record: logging.LogRecord) -> bool:
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def forward_library_logs() -> None:
    """Send the library's INFO records to the Prefect server while a flow or task run is active.

    Idempotent (every flow module calls it on import). The records do not propagate to the console
    handlers: the CLI draws progress bars there and the server keeps the lines.
    """
    logger = logging.getLogger(LIBRARY_LOGGER)
    if any(isinstance(h, APILogHandler) for h in logger.handlers):
        return
    handler = APILogHandler()
    handler.addFilter(_in_a_run)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def transient_io(task: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn`: retry only failures on I/O (OSError), never bad input or bugs."""
    try:
        state.result()
    except TaskRunTimeoutError:  # a TimeoutError, so an OSError: a task that ran too long would run again
        return False
    except OSError:
        return True
    except BaseException:  # noqa: BLE001 - any other failure is deterministic: do not retry
        return False
    return False
