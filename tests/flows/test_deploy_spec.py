"""`distillery deploy`'s spec: the committed example loads, and every mistake is one line naming the field."""

import re
from pathlib import Path

import pytest

from flows.deploy import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[2]
SWEEP = """
[[deployment]]
name = "sweep"
flow = "train-students"
{schedule}
[deployment.parameters]
cache = "{cache}"
out = "{out}/{{date}}/{{flow_run_name}}"
students = {students}
settings = {settings}
"""
GOOD = dict(schedule='cron = "0 2 * * *"', students='[{ student = "test_resnet", methods = ["ce", "kd:T=2"] }]',
            settings="{ epochs = 2 }")


@pytest.fixture
def sweep_spec(digits_cache: Path, tmp_path: Path):
    """Factory: a one-deployment sweep spec from the session's digits cache, `GOOD` with `change` applied."""

    def write(**change: str) -> Path:
        path = tmp_path / "spec.toml"
        path.write_text(SWEEP.format(**{**GOOD, "cache": digits_cache, "out": tmp_path / "runs", **change}))
        return path

    return write


def test_the_example_spec_loads_with_schedules_parameters_and_the_cache_trigger(cli) -> None:
    spec = load_spec(ROOT / "deploy" / "nightly.toml")
    by_name = {d.name: d for d in spec.deployments}
    assert spec.concurrency == {"accelerator": 1}
    assert by_name["nightly-sweep"].schedules[0].schedule.cron == "0 2 * * *"
    assert "{date}" in by_name["nightly-sweep"].parameters["out"]
    [trigger] = by_name["sweep-on-new-cache"].triggers
    assert trigger.expect == {"distillery.cache.completed"}
    assert trigger.parameters == {"cache": "{{ event.resource['distillery.cache.path'] }}"}
    code, out = cli("deploy", str(ROOT / "deploy" / "nightly.toml"), "--check")
    assert code == 0 and "train-students/sweep-on-new-cache" in out


def test_a_spec_bounds_long_tasks_only_when_asked(sweep_spec) -> None:
    [unbounded] = load_spec(sweep_spec()).deployments
    assert "task_timeout" not in unbounded.parameters
    [bounded] = load_spec(sweep_spec(settings="{ epochs = 2 }\ntask_timeout = 5400")).deployments
    assert bounded.parameters["task_timeout"] == 5400


def test_a_spec_schedule_is_cron_or_interval(sweep_spec) -> None:
    [deployment] = load_spec(sweep_spec(schedule="interval = 30")).deployments
    assert deployment.schedules[0].schedule.interval.total_seconds() == 30


@pytest.mark.parametrize("change, message", [
    (dict(schedule='cron = "0 2 * *x *"'), "deployment 'sweep': cron cron: Value error, Invalid cron string"),
    (dict(schedule="interval = -5"), "interval is in seconds and must be > 0 and at most 31622400 (a year), not -5"),
    (dict(schedule="interval = true"), "deployment 'sweep': interval: Input should be a valid integer"),
    (dict(schedule='tags = "nightly"'), "deployment 'sweep': tags: Input should be a valid list"),
    (dict(schedule='cron = "0 2 * * *"\ninterval = 5'), "give cron or interval, not both"),
    (dict(schedule='flow_name = "x"'), "unknown key 'flow_name'"),
    (dict(students='[{ student = "resnet18", methods = [] }]'), "bad parameters"),
    (dict(settings='{ optim = { optimizer = "lion" } }'), "bad parameters"),
    (dict(settings='{ optimizer = "sgd" }'), "bad parameters"),  # the optimiser's settings are under optim
    (dict(settings='{ epochs = 0 }'), "bad parameters"),
    (dict(settings='{ epoch = 2 }'), "bad parameters"),
    (dict(schedule='task_runner = "dask"'), "task_runner applies to cache-teacher only"),
    (dict(settings="{ epochs = 2 }\ntask_timeout = 0"), "bad parameters: Flow run received invalid parameters"),
])
def test_spec_mistakes_are_one_line_naming_the_deployment(sweep_spec, change: dict, message: str) -> None:
    path = sweep_spec(**change)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"{path}, deployment 'sweep': ") or "unknown key" in str(e.value)


def test_an_unknown_flow_and_a_missing_trigger_parameter_are_refused(sweep_spec) -> None:
    path = sweep_spec()
    path.write_text(path.read_text().replace('flow = "train-students"', 'flow = "train"'))
    with pytest.raises(SpecError, match="flow must be one of fit-teacher, cache-teacher, train-students, "
                                        "experiment, not 'train'"):
        load_spec(path)
    # Without a cache and without a trigger filling it, the sweep could never run.
    path = sweep_spec()
    path.write_text(re.sub(r'cache = ".*"\n', "", path.read_text()))
    with pytest.raises(SpecError, match="bad parameters.*cache"):
        load_spec(path)
