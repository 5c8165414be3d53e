"""Shared fixtures: one Prefect test server per session, a tiny digits teacher and its cache, the CLI in-process."""

from __future__ import annotations

import multiprocessing.forkserver
import os
import socket
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def share_the_cores() -> None:
    """Under pytest-xdist, each worker's thread pools (torch's, OpenMP's, MKL's) get the worker's share of the
    cores, not all of them: N workers each spinning up a pool the size of the machine slow every test down.
    Set in the environment, before torch is imported, so the processes a test starts inherit it too."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, str(threads))


share_the_cores()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault-injection tally (tests/faults/conftest.py): one line over every fault test this run reported.
    Here, not in tests/faults/, because pytest-xdist's controller loads only this conftest; the reports of
    all its workers reach its terminal reporter, so the tally is the whole run's."""
    outcomes: dict[str, str] = {}
    for key in ("passed", "failed", "error"):
        for report in terminalreporter.stats.get(key, []):
            if "tests/faults/" in getattr(report, "nodeid", "").replace("\\", "/"):
                if outcomes.get(report.nodeid) in (None, "passed"):
                    outcomes[report.nodeid] = key
    if outcomes:
        handled = sum(v == "passed" for v in outcomes.values())
        terminalreporter.write_line(
            f"fault injection: {len(outcomes)} faults tried, {handled} handled, {len(outcomes) - handled} not handled")


@pytest.fixture(scope="session", autouse=True)
def image_checks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where image folders' remembered checks go (pipeline.data.imagefolder): the session's, not the home's."""
    folder = tmp_path_factory.mktemp("image-checks")
    os.environ["DISTILLERY_IMAGE_CHECKS"] = str(folder)
    return folder


TINY_TEACHER = "test_resnet"  # timm's 0.4M-parameter ResNet: trains on digits in seconds


@pytest.fixture(scope="session")
def prefect_harness():
    """A real (temporary, local) Prefect server for the whole session; flows run against it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small teacher fitted on digits (2 epochs; enough for non-trivial, deterministic outputs)."""
    from pipeline.train.fit import FitConfig, fit_teacher

    out = tmp_path_factory.mktemp("teacher") / "digits-test_resnet.pt"
    fit_teacher(FitConfig(dataset="digits", model=TINY_TEACHER, out=str(out), epochs=2, workers=0))
    return out


@pytest.fixture(scope="session")
def cache_request(digits_teacher: Path):
    """Factory: the digits cache request of the tests, with any field overridden."""
    from pipeline.teacher.plan import CacheRequest

    def make(out: Path, **overrides) -> CacheRequest:
        fields = dict(dataset="digits", teacher=TINY_TEACHER, checkpoint=str(digits_teacher), out=str(out),
                      views=2, shard_size=400, batch_size=128, block_size=64, device="cpu")
        return CacheRequest(**{**fields, **overrides})

    return make


@pytest.fixture(scope="session")
def digits_cache(cache_request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete cache of the digits teacher: 1437 samples, 3 views, 4 shards, dense logits."""
    from pipeline.teacher.cache_pass import run_cache_pass

    out = tmp_path_factory.mktemp("cache") / "digits"
    run_cache_pass(cache_request(out))
    return out


@pytest.fixture(scope="session")
def digits_lsh_cache(digits_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of `digits_cache` given 64 LSH bits afterwards by `distillery stats --lsh-bits 64`, with
    building a teacher made to fail: the rebuild reads the stored features only."""
    import shutil

    from pipeline.cache.statistics import recompute_statistics
    from pipeline.teacher import model, plan

    def no_teacher(*args, **kwargs):
        raise AssertionError("`distillery stats` must not build the teacher")

    copy = tmp_path_factory.mktemp("lsh") / "digits"
    shutil.copytree(digits_cache, copy)
    with pytest.MonkeyPatch.context() as patch:
        for module, name in ((model, "build_teacher"), (plan, "build_teacher"), (plan, "shared_teacher")):
            patch.setattr(module, name, no_teacher)
        recompute_statistics(str(copy), lsh_bits=64)
    return copy


@pytest.fixture(scope="session")
def featmaps_cache(cache_request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ScaleKD cache of the digits teacher: 240 samples, 2 views, feature maps of the auto tap
    (layer3, 192x2x2) and the teacher tail that produces them (layer3)."""
    from pipeline.teacher.cache_pass import run_cache_pass

    out = tmp_path_factory.mktemp("cache") / "digits-featmaps"
    run_cache_pass(cache_request(out, subset=240, views=1, featmaps=True, teacher_tail=1, shard_size=120,
                                 block_size=40))
    return out


@pytest.fixture
def memory_url():
    """`memory://test`: fsspec's in-process filesystem (no server), everything under it removed afterwards."""
    import fsspec

    yield "memory://test"
    fs = fsspec.filesystem("memory")
    if fs.exists("/test"):
        fs.rm("/test", recursive=True)


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A real S3 endpoint: moto's server on a free port of 127.0.0.1 with one empty bucket; s3fs and boto3 reach
    it through the standard AWS_ENDPOINT_URL (dummy credentials). Yields `.client` (boto3), `.bucket` and
    `.keys()` (every key in the bucket). Skipped without the s3 extra (s3fs) and moto."""
    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its buckets per process, not per server: empty it, or a test sees the objects of the one before.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    # DataLoader workers fork from this process's forkserver, which keeps the environment it started with: one
    # an earlier test started (as under pytest-xdist, where files run in another order) lacks the endpoint.
    multiprocessing.forkserver._forkserver._stop()
    client = boto3.client("s3", endpoint_url=endpoint)
    bucket = "distillery-test"
    client.create_bucket(Bucket=bucket)
    yield SimpleNamespace(client=client, bucket=bucket, keys=lambda: {
        o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])})
    s3fs.S3FileSystem.clear_instance_cache()
    multiprocessing.forkserver._forkserver._stop()  # the next test's workers must not see this endpoint
    server.stop()


@pytest.fixture
def cli(monkeypatch, capsys) -> Callable[..., tuple[int, str]]:
    """Run `distillery ARGS...` in this process (so it talks to the session's Prefect test server);
    returns the exit code and stdout + stderr (errors go to stderr, results to stdout)."""
    from flows.cli import main

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["distillery", *args])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    return run
