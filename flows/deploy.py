"""`distillery deploy SPEC.toml`: serve the flows as deployments described by a file a team keeps in git.

The spec (TOML, read with `tomllib`; README "Prefect in production" documents it, `deploy/nightly.toml`
is an example):

    concurrency = { accelerator = 1 }       # optional: task-tag limits (shard and student tasks carry
                                            # the tag `accelerator`: two runs never share one GPU)
    [[deployment]]
    name = "nightly-sweep"
    flow = "train-students"                 # fit-teacher | cache-teacher | train-students | experiment
    cron = "0 2 * * *"                      # or interval = SECONDS; neither: runs only when triggered
    task_runner = "thread"                  # cache-teacher only: thread | dask | tcp://SCHEDULER:8786
    [deployment.parameters]                 # the flow's parameters (`out` may hold {date}, {flow_run_name})
    [[deployment.triggers]]                 # Prefect DeploymentEventTrigger fields: expect, match, parameters
                                            # (Jinja templates over the event), within, threshold, ...

Every deployment is checked before anything is served: an unknown flow or key, a bad parameter or
trigger is one line naming the deployment and the field.
"""

import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

from prefect import Flow
from prefect.events import DeploymentEventTrigger
from pydantic import ValidationError

from pipeline.errors import DistilleryError

KEYS = {"name", "flow", "cron", "interval", "timezone", "parameters", "triggers", "tags", "description",
        "task_runner", "workers", "paused", "concurrency_limit"}


class SpecError(DistilleryError):
    """A deployment spec that cannot be served as written."""


def flows_by_name() -> dict[str, Flow]:
    from flows.cache_teacher import cache_teacher
    from flows.experiments import run_experiment
    from flows.fit_teacher import fit_teacher_flow
    from flows.train_students import train_students

    return {f.name: f for f in (fit_teacher_flow, cache_teacher, train_students, run_experiment)}


@dataclass
class Spec:
    """A parsed spec: deployments ready to serve and the tag concurrency limits to set first."""

    deployments: list[Any] = field(default_factory=list)  # prefect RunnerDeployment
    concurrency: dict[str, int] = field(default_factory=dict)


def first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    return f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}"


def load_spec(path: Path) -> Spec:
    """Parse and check `path`; every problem is a `SpecError` naming the deployment and the field."""
    if not path.is_file():
        raise SpecError(f"deployment spec {path} does not exist; see deploy/nightly.toml for an example")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path} is not valid TOML: {e}") from None
    entries = raw.get("deployment", [])
    if not entries:
        raise SpecError(f"{path} defines no [[deployment]]; see deploy/nightly.toml for an example")
    unknown = sorted(set(raw) - {"deployment", "concurrency"})
    if unknown:
        raise SpecError(f"{path}: unknown top-level key '{unknown[0]}'; use [[deployment]] and concurrency")
    concurrency = raw.get("concurrency", {})
    if not all(isinstance(v, int) and v >= 1 for v in concurrency.values()):
        raise SpecError(f"{path}: concurrency limits must be integers >= 1, not {concurrency}")
    flows = flows_by_name()
    names = [d.get("name") for d in entries]
    if len(set(names)) != len(names):
        raise SpecError(f"{path}: deployment names must be unique, got {names}")
    return Spec([to_deployment(path, d, flows) for d in entries], dict(concurrency))


def to_deployment(path: Path, entry: dict[str, Any], flows: dict[str, Flow]) -> Any:
    name = entry.get("name")
    where = f"{path}, deployment '{name}'"
    if not name:
        raise SpecError(f"{path}: every [[deployment]] needs a name")
    unknown = sorted(set(entry) - KEYS)
    if unknown:
        raise SpecError(f"{where}: unknown key '{unknown[0]}'; known: {', '.join(sorted(KEYS))}")
    flow = flows.get(entry.get("flow", ""))
    if flow is None:
        raise SpecError(f"{where}: flow must be one of {', '.join(flows)}, not '{entry.get('flow')}'")
    if "cron" in entry and "interval" in entry:
        raise SpecError(f"{where}: give cron or interval, not both")
    try:
        triggers = [DeploymentEventTrigger(**t) for t in entry.get("triggers", [])]
    except ValidationError as e:
        raise SpecError(f"{where}: trigger {first_error(e)}") from None
    parameters = entry.get("parameters", {})
    # Parameters a trigger fills from its event (templates) must exist too; a template is a string.
    filled = {k: v for t in triggers for k, v in (t.parameters or {}).items()}
    try:
        flow.validate_parameters({**parameters, **filled})
    except Exception as e:  # noqa: BLE001 - prefect's ParameterTypeError wraps pydantic's message
        raise SpecError(f"{where}: bad parameters: {' '.join(str(e).split())}") from None
    if "task_runner" in entry:
        if flow.name != "cache-teacher":
            raise SpecError(f"{where}: task_runner applies to cache-teacher only")
        from flows.cache_teacher import task_runner

        flow = flow.with_options(task_runner=task_runner(entry["task_runner"], entry.get("workers", 2)))
    return flow.to_deployment(name=name, schedules=schedules(where, entry), parameters=parameters,
                              triggers=triggers, tags=entry.get("tags"), description=entry.get("description"),
                              paused=entry.get("paused"), concurrency_limit=entry.get("concurrency_limit"))


def schedules(where: str, entry: dict[str, Any]) -> list[Any]:
    """The entry's cron or interval schedule (none: the deployment runs only when triggered or asked)."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron, Interval

    timezone = entry.get("timezone")
    if "interval" in entry:
        seconds = entry["interval"]
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
            raise SpecError(f"{where}: interval is in seconds and must be > 0, not {seconds!r}")
        return [Interval(timedelta(seconds=seconds), timezone=timezone)]
    if "cron" in entry:
        try:
            CronSchedule(cron=entry["cron"], timezone=timezone)
        except ValidationError as e:
            raise SpecError(f"{where}: cron {first_error(e)} (e.g. cron = \"0 2 * * *\")") from None
        return [Cron(entry["cron"], timezone=timezone)]
    return []


def set_concurrency(limits: dict[str, int]) -> None:
    """Task-tag concurrency limits on the server (e.g. accelerator = 1)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for tag, limit in limits.items():
            client.create_concurrency_limit(tag=tag, concurrency_limit=limit)


def serve_spec(path: Path, limit: Optional[int] = None) -> None:
    """Check the spec, set its concurrency limits, then serve every deployment until interrupted."""
    from prefect import serve

    spec = load_spec(path)
    set_concurrency(spec.concurrency)
    serve(*spec.deployments, limit=limit)
