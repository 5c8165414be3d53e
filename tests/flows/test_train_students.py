"""`distillery train` and the `train-students` flow on a real local Prefect server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_train_maps_students_over_one_cache_and_publishes_a_comparison(prefect_harness, digits_cache: Path,
                                                                       tmp_path: Path, cli) -> None:
    from prefect.client.orchestration import get_client

    code, out = cli("train", "--cache", str(digits_cache), "--student", "test_resnet",
                    "--student", "test_convnext", "--method", "ce", "--method", "kd:T=2", "--epochs", "1",
                    "--seed", "4", "--workers", "0", "--out", str(tmp_path / "runs"))
    assert code == 0, out
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["test_convnext-ce+kd-T2-s4", "test_resnet-ce+kd-T2-s4"]
    for run in runs:
        summary = json.loads((tmp_path / "runs" / run / "summary.json").read_text())
        assert summary["methods"] == ["ce", "kd:T=2"] and summary["seed"] == 4 and summary["epochs"] == 1
        assert {"config.json", "metrics.jsonl", "student.pt", "checkpoint.pt"} <= {
            p.name for p in (tmp_path / "runs" / run).iterdir()}
    # The comparison table comes last.
    last = out.strip().splitlines()[-8:]
    assert any("test_resnet" in line and "ce+kd:T=2" in line for line in last)
    assert any("test_convnext" in line for line in last)

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.train_students import sweep_artifact_key

    key = sweep_artifact_key(str(digits_cache), None)
    assert key.startswith("students-digits-test-resnet-")
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                           sort=ArtifactSort.CREATED_DESC, limit=1)
    assert artifact.type == "table" and "test_convnext" in str(artifact.data)
    for column in ("student", "methods", "val_accuracy", "train_seconds", "params"):
        assert column in artifact.data


@pytest.mark.parametrize("args, message", [
    (["--method", "ce", "--method", "wkd"], "unknown method 'wkd'"),
    (["--method", "ce", "--lr", "0"], "--lr must be > 0"),
    (["--method", "ce", "--epochs", "0"], "--epochs must be >= 1"),
])
def test_bad_input_is_one_line_before_any_flow_runs(digits_cache: Path, tmp_path: Path, cli, args, message) -> None:
    code, out = cli("train", "--cache", str(digits_cache), "--student", "test_resnet", "--out", str(tmp_path / "run"),
                    *args)
    assert code == 2
    assert out.strip().count("\n") == 0 and message in out and out.startswith("error:")
    assert not (tmp_path / "run").exists()


def test_a_spec_task_timeout_fails_a_student_task_that_runs_longer(prefect_harness, digits_cache: Path,
                                                                   tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.deploy import load_spec
    from flows.train_students import train_students

    spec = tmp_path / "spec.toml"
    spec.write_text(f"""
[[deployment]]
name = "bounded"
flow = "train-students"
[deployment.parameters]
cache = "{digits_cache}"
out = "{tmp_path}/runs/{{flow_run_name}}"
students = [{{ student = "test_resnet", methods = ["ce"] }}]
settings = {{ epochs = 200, workers = 0 }}
task_timeout = 1
""")
    [deployment] = load_spec(spec).deployments
    state = train_students(**deployment.parameters, return_state=True)
    assert state.is_failed()
    with get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[state.state_details.flow_run_id])))
        [student] = [t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[flow_run.id]))) if t.name.startswith("train-")]
    assert student.state.name == "TimedOut" and "exceeded timeout of 1.0 second(s)" in student.state.message
    [run_dir] = (tmp_path / "runs").iterdir()
    assert not (run_dir / "summary.json").exists()  # stopped long before its 200 epochs


def test_one_train_call_runs_a_sweep_file_plus_students_times_combinations(prefect_harness, featmaps_cache: Path,
                                                                           tmp_path: Path, cli) -> None:
    sweep = tmp_path / "sweep.toml"  # deploy/nightly.toml's train-students parameters
    sweep.write_text(f"""
