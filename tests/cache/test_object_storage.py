"""A cache and a student's run entirely on a real S3 endpoint (moto's server on 127.0.0.1, through s3fs):
README "Caches on object storage"."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cache.lock import cache_lock
from pipeline.cache.manifest import CacheError
from pipeline.cache.reader import TeacherCache
from pipeline.object_store import location


def local_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_cache_train_inspect_verify_stats_on_s3(prefect_harness, s3_endpoint, cli, digits_teacher: Path,
                                                 tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory would land here
    cache = f"s3://{s3_endpoint.bucket}/caches/digits"
    code, out = cli("cache", "--dataset", "digits", "--checkpoint", str(digits_teacher), "--out", cache,
                    "--subset", "120", "--views", "1", "--shard-size", "60", "--batch-size", "60", "--lsh-bits", "32",
                    "--device", "cpu")
    assert code == 0, out
    keys = s3_endpoint.keys()
    prefix = "caches/digits/"
    assert {prefix + "manifest.json", prefix + "shards/train-000000.tar", prefix + "shards/train-000001.tar",
            prefix + "lsh.faiss"} <= keys
    assert any(k.startswith(prefix + "arrays.zarr/") for k in keys)
    assert local_files(tmp_path) == set(), "nothing of the cache may land on local disk"

    code, out = cli("train", "--cache", cache, "--student", "test_resnet", "--method", "kd", "--epochs", "1",
                    "--out", f"s3://{s3_endpoint.bucket}/runs/kd", "--device", "cpu",
                    "--workers", "1")  # a worker process streams it
    assert code == 0, out
    run = "runs/kd/test_resnet-kd-s0"  # the student's own directory in --out, as on local disk
    assert {f"{run}/summary.json", f"{run}/student.pt", f"{run}/checkpoint.pt"} <= s3_endpoint.keys(), out

    code, out = cli("inspect", cache)
    assert code == 0 and "status=complete" in out and "N=120" in out, out
    code, out = cli("verify", cache, "--samples", "4", "--device", "cpu")
    assert code == 0 and "OK" in out, out
    code, out = cli("stats", cache, "--lsh-bits", "16")
    assert code == 0 and '"bits": 16' in out, out
    first = int(TeacherCache(cache).read("samples/ids")[0])
    code, out = cli("neighbors", cache, str(first), "--k", "2")
    assert code == 0 and "over 16 LSH bits" in out, out
    assert local_files(tmp_path) == set(), "nothing of the cache or the student's run may land on local disk"

    s3_endpoint.client.delete_object(Bucket=s3_endpoint.bucket, Key=prefix + "shards/train-000001.tar")
    missing = f"{cache}/shards/train-000001.tar"
    code, out = cli("verify", cache, "--samples", "1", "--device", "cpu")
    assert code != 0 and f"shard 1: {missing} is missing" in out, out
    with pytest.raises(CacheError, match=f"^{missing} is missing;"):  # what a student streaming it gets
        list(TeacherCache(cache).shard_blocks(1))


# A writer holding a cache's lock until killed: its SIGKILL runs no `finally`, so the lock object stays behind.
HOLD_CACHE_LOCK = ("import sys, time; from pipeline.cache.lock import cache_lock\n"
                   "with cache_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)")


def test_one_writer_per_cache_on_s3_and_a_missing_bucket_is_one_line(s3_endpoint, cli, tmp_path: Path,
                                                                       monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a mangled `s3:/...` path would land here
    code, out = cli("cache", "--dataset", "digits", "--teacher", "resnet10t", "--device", "cpu",
                    "--out", "s3://no-such-bucket/caches/digits")
    assert code == 2 and re.fullmatch(r"error: --out s3://no-such-bucket/caches/digits: cannot write there "
                                      r"\([^\n]+\); choose a writable --out\n", out), out
    assert local_files(tmp_path) == set()
    assert [b["Name"] for b in s3_endpoint.client.list_buckets()["Buckets"]] == [s3_endpoint.bucket]
    assert s3_endpoint.keys() == set()

    cache = f"s3://{s3_endpoint.bucket}/caches/digits"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CACHE_LOCK, cache], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        code, out = cli("stats", cache)  # rewrites statistics: a writer like any other
        assert code == 2 and re.fullmatch(rf"error: another distillery process is writing {cache} \(pid "
                                          rf"{holder.pid} on {socket.gethostname()} since .+\); wait for it to "
                                          rf"finish, then run this again\n", out), out
        with pytest.raises(FileExistsError):  # the server refuses a second create (If-None-Match: *), no race
            location(cache + "/.writer.lock").create(b"{}")
    finally:
        holder.kill()
        holder.wait()
    assert s3_endpoint.keys() == {"caches/digits/.writer.lock"}  # left by the killed holder
    with cache_lock(cache):  # its process is gone: the next writer on this host takes the lock over
        assert json.loads(s3_endpoint.client.get_object(Bucket=s3_endpoint.bucket, Key="caches/digits/.writer.lock")
                          ["Body"].read())["pid"] == os.getpid()
    assert s3_endpoint.keys() == set()
