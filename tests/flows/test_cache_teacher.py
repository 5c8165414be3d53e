"""The `cache-teacher` Prefect flow on a real local Prefect server, and `distillery cache` killed mid-pass."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.manifest import CacheError, Manifest
from pipeline.cache.reader import TeacherCache


def test_flow_caches_and_publishes_artifacts(prefect_harness, cache_request, digits_cache: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, ArtifactFilterType

    from flows.cache_teacher import cache_artifact_key, cache_teacher

    result = cache_teacher(cache_request(tmp_path / "flow"))
    assert result.written_shards == 4 and result.skipped_shards == 0
    assert result.images == 1437 * 3 and result.images_per_second > 0
    flow_cache, reference = TeacherCache(tmp_path / "flow"), TeacherCache(digits_cache)
    for name in ("logits/dense", "features/pooled", "stats/pca/components", "stats/cka/ir"):
        np.testing.assert_array_equal(flow_cache.read(name), reference.read(name), err_msg=name)

    keys = {kind: cache_artifact_key(kind, flow_cache) for kind in ("arrays", "summary", "report")}
    assert keys["arrays"].startswith("teacher-cache-arrays-digits-test-resnet-")
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys.values()))))
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))
    [ours] = [a for a in progress if str(tmp_path / "flow") in a.description]
    assert ours.data == 100.0  # updated as each shard finished
    found = {a.key: a for a in artifacts}
    assert found[keys["arrays"]].type == "table" and "features/pooled" in str(found[keys["arrays"]].data)
    assert found[keys["summary"]].type == "markdown"
    summary = found[keys["summary"]].data
    for heading in ("## Manifest", "## Storage", "## Teacher accuracy per view", "## PCA of pooled features",
                    "## CKA category interrelations", "## Gaussian statistics", "## LSH codes"):
        assert heading in summary
    assert "Teacher pass: 4311 images" in summary and "| logits/dense | 1437x3x10 | float16 |" in summary
    report = (tmp_path / "flow").resolve() / "report.html"
    pointer = found[keys["report"]]  # key figures and where the page lies, not a file:// link
    assert pointer.type == "markdown" and "file://" not in pointer.data
    assert "| samples | 1,437 |" in pointer.data and "| views | 3 |" in pointer.data
    assert "| teacher accuracy (view 0) | " in pointer.data and f"{report.name}" in pointer.data
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>") and "PCA of pooled features" in page and "data:image/png;base64," in page
    assert flow_cache.verify_integrity() == []  # the report is no file the integrity checks know or refuse

    again = cache_teacher(cache_request(tmp_path / "flow"))
    assert again.written_shards == 0 and again.skipped_shards == 4


def test_the_flow_as_served_takes_the_writer_lock(prefect_harness, cache_request, tmp_path: Path) -> None:
    """A deployment runs `cache_teacher` itself, with no command line around it: the flow's pass takes the
    cache's writer lock, so a second writer of the same cache is refused before anything is written."""
    from flows.cache_teacher import cache_teacher
    from pipeline.cache.lock import cache_lock

    out = tmp_path / "locked"
    with cache_lock(out), pytest.raises(CacheError, match="another distillery process is writing"):
        cache_teacher(cache_request(out, subset=40, shard_size=20))
    assert not (out / "manifest.json").exists()


def _records(root: Path) -> list[Path]:
    return sorted((root / "shards").glob("train-*.json"))


@pytest.mark.slow
def test_cli_killed_mid_pass_resumes_and_matches_an_uninterrupted_run(prefect_harness, digits_teacher: Path,
                                                                      cache_request, tmp_path: Path) -> None:
    from prefect.settings import get_current_settings

    from pipeline.teacher.cache_pass import run_cache_pass

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "flows.cli", "cache", "--dataset", "digits", "--teacher", "test_resnet",
            "--checkpoint", str(digits_teacher), "--out", str(out), "--subset", "640", "--views", "4",
            "--input-size", "64", "--shard-size", "64", "--batch-size", "128", "--device", "cpu"]
    # The CLI talks to the session's test server (a real one) instead of booting its own each time.
    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while len(_records(out)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = {p.name: p.stat().st_mtime_ns for p in _records(out)}
    assert 3 <= len(done_at_kill) < 10, "the pass was not interrupted midway"
    assert Manifest.load(out).status == "partial"

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"({len(done_at_kill)} shards reused)" in " ".join(rerun.stdout.split())
    assert {p.name: p.stat().st_mtime_ns for p in _records(out) if p.name in done_at_kill} == done_at_kill

    reference = tmp_path / "reference"
    run_cache_pass(cache_request(reference, subset=640, views=4, input_size=64, shard_size=64))
    resumed, full = TeacherCache(out), TeacherCache(reference)
    for name in list(full.manifest.arrays) + full.manifest.stats.arrays:
        np.testing.assert_array_equal(resumed.read(name), full.read(name), err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("signum, recorded", [(signal.SIGINT, True), (signal.SIGTERM, True), (signal.SIGINT, False)],
                         ids=["SIGINT-recorded", "SIGTERM-recorded", "SIGINT-local"])
def test_cli_interrupted_says_one_line_and_the_same_command_resumes(prefect_harness, digits_teacher: Path,
                                                                   tmp_path: Path, signum: int,
                                                                   recorded: bool) -> None:
    """Ctrl-C or SIGTERM after the first shard, the pass a flow run recorded on a server or (no PREFECT_API_URL)
    the library in the command's process, stopped at its next batch: one line, exit 128 + the signal, the cache
    left partial and completed by the same command, and it verifies (flows/signals.py, pipeline/stop.py)."""
    from prefect.settings import get_current_settings

    out = tmp_path / "interrupted"
    args = [sys.executable, "-m", "flows.cli", "cache", "--dataset", "digits", "--teacher", "test_resnet",
            "--checkpoint", str(digits_teacher), "--out", str(out), "--subset", "640", "--views", "4",
            "--input-size", "64", "--shard-size", "64", "--batch-size", "128", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    if recorded:
        env["PREFECT_API_URL"] = str(get_current_settings().api.url)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not _records(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    sent = time.time()
    _, stderr = proc.communicate(timeout=120)
    assert time.time() - sent < 60, "the command did not end promptly"
    assert proc.returncode == 128 + signum, stderr
    assert stderr == "interrupted; rerun the same command to resume\n"
    assert Manifest.load(out).status == "partial" and len(_records(out)) < 10

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert Manifest.load(out).status == "complete"
    verified = subprocess.run([sys.executable, "-m", "flows.cli", "verify", str(out), "--samples", "8"], env=env,
                              capture_output=True, text=True, timeout=300)
    assert verified.returncode == 0 and "OK:" in verified.stdout, verified.stdout + verified.stderr
