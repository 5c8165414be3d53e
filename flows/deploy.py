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

Every deployment is checked before anything is served: an unknown flow or key, a bad parameter, schedule or
trigger, and everything its run would refuse before its first batch (`flows.deploy_check`) is one line naming
the deployment and the field.
"""

import math
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

from prefect import Flow
from prefect.events import DeploymentEventTrigger
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

from flows.deploy_check import Upstream, check_events, check_run
from pipeline.errors import DistilleryError, one_line

MAX_INTERVAL_S = 366 * 24 * 3600


class SpecError(DistilleryError):
    """A deployment spec that cannot be served as written."""


def flows_by_name() -> dict[str, Flow]:
    from flows.cache_teacher import cache_teacher
    from flows.experiments import run_experiment
    from flows.fit_teacher import fit_teacher_flow
    from flows.train_students import train_students

    return {f.name: f for f in (fit_teacher_flow, cache_teacher, train_students, run_experiment)}


class DeploymentEntry(BaseModel):
    """One `[[deployment]]` table as written; `to_deployment` checks it against its flow."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    flow: str = ""
    cron: Optional[str] = None
    interval: Optional[StrictInt | StrictFloat] = None
    timezone: Optional[str] = None
    parameters: dict[str, Any] = {}
    triggers: list[dict[str, Any]] = []
    tags: Optional[list[str]] = None
    description: Optional[str] = None
    task_runner: Optional[str] = None
    workers: int = Field(default=2, ge=1)
    paused: Optional[bool] = None
    concurrency_limit: Optional[int] = Field(default=None, ge=1)


class SpecFile(BaseModel):
    """The whole file: its deployments and the task-tag concurrency limits to set first."""

    model_config = ConfigDict(extra="forbid")

    deployment: list[dict[str, Any]] = []  # each checked as a DeploymentEntry, to name it in the error
    concurrency: dict[str, StrictInt] = {}


class Spec(BaseModel):
    """A parsed spec: deployments ready to serve and the tag concurrency limits to set first."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    deployments: list[Any]  # prefect RunnerDeployment
    concurrency: dict[str, int]


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
    try:
        spec = SpecFile(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "extra_forbidden":
            raise SpecError(f"{path}: unknown top-level key '{err['loc'][0]}'; use [[deployment]] and "
                            f"concurrency") from None
        raise SpecError(f"{path}: {first_error(e)}") from None
    if not spec.deployment:
        raise SpecError(f"{path} defines no [[deployment]]; see deploy/nightly.toml for an example")
    if not all(v >= 1 for v in spec.concurrency.values()):
        raise SpecError(f"{path}: concurrency limits must be integers >= 1, not {spec.concurrency}")
    entries = [deployment_entry(path, d) for d in spec.deployment]
    names = [d.name for d in entries]
    if len(set(names)) != len(names):
        raise SpecError(f"{path}: deployment names must be unique, got {names}")
    flows = flows_by_name()
    checked = [checked_parameters(path, d, flows) for d in entries]
    deployments = [to_deployment(path, d, flows) for d in entries]
    # Then what each run would check (datasets, models, caches: seconds), with every deployment's products known.
    upstream = Upstream([(d.flow, params) for d, (params, _) in zip(entries, checked)])
    for entry, (params, from_event) in zip(entries, checked):
        try:
            check_run(entry.flow, params, from_event, upstream)
        except DistilleryError as e:
            raise SpecError(f"{path}, deployment '{entry.name}': {one_line(e)}") from None
    return Spec(deployments=deployments, concurrency=spec.concurrency)


def deployment_entry(path: Path, raw: dict[str, Any]) -> DeploymentEntry:
    """`raw` as a `DeploymentEntry`, or one line naming the deployment and the field."""
    if not raw.get("name"):
        raise SpecError(f"{path}: every [[deployment]] needs a name")
    try:
        return DeploymentEntry(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = f"{path}, deployment '{raw['name']}'"
        if err["type"] == "extra_forbidden":
            raise SpecError(f"{where}: unknown key '{err['loc'][0]}'; known: "
                            f"{', '.join(sorted(DeploymentEntry.model_fields))}") from None
        raise SpecError(f"{where}: {err['loc'][0]}: {err['msg']}") from None


def entry_triggers(where: str, entry: DeploymentEntry) -> list[DeploymentEventTrigger]:
    try:
        triggers = [DeploymentEventTrigger(**t) for t in entry.triggers]
    except ValidationError as e:
        raise SpecError(f"{where}: trigger {first_error(e)}") from None
    try:
        check_events(triggers)
    except DistilleryError as e:
        raise SpecError(f"{where}: {e}") from None
    return triggers


def checked_parameters(path: Path, entry: DeploymentEntry, flows: dict[str, Flow]) -> tuple[dict[str, Any], set[str]]:
    """The entry's parameters as its flow validates them, and the names of those a trigger fills from its event."""
    where = f"{path}, deployment '{entry.name}'"
    flow = flows.get(entry.flow)
    if flow is None:
        raise SpecError(f"{where}: flow must be one of {', '.join(flows)}, not '{entry.flow}'")
    # Parameters a trigger fills from its event (templates) must exist too; a template is a string.
    from_event = {k: v for t in entry_triggers(where, entry) for k, v in (t.parameters or {}).items()}
    try:
        return flow.validate_parameters({**entry.parameters, **from_event}), set(from_event)
    except Exception as e:  # noqa: BLE001 - prefect's ParameterTypeError wraps pydantic's message
        raise SpecError(f"{where}: bad parameters: {' '.join(str(e).split())}") from None


def to_deployment(path: Path, entry: DeploymentEntry, flows: dict[str, Flow]) -> Any:
    """The checked entry (`checked_parameters`) as a Prefect deployment of its flow."""
    where = f"{path}, deployment '{entry.name}'"
    flow = flows[entry.flow]
    if entry.cron is not None and entry.interval is not None:
        raise SpecError(f"{where}: give cron or interval, not both")
    triggers = entry_triggers(where, entry)
    if entry.task_runner is not None:
        if flow.name != "cache-teacher":
            raise SpecError(f"{where}: task_runner applies to cache-teacher only")
        from flows.cache_teacher import task_runner

        flow = flow.with_options(task_runner=task_runner(entry.task_runner, entry.workers))
    return flow.to_deployment(name=entry.name, schedules=schedules(where, entry), parameters=entry.parameters,
                              triggers=triggers, tags=entry.tags, description=entry.description,
                              paused=entry.paused, concurrency_limit=entry.concurrency_limit)


def schedules(where: str, entry: DeploymentEntry) -> list[Any]:
    """The entry's cron or interval schedule (none: the deployment runs only when triggered or asked)."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron, Interval

    if entry.interval is not None:
        if not (math.isfinite(entry.interval) and 0 < entry.interval <= MAX_INTERVAL_S):
            raise SpecError(f"{where}: interval is in seconds and must be > 0 and at most {MAX_INTERVAL_S} (a "
                            f"year), not {entry.interval!r}")
        return [Interval(timedelta(seconds=entry.interval), timezone=entry.timezone)]
    if entry.cron is not None:
        try:
            CronSchedule(cron=entry.cron, timezone=entry.timezone)
        except ValidationError as e:
            raise SpecError(f"{where}: cron {first_error(e)} (e.g. cron = \"0 2 * * *\")") from None
        return [Cron(entry.cron, timezone=entry.timezone)]
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
