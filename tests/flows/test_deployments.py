"""Prefect in production, against a real `prefect server start` (its own PREFECT_HOME, a free port):
`distillery deploy SPEC.toml` serves an interval-scheduled student sweep and an event-triggered one; a
completed cache starts the triggered sweep; per-epoch log lines reach the server; the Prefect CLI and the
Prefect UI (headless Chromium) list the flow runs."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PREFECT = str(Path(sys.executable).parent / "prefect")


@dataclass
class Server:
    url: str
    env: dict[str, str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 1.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`prefect server start` on 127.0.0.1 with a temporary PREFECT_HOME, ready when /api/health answers."""
    home = tmp_path_factory.mktemp("prefect-home")
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    port = url.rsplit(":", 1)[1].split("/")[0]
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            assert server.poll() is None, (home / "server.log").read_text()[-2000:]
            return False

    try:
        wait_for(healthy, 180, "the Prefect server's /api/health")
        yield Server(url, env)
    finally:
        server.terminate()
        server.wait(60)
        log.close()


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 digits through an untrained test_resnet, 1 augmented view, 2 shards (no server needed)."""
    from pipeline.teacher.plan import CacheRequest
    from pipeline.teacher.cache_pass import run_cache_pass

    out = tmp_path_factory.mktemp("cache") / "tiny"
    run_cache_pass(CacheRequest(dataset="digits", teacher="test_resnet", out=str(out), subset=200, views=1,
                                shard_size=100, block_size=50, device="cpu"))
    return out


STUDENTS = '[{ student = "test_resnet", methods = ["ce"] }, { student = "test_resnet", methods = ["ce", "kd:T=2"] }]'
SETTINGS = "{ epochs = 1, workers = 0, batch_size = 64 }"


@pytest.fixture(scope="module")
def served(prefect_server: Server, tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`distillery deploy spec.toml` running against the server: an interval sweep and a triggered sweep."""
    root = tmp_path_factory.mktemp("served")
    spec = root / "spec.toml"
    spec.write_text(f"""
concurrency = {{ accelerator = 1 }}

[[deployment]]
name = "every-20s"
flow = "train-students"
interval = 20
[deployment.parameters]
cache = "{tiny_cache}"
out = "{root}/scheduled/{{date}}/{{flow_run_name}}"
sweep = "scheduled sweep"
students = {STUDENTS}
settings = {SETTINGS}

[[deployment]]
name = "on-new-cache"
flow = "train-students"
[deployment.parameters]
out = "{root}/triggered/{{flow_run_name}}"
students = {STUDENTS}
settings = {SETTINGS}
[[deployment.triggers]]
expect = ["distillery.cache.completed"]
parameters = {{ cache = "{{{{ event.resource['distillery.cache.path'] }}}}" }}
""")
    log = open(root / "deploy.log", "wb")  # noqa: SIM115 - closed at teardown
    runner = subprocess.Popen([sys.executable, "-m", "flows.cli", "deploy", str(spec), "--limit", "1"],
                              env=prefect_server.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield root
    finally:
        runner.terminate()
        runner.wait(60)
        log.close()


def flow_runs(deployment: str, state: str = "COMPLETED") -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterName, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[state]))))


