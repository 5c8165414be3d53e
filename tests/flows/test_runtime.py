"""What the flows share: run directories templated per flow run, artifact keys, parameter schemas, and
DataLoader workers that start after a flow ran in the same process."""

from datetime import datetime, timezone
from pathlib import Path

import pytest

from flows.runtime import artifact_key, run_path, slug
from flows.templates import TemplateError


def test_out_templates_are_filled_per_flow_run_and_differ_between_runs(prefect_harness) -> None:
    from prefect import flow

    @flow(name="where-does-it-write")
    def where(template: str) -> str:
        return run_path(template)

    first, second = where("runs/{date}/{flow_run_name}"), where("runs/{date}/{flow_run_name}")
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert first.startswith(f"runs/{today}/") and second.startswith(f"runs/{today}/") and first != second
    assert where("runs/fixed") == "runs/fixed"
    with pytest.raises(TemplateError, match=r"unknown placeholder \{night\} in 'runs/\{night\}'; use \{date\}"):
        run_path("runs/{night}")


def test_artifact_keys_are_slugs_prefect_accepts() -> None:
    assert slug("Nightly FMNIST / resnet18_a1") == "nightly-fmnist-resnet18-a1"
    assert artifact_key("students", "nightly sweep", "") == "students-nightly-sweep"


def test_parameter_schemas_show_descriptions_and_choices() -> None:
    from flows.cache_teacher import cache_teacher
    from flows.experiments import run_experiment
    from flows.fit_teacher import fit_teacher_flow
    from flows.train_students import train_students
    from pipeline.train.config import RunSettings, StudentSpec

    schema = train_students.parameters.model_dump()
    # The library's own models, their Help and Range annotations as descriptions and bounds.
    settings, optim = (schema["definitions"][name]["properties"] for name in ("RunSettings", "OptimConfig"))
    assert settings["epochs"]["description"] == "training epochs" and settings["epochs"]["minimum"] == 1
    assert optim["optimizer"]["enum"] == ["adamw", "sgd"] and optim["lr"]["exclusiveMinimum"] == 0
    assert optim["lr"]["description"].startswith("peak learning rate")
    assert "distillation methods" in schema["definitions"]["StudentSpec"]["properties"]["methods"]["description"]
    assert "{flow_run_name}" in schema["properties"]["out"]["description"]
    assert "seeds" in run_experiment.parameters.model_dump()["properties"]
    for served in (cache_teacher, fit_teacher_flow, train_students, run_experiment):
        assert served.parameters.model_dump()["properties"], served.name
    # Parameters as a deployment stores them (JSON) come back as the typed models.
    values = train_students.validate_parameters({"cache": "c", "out": "o", "students": [
        {"student": "resnet18", "methods": ["ce"]}], "settings": {"epochs": 2, "optim": {"lr": 0.01}}})
    assert values["settings"] == RunSettings(epochs=2, optim={"lr": 0.01})
    assert values["students"] == [StudentSpec(student="resnet18", methods=("ce",))]


def test_loader_workers_start_after_a_flow_ran_in_this_process(prefect_harness, digits_cache: Path) -> None:
    """Prefect's log and event services leave threads (and their exit hooks) in the process; workers from
    the fork server do not inherit them."""
    from prefect import flow
    from prefect.events import emit_event

    from pipeline.cache.reader import TeacherCache
    from pipeline.train.stream import CacheStream

    @flow(name="leaves-service-threads")
    def services() -> None:
        emit_event(event="distillery.test", resource={"prefect.resource.id": "distillery.test"})

    services()
    stream = CacheStream(TeacherCache(digits_cache), size=16, targets=frozenset(), seed=0)
    loader = stream.loader(0, 256, workers=2)
    # Not forked from this process (with prefect 3.9.1 a forked worker no longer failed here either, so the
    # start method itself is what this guards); no start method without workers.
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    assert stream.loader(0, 256, workers=0).multiprocessing_context is None
    batches = list(loader)
    assert len(batches) == stream.batches_per_epoch(256, 2)
    assert sum(len(b["label"]) for b in batches) == TeacherCache(digits_cache).num_samples  # one view each


def test_a_timed_out_task_is_not_retried_as_if_it_failed_on_io() -> None:
    """Prefect's TaskRunTimeoutError is a TimeoutError, so an OSError: the retry condition must tell it apart."""
    from prefect.states import Failed
    from prefect.task_engine import TaskRunTimeoutError

    from flows.runtime import transient_io

    assert transient_io(None, None, Failed(data=ConnectionResetError("reset by peer")))
    assert not transient_io(None, None, Failed(data=TaskRunTimeoutError("Scope timed out after 1.0 second(s).")))
    assert not transient_io(None, None, Failed(data=ValueError("bad input")))