cache = "{featmaps_cache}"
out = "{tmp_path / 'runs'}"
students = [{{ student = "test_resnet", methods = ["ce"] }}]
[settings]
epochs = 1
workers = 0
seed = 3
[settings.optim]
optimizer = "sgd"
lr = 0.01
""")
    code, out = cli("train", "--sweep", str(sweep), "--student", "test_resnet", "--combo", "ce+kd:T=2",
                    "--combo", "ce+fitnet", "--seed", "5", "--lr", "0.005")  # an option given here overrides the file's
    assert code == 0, out
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["test_resnet-ce+fitnet-s5", "test_resnet-ce+kd-T2-s5", "test_resnet-ce-s5"]
    settings = json.loads((tmp_path / "runs" / runs[0] / "config.json").read_text())["settings"]
    assert (settings["seed"], settings["epochs"], settings["optim"]["optimizer"], settings["optim"]["lr"]) == (
        5, 1, "sgd", 0.005)
    methods = {json.dumps(json.loads((tmp_path / "runs" / r / "summary.json").read_text())["methods"]) for r in runs}
    assert methods == {'["ce"]', '["ce", "kd:T=2"]', '["ce", "fitnet"]'}
    assert out.count("test_resnet") >= 3 and "ce+fitnet" in out


def test_a_sweep_file_with_an_unknown_key_or_a_bad_setting_is_one_line(tmp_path: Path, cli) -> None:
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('students = [{ student = "test_resnet", methods = ["ce"] }]\n[settings]\nepoch = 1\n')
    code, out = cli("train", "--sweep", str(sweep), "--cache", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and out == f"error: --sweep {sweep}: settings: --epoch: extra inputs are not permitted, not 1\n"
    sweep.write_text('students = [{ student = "test_resnet", methods = ["ce"] }]\n[settings.optim]\nlr = 0\n')
    code, out = cli("train", "--sweep", str(sweep), "--cache", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and out == f"error: --sweep {sweep}: settings: --lr must be > 0, not 0.0\n"


def test_combo_splits_methods_at_a_plus_before_a_name_only() -> None:
    from flows.sweep import combination

    assert combination("ce+kd:T=2,alpha=0.5+fitnet") == ["ce", "kd:T=2,alpha=0.5", "fitnet"]
    assert combination("ce+tcs:variance=1e+0") == ["ce", "tcs:variance=1e+0"]


def test_a_sweeps_check_hashes_each_shard_once_and_parses_each_spec_once(digits_cache: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """The fail-fast check of three students opens and verifies the cache once, and parses each method spec
    once, when its student is configured: planning and checking the sweep parse none again (counted around the
    real functions, which still run)."""
    import pipeline.cache.reader as reader
    from flows.train_students import plan_sweep
    from pipeline.methods import MethodSpec
    from pipeline.train.config import RunSettings, StudentSpec

    shards = {str(p) for p in reader.TeacherCache(digits_cache).shard_paths()}
    hashed, parsed = [], []
    real_sha256, real_parse = reader.sha256_file, MethodSpec.parse
    monkeypatch.setattr(reader, "sha256_file", lambda path: hashed.append(str(path)) or real_sha256(path))
    monkeypatch.setattr(MethodSpec, "parse", lambda text: parsed.append(text) or real_parse(text))
    students = [StudentSpec(student=name, methods=["ce", "kd:T=2"]) for name in ("test_resnet", "test_convnext",
                                                                                 "resnet10t")]
    assert parsed == ["ce", "kd:T=2"] * 3
    configs = plan_sweep(str(digits_cache), students, str(tmp_path / "runs"), RunSettings())
    assert len(configs) == 3 and parsed == ["ce", "kd:T=2"] * 3
    assert sorted(p for p in hashed if p in shards) == sorted(shards)


def test_a_sweep_from_the_command_line_is_checked_once(prefect_harness, digits_cache: Path, tmp_path: Path, cli,
                                                       monkeypatch) -> None:
    """`distillery train` checks the sweep before Prefect starts, and its flow does not check it again: the
    fail-fast check runs once per student, each shard file is hashed once by that check and once by each
    student's own run, and each method spec is parsed once, from the command line to the trained runs (counted
    around the real functions, which still run)."""
    from collections import Counter

    import pipeline.cache.reader as reader
    import pipeline.train.loop as loop
    from pipeline.methods import MethodSpec

    shards = {str(p) for p in reader.TeacherCache(digits_cache).shard_paths()}
    checked, hashed, parsed = [], [], []
    real_check, real_sha256, real_parse = loop.check_run, reader.sha256_file, MethodSpec.parse
    monkeypatch.setattr(loop, "check_run", lambda config, *args, **kw: checked.append(config.out) or
                        real_check(config, *args, **kw))
    monkeypatch.setattr(reader, "sha256_file", lambda path: hashed.append(str(path)) or real_sha256(path))
    monkeypatch.setattr(MethodSpec, "parse", lambda text: parsed.append(text) or real_parse(text))
    code, out = cli("train", "--cache", str(digits_cache), "--out", str(tmp_path / "runs"), "--student",
                    "test_resnet", "--method", "ce", "--combo", "ce+kd:T=2", "--epochs", "1", "--workers", "0")
    assert code == 0, out
    runs = sorted(str(p) for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2 and sorted(checked) == runs
    assert Counter(p for p in hashed if p in shards) == {p: 1 + len(runs) for p in shards}
    assert sorted(parsed) == ["ce", "ce", "kd:T=2"]  # --method ce, --combo ce+kd:T=2
