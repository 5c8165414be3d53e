"""`distillery train` and the `train-students` flow on a real local Prefect server."""

from __future__ import annotations

import json
import re
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
    table = json.loads(artifact.data)  # as the command's table shows it: percent, epochs and seed
    assert [(row["student"], row["epochs"], row["seed"]) for row in table] == [("test_resnet", "1", "4"),
                                                                               ("test_convnext", "1", "4")]
    assert all(re.fullmatch(r"\d+\.\d\d%", row["val_accuracy"]) for row in table)
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    names = ["train-test_convnext-ce+kd:T=2", "train-test_resnet-ce+kd:T=2"]  # student and methods in the graph
    with get_client(sync_client=True) as client:
        assert names == sorted({r.name for r in client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=names)))})

    # A lone student trained into the same --out later: beside the sweep's, in the same shape, read with them.
    code, out = cli("train", "--cache", str(digits_cache), "--student", "test_resnet", "--method", "ce", "--epochs",
                    "1", "--seed", "4", "--workers", "0", "--out", str(tmp_path / "runs"))
    assert code == 0, out
    shapes = {p.name: sorted(f.name for f in p.iterdir()) for p in (tmp_path / "runs").iterdir()}
    assert sorted(shapes) == [*runs, "test_resnet-ce-s4"] and len({tuple(v) for v in shapes.values()}) == 1
    code, out = cli("runs", str(tmp_path / "runs"))
    assert code == 0 and "3 runs, 3 settings" in out, out


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
    [flow_run_dir] = (tmp_path / "runs").iterdir()
    assert [p.name for p in flow_run_dir.iterdir()] == ["test_resnet-ce-s0"]  # a lone student's own subdirectory
    assert not (flow_run_dir / "test_resnet-ce-s0" / "summary.json").exists()  # stopped long before its 200 epochs


def test_a_sweep_task_timeout_stops_a_local_train_at_a_step_in_one_line(digits_cache: Path, tmp_path: Path) -> None:
    """No server to record the run: `distillery train --sweep` honours the file's task_timeout as the flow does,
    the student stopped before its next step (`pipeline.stop.time_limit`), one line, exit 2, no summary."""
    import os
    import subprocess
    import sys

    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f"""
cache = "{digits_cache}"
out = "{tmp_path}/run"
students = [{{ student = "test_resnet", methods = ["ce"] }}]
settings = {{ epochs = 200, workers = 0 }}
task_timeout = 1
""")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--sweep", str(sweep)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == (f"error: student test_resnet [ce] ran past its task_timeout of 1 s and stopped before its "
                           f"next step; {tmp_path}/run/test_resnet-ce-s0 resumes from its last whole epoch (rerun "
                           f"with --resume), or raise task_timeout in the sweep file\n")
    run = tmp_path / "run" / "test_resnet-ce-s0"
    assert (run / "config.json").exists() and not (run / "summary.json").exists()


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
    assert code == 2 and out == f"error: --sweep {sweep}: settings: --lr must be > 0 and <= 10, not 0.0\n"


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


@pytest.mark.slow
@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "local"])
def test_sigterm_stops_train_at_a_step_cancelled_and_resume_completes_it(prefect_harness, digits_cache: Path,
                                                                        tmp_path: Path, recorded: bool) -> None:
    """SIGTERM to a real `distillery train` after its first epoch: it ends within seconds with one line and exit
    143, (recorded on a server) the flow run and the student's task Cancelled, the run directory holds the last
    whole epoch and no summary; the same command with --resume completes it (flows/signals.py,
    pipeline/stop.py)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.settings import get_current_settings

    args = [sys.executable, "-m", "flows.cli", "train", "--cache", str(digits_cache), "--student", "test_resnet",
            "--method", "ce", "--epochs", "4", "--workers", "0", "--out", str(tmp_path / "runs")]
    out = tmp_path / "runs" / "test_resnet-ce-s0"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    if recorded:
        env["PREFECT_API_URL"] = str(get_current_settings().api.url)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    _, stderr = proc.communicate(timeout=120)
    assert time.time() - sent < 30, "the command did not stop promptly"
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr == "interrupted; rerun the same command with --resume to continue from the last whole epoch\n"
    assert not (out / "summary.json").exists()
    assert (out / "checkpoint.pt").exists()
    if recorded:
        assert_cancelled(tmp_path / "runs")

    rerun = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 4
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert epochs == [0, 1, 2, 3]  # each epoch once: nothing of the stopped one was logged


def assert_cancelled(out: Path) -> None:
    """The `train-students` flow run that trained into `--out` `out`, and its student's task, ended Cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        [flow_run] = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(), limit=50,
                                                       sort=FlowRunSort.EXPECTED_START_TIME_DESC)
                      if r.parameters.get("out") == str(out)]
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run.id])))
    assert flow_run.state.type.value == "CANCELLED", flow_run.state
    [student] = [t for t in tasks if t.name.startswith("train-test_resnet")]
    assert student.state.type.value == "CANCELLED", student.state