@pytest.fixture
def api(prefect_server: Server) -> Iterator[Server]:
    """This test's Prefect client talks to the module's server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        yield prefect_server


def test_interval_deployment_completes_two_runs_each_in_its_own_directory_with_epoch_logs(api, served: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId,
                                                LogFilter, LogFilterFlowRunId)

    runs = wait_for(lambda: len(found := flow_runs("every-20s")) >= 2 and found, 420, "2 completed scheduled runs")
    with get_client(sync_client=True) as client:
        for run in runs[:2]:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            students = [t for t in tasks if t.name.startswith("train-")]
            assert len(students) == 2 and all(t.state.is_completed() for t in students)

            def epoch_lines() -> list[str]:
                logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
                return [log.message for log in logs if "epoch 1/1: loss" in log.message]

            # Logs reach the server in batches from a background worker, possibly after the run's final state.
            lines = wait_for(lambda: len(found := epoch_lines()) >= 2 and found, 60, "both students' epoch logs")
            assert len(lines) == 2 and all("val accuracy 0." in line for line in lines), lines
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["students-scheduled-sweep"])), limit=1)
        assert artifact.type == "table" and "ce+kd:T=2" in str(artifact.data)
    dirs = sorted((served / "scheduled").glob("*/*"))
    assert {d.name for d in dirs} >= {r.name for r in runs[:2]}  # one directory per flow run, named by it
    for run in runs[:2]:
        [run_dir] = [d for d in dirs if d.name == run.name]
        assert sorted(p.name for p in run_dir.iterdir()) == ["test_resnet-ce+kd-T2-s0", "test_resnet-ce-s0"]
        assert (run_dir / "test_resnet-ce-s0" / "summary.json").is_file()


def test_a_completed_cache_triggers_the_sweep_deployment_on_it(api, served: Path, tiny_cache: Path,
                                                               tmp_path: Path) -> None:
    new_cache = tmp_path / "fresh-cache"
    made = subprocess.run([sys.executable, "-m", "flows.cli", "cache", "--dataset", "digits", "--teacher",
                           "test_resnet", "--subset", "120", "--views", "1", "--shard-size", "60", "--device", "cpu",
                           "--out", str(new_cache)], env=api.env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    [run] = wait_for(lambda: flow_runs("on-new-cache"), 300, "the triggered sweep to complete")
    assert run.parameters["cache"] == str(new_cache)
    [run_dir] = (served / "triggered").iterdir()
    assert run_dir.name == run.name
    for student in run_dir.iterdir():
        assert str(new_cache) in (student / "summary.json").read_text()


def test_prefect_cli_lists_deployments_and_flow_runs(api, served: Path) -> None:
    completed = wait_for(lambda: flow_runs("every-20s"), 420, "a completed scheduled run")
    env = {**api.env, "COLUMNS": "300"}  # rich tables truncate cells to the terminal's width
    deployments = subprocess.run([PREFECT, "deployment", "ls"], env=env, capture_output=True, text=True, timeout=120)
    assert deployments.returncode == 0, deployments.stderr
    assert "train-students/every-20s" in deployments.stdout and "train-students/on-new-cache" in deployments.stdout
    runs = subprocess.run([PREFECT, "flow-run", "ls", "--flow-name", "train-students", "--state-type", "COMPLETED"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert runs.returncode == 0, runs.stderr
    assert completed[0].name in runs.stdout and "COMPLETED" in runs.stdout


def ui_page_dom(chromium: str, url: str, profile: Path) -> str:
    """The DOM of `url` after its scripts ran (the UI is a single-page app that fetches from the API)."""
    # The runs list draws its rows in animation frames and only those in view: a tall window and every
    # compositor stage before each draw, or the dump can hold the page without its rows.
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", "--window-size=1400,3000",
                           "--run-all-compositor-stages-before-draw", "--virtual-time-budget=15000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120).stdout


def test_the_prefect_ui_lists_a_completed_scheduled_run(api, served: Path, tmp_path: Path) -> None:
    import prefect

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; `make test` installs it)")
    ui_build = Path(prefect.__path__[0]) / "server" / "ui" / "index.html"
    if not ui_build.is_file():
        pytest.skip(f"this prefect install has no UI build ({ui_build} is missing)")
    base = api.url.removesuffix("/api")
    try:
        with urllib.request.urlopen(f"{base}/", timeout=10) as r:
            page = r.read().decode()
    except OSError as e:
        pytest.skip(f"the Prefect server does not serve its UI at {base}/ ({e})")
    if '<div id="app">' not in page:
        pytest.skip(f"the Prefect server's answer at {base}/ is not the UI")
    [run, *_] = wait_for(lambda: flow_runs("every-20s"), 420, "a completed scheduled run")
    dom = wait_for(lambda: (d := ui_page_dom(chromium, f"{base}/runs", tmp_path / "profile")) and run.name in d and d,
                   90, f"the UI's runs page to list {run.name}", interval=2)
    assert "Prefect Server" in dom and "train-students" in dom and "Completed" in dom  # the row: flow, run, state
