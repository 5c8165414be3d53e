"""`distillery deploy --check` makes every check a deployment's run would make (flows/deploy_check.py): each
mistake that would fail a scheduled run at night is one line now, naming the deployment."""

from datetime import datetime, timezone
from pathlib import Path

import pytest

from flows.deploy import SpecError, load_spec
from flows.templates import TemplateError, fill_template

# A teacher fitted, cached at a stable path, swept nightly and on every new cache: the example's shape.
SPEC = """
[[deployment]]
name = "fit"
flow = "fit-teacher"
[deployment.parameters.config]
dataset = "{dataset}"
model = "{model}"
epochs = 1
out = "{root}/teachers/{fit_out}"

[[deployment]]
name = "cache"
flow = "cache-teacher"
tags = ["teacher"]
[deployment.parameters.request]
views = 1
out = "{root}/caches/{cache_out}"
dataset = "digits"
checkpoint = "{checkpoint}"
teacher = "{teacher}"

[[deployment]]
name = "sweep"
flow = "train-students"
{schedule}
[deployment.parameters]
students = [{{ student = "{student}", methods = ["ce", "{method}"] }}]
out = "{root}/runs/{sweep_out}"
cache = "{cache}"
settings = {{ epochs = 1 }}

[[deployment]]
name = "on-new-cache"
flow = "train-students"
[deployment.parameters]
out = "{root}/on-new-cache/{{flow_run_name}}"
students = [{{ student = "{student}", methods = ["ce", "{method}"] }}]
[[deployment.triggers]]
expect = ["{event}"]
parameters = {{ cache = "{{{{ event.resource['distillery.cache.path'] }}}}" }}
"""
GOOD = dict(dataset="digits", model="test_resnet", fit_out="digits.pt", teacher="test_resnet",
            checkpoint="{root}/teachers/digits.pt", cache_out="digits", cache="{root}/caches/digits",
            sweep_out="{date}/{flow_run_name}", schedule='cron = "0 2 * * *"', student="test_resnet",
            method="kd:T=2", event="distillery.cache.completed")


def write_spec(root: Path, **change: str) -> Path:
    fields = {**GOOD, **change}
    fields = {k: v.replace("{root}", str(root)) for k, v in fields.items()}
    path = root / "spec.toml"
    path.write_text(SPEC.format(root=root, **fields))
    return path


def test_a_spec_whose_cache_and_checkpoint_are_made_upstream_is_consistent(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path))
    assert [d.name for d in spec.deployments] == ["fit", "cache", "sweep", "on-new-cache"]
    assert not (tmp_path / "teachers").exists() and not (tmp_path / "caches").exists()  # checked, nothing written


def test_a_sweep_of_an_existing_cache_is_checked_against_it(tmp_path: Path, digits_cache: Path) -> None:
    load_spec(write_spec(tmp_path, cache=str(digits_cache)))
    with pytest.raises(SpecError, match="deployment 'sweep': .*needs.*lsh"):
        load_spec(write_spec(tmp_path, cache=str(digits_cache), method="elsh"))  # the cache stores no LSH codes


CASES = [
    # methods and their options
    (dict(method="kd:T=1e309"), "sweep", "method 'kd': option 'T' must be >= 0.01 and <= 100, not inf"),
    (dict(method="kd:T=-1"), "sweep", "option 'T' must be >= 0.01 and <= 100, not -1.0"),
    (dict(method="kdd"), "sweep", "unknown method 'kdd' (did you mean 'kd' or 'dkd'?)"),
    # models: a student of a sweep over an upstream cache, a fitted teacher, a cached one
    (dict(student="resnet999"), "sweep", "unknown timm model 'resnet999'"),
    (dict(model="resnet999"), "fit", "unknown timm model 'resnet999'"),
    (dict(checkpoint="{root}/elsewhere.pt"), "cache", "checkpoint {root}/elsewhere.pt does not exist"),
    (dict(teacher="resnet999"), "cache", "unknown timm model 'resnet999'"),
    # datasets
    (dict(dataset="digitz"), "fit", "unknown dataset 'digitz'"),
    # out templates
    (dict(sweep_out="{date"), "sweep", "is not a valid template (expected '}' before end of string)"),
    (dict(sweep_out="{date!z}"), "sweep", "placeholder {date} in"),
    (dict(sweep_out="}{"), "sweep", "is not a valid template (Single '}' encountered"),
    (dict(sweep_out="{date:>3000000000}"), "sweep", "takes no !conversion or :format; write {date}"),
    (dict(sweep_out="{night}"), "sweep", "unknown placeholder {night}"),
    (dict(cache_out="{flow_run}"), "cache", "unknown placeholder {flow_run}"),
    (dict(fit_out="{date"), "fit", "is not a valid template"),
    # intervals
    (dict(schedule="interval = nan"), "sweep", "interval is in seconds and must be > 0 and at most"),
    (dict(schedule="interval = inf"), "sweep", "not inf"),
    (dict(schedule="interval = 1e300"), "sweep", "not 1e+300"),
    # caches that must exist, or be made upstream in the same spec
    (dict(cache="{root}/caches/other"), "sweep", "cache {root}/caches/other does not exist and no cache-teacher "
                                                 "deployment of this spec writes it"),
    (dict(cache_out="digits-{date}"), "sweep", "does not exist and no cache-teacher deployment"),
    # triggers
    (dict(event="distillery.cache.complete"), "on-new-cache", "trigger expects 'distillery.cache.complete', which "
                                                              "no flow emits"),
]


@pytest.mark.parametrize("change, deployment, message", CASES, ids=[c[2][:40] for c in CASES])
def test_deploy_check_refuses_in_one_line_what_a_run_would(tmp_path: Path, change: dict, deployment: str,
                                                           message: str) -> None:
    path = write_spec(tmp_path, **change)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    line = str(e.value)
    assert line.startswith(f"{path}, deployment '{deployment}': ") and "\n" not in line
    assert message.replace("{root}", str(tmp_path)) in line


def test_a_fitted_checkpoint_is_not_overwritten_by_a_deployment_unless_it_says_so(tmp_path: Path) -> None:
    (tmp_path / "teachers").mkdir()
    (tmp_path / "teachers" / "digits.pt").write_bytes(b"a teacher")
    with pytest.raises(SpecError, match="deployment 'fit': --out .* exists; pass --overwrite"):
        load_spec(write_spec(tmp_path))


def test_the_cli_check_is_one_line_exit_2(tmp_path: Path, cli) -> None:
    code, out = cli("deploy", str(write_spec(tmp_path, student="resnet999")), "--check")
    assert code == 2 and out.count("\n") == 1 and "unknown timm model 'resnet999'" in out


@pytest.mark.parametrize("name", ["../../x", "/etc", "..", "a/../../b", ".hidden"])
def test_a_flow_run_name_cannot_lead_a_run_outside_its_root(tmp_path: Path, name: str) -> None:
    start = datetime(2026, 12, 6, tzinfo=timezone.utc)
    path = Path(fill_template(f"{tmp_path}/runs/{{date}}/{{flow_run_name}}", start, name, name))
    assert path.parent == tmp_path / "runs" / "2026-12-06" and path.name not in ("", ".", "..")


def test_a_bad_template_is_refused_when_a_run_fills_it() -> None:
    with pytest.raises(TemplateError, match="takes no !conversion"):
        fill_template("runs/{date!r}", datetime.now(timezone.utc), "x", "x")
