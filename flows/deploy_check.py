"""Every check a deployment's run would make, made when the spec is loaded (`distillery deploy --check`, and
before serving): a schedule fires at night, and a typo'd method, an unknown model, a cache nobody writes or an
`out` template that cannot be filled would otherwise fail every run then.

Per flow, with its `out` filled as a run fills it (`templates.fill_template`):

- fit-teacher: `check_fit` (device, where the checkpoint goes, the dataset) and the model;
- cache-teacher: `check_request` (device, output, dataset, the teacher built from its checkpoint or weights);
  a checkpoint that a fit-teacher deployment of the same spec writes is not there yet: its dataset, model and
  output are checked;
- train-students: `plan_sweep` against the cache (every student's model and methods, the settings); a cache
  that a cache-teacher deployment of the same spec writes, or that a trigger fills in from its event, is not
  there yet: the students' models and the settings are checked;
- experiment: the experiment and its rows;
- triggers: a `distillery.*` event they expect is one the flows emit.
"""

import os
from datetime import datetime, timezone
from typing import Any

from flows.templates import fill_template
from pipeline.errors import DistilleryError

CHECK_RUN_NAME = "deploy-check"  # the flow run name `out` templates are filled with while checking


class Upstream:
    """What the spec's own deployments produce: checkpoints (fit-teacher) and caches (cache-teacher), by path."""

    def __init__(self, produced: list[tuple[str, dict[str, Any]]]) -> None:
        self.checkpoints = {same_path(p["config"].out) for flow, p in produced if flow == "fit-teacher"}
        self.caches = {same_path(p["request"].out) for flow, p in produced if flow == "cache-teacher"}


def same_path(path: str) -> str:
    return os.path.normpath(os.path.expanduser(path))


def filled(template: str) -> str:
    """`template` filled as a run starting now, named `CHECK_RUN_NAME`, would fill it."""
    return fill_template(template, datetime.now(timezone.utc), CHECK_RUN_NAME, CHECK_RUN_NAME)


def check_events(triggers: list[Any]) -> None:
    """A trigger waiting for a `distillery.*` event no flow emits would never fire."""
    from flows.cache_teacher import CACHE_COMPLETED

    for trigger in triggers:
        for event in trigger.expect:
            if event.startswith("distillery.") and event != CACHE_COMPLETED:
                raise DistilleryError(f"trigger expects '{event}', which no flow emits; the flows emit "
                                      f"'{CACHE_COMPLETED}'")


def check_run(flow: str, params: dict[str, Any], from_event: set[str], upstream: Upstream) -> None:
    """Everything `flow`'s run with the validated `params` would refuse before its first batch; `from_event`:
    parameters a trigger fills in (not known until the event)."""
    if flow == "fit-teacher":
        from pipeline.nets.tapped import check_timm_name
        from pipeline.train.fit import check_fit

        config = params["config"]
        check_timm_name(config.model)
        check_fit(config.model_copy(update={"out": filled(config.out)}))
    elif flow == "cache-teacher":
        check_cache_request(params["request"], upstream)
    elif flow == "train-students":
        check_sweep(params, from_event, upstream)
    elif flow == "experiment":
        from pipeline.lab.experiments import get_experiment

        get_experiment(params["name"]).select(params.get("rows"))
        filled(params.get("root", ""))


def check_cache_request(request: Any, upstream: Upstream) -> None:
    from pipeline.teacher.plan import check_request

    request = request.model_copy(update={"out": filled(request.out)})
    if request.checkpoint is None or same_path(request.checkpoint) not in upstream.checkpoints:
        check_request(request)
        return
    from pipeline.data.datasets import load_dataset
    from pipeline.nets.tapped import check_timm_name
    from pipeline.object_store import check_output_location
    from pipeline.options import check_device

    check_device(request.device)
    check_output_location(request.out)
    load_dataset(request.dataset, split=request.split, on_bad_image=request.on_bad_image)
    if request.teacher is not None:
        check_timm_name(request.teacher)


def check_sweep(params: dict[str, Any], from_event: set[str], upstream: Upstream) -> None:
    from flows.sweep import plan_sweep
    from pipeline.nets.tapped import check_timm_name
    from pipeline.train.config import RunSettings

    settings = params.get("settings", RunSettings())
    out = params["out"] if "out" in from_event else filled(params["out"])
    cache = params["cache"]
    if "cache" not in from_event and same_path(cache) not in upstream.caches:
        if not os.path.exists(os.path.expanduser(cache)) and "://" not in cache:
            raise DistilleryError(f"cache {cache} does not exist and no cache-teacher deployment of this spec "
                                  f"writes it; make it with `distillery cache` or add one")
        plan_sweep(cache, params["students"], out, settings)
        return
    settings.check_machine()
    for student in params["students"]:
        check_timm_name(student.student)
