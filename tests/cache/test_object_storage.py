"""A cache entirely on a real S3 endpoint (moto's server on 127.0.0.1, through s3fs): README "Caches on object
storage"."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from pipeline.cache.manifest import CacheError
from pipeline.cache.store import TeacherCache

BUCKET = "distillery-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A moto S3 server on a free local port with one empty bucket; s3fs and boto3 reach it through the
    standard AWS_ENDPOINT_URL (dummy credentials)."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    yield client
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def local_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_cache_train_inspect_verify_stats_on_s3(prefect_harness, s3_endpoint, cli, digits_teacher: Path,
                                                 tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory would land here
    cache = f"s3://{BUCKET}/caches/digits"
    code, out = cli("cache", "--dataset", "digits", "--checkpoint", str(digits_teacher), "--out", cache,
                    "--subset", "120", "--views", "1", "--shard-size", "60", "--batch-size", "60", "--lsh-bits", "32",
                    "--device", "cpu")
    assert code == 0, out
    keys = {o["Key"] for o in s3_endpoint.list_objects_v2(Bucket=BUCKET)["Contents"]}
    prefix = "caches/digits/"
    assert {prefix + "manifest.json", prefix + "shards/train-000000.tar", prefix + "shards/train-000001.tar",
            prefix + "lsh.faiss"} <= keys
    assert any(k.startswith(prefix + "arrays.zarr/") for k in keys)
    assert local_files(tmp_path) == set(), "nothing of the cache may land on local disk"

    runs = tmp_path / "runs"
    code, out = cli("train", "--cache", cache, "--student", "test_resnet", "--method", "kd", "--epochs", "1",
                    "--out", str(runs), "--device", "cpu", "--workers", "1")  # a worker process streams it
    assert code == 0, out
    assert list(runs.rglob("summary.json")), out

    code, out = cli("inspect", cache)
    assert code == 0 and "status=complete" in out and "N=120" in out, out
    code, out = cli("verify", cache, "--samples", "4", "--device", "cpu")
    assert code == 0 and "OK" in out, out
    code, out = cli("stats", cache, "--lsh-bits", "16")
    assert code == 0 and '"bits": 16' in out, out
    first = int(TeacherCache(cache).read("samples/ids")[0])
    code, out = cli("neighbors", cache, str(first), "--k", "2")
    assert code == 0 and "over 16 LSH bits" in out, out
    assert {p.split("/")[0] for p in local_files(tmp_path)} == {"runs"}, "only the student's run is local"

    s3_endpoint.delete_object(Bucket=BUCKET, Key=prefix + "shards/train-000001.tar")
    missing = f"{cache}/shards/train-000001.tar"
    code, out = cli("verify", cache, "--samples", "1", "--device", "cpu")
    assert code != 0 and f"shard 1: {missing} is missing" in out, out
    with pytest.raises(CacheError, match=f"^{missing} is missing;"):  # what a student streaming it gets
        list(TeacherCache(cache).shard_blocks(1))
