"""Errors inside workers (issue 29, class 6): a damaged cache streamed from object storage by a DataLoader
worker (the default `--workers 1`) or by the process itself (0), and a Prefect task's timeout firing as
designed, each end in one line naming the culprit and what to do, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from forgery import REPO

DAMAGED_CHUNK = "arrays.zarr/logits/dense/c/1/0/0"
"""Shard 1's teacher logits (rows 40-80): read only when the student's stream reaches shard 1."""


def bucket_bytes(s3) -> dict[str, bytes]:
    return {key: s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read() for key in sorted(s3.keys())}


@pytest.mark.parametrize("workers", ["1", "0"])
def test_a_damaged_cache_on_s3_streamed_by_a_worker(small_cache: Path, s3_endpoint, tmp_path: Path,
                                                     workers: str) -> None:
    """A zarr chunk of the logits replaced by another valid one (a lost write, no digest recomputed): the
    student's stream finds it in its worker, and the user reads the reader's one line, exit 2."""
    from numcodecs.zstd import compress

    for path in sorted(p for p in small_cache.rglob("*") if p.is_file()):
        name = path.relative_to(small_cache).as_posix()
        data = compress(np.zeros(1600, np.uint8).tobytes(), 1) if name == DAMAGED_CHUNK else path.read_bytes()
        s3_endpoint.client.put_object(Bucket=s3_endpoint.bucket, Key=f"cache/{name}", Body=data)
    before = bucket_bytes(s3_endpoint)
    cache = f"s3://{s3_endpoint.bucket}/cache"
    result = subprocess.run(
        ["prlimit", f"--as={5 << 30}", sys.executable, "-m", "flows.cli", "train", "--cache", cache, "--student",
         "test_resnet", "--method", "kd", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run"),
         "--workers", workers],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    # The only other line: this small teacher is near chance, which `train` warns about before it starts.
    assert result.returncode == 2 and len(errors) == 1 and all(
        line.startswith("warning:") for line in lines if line not in errors), result.stderr[-3000:]
    assert errors[0] == (f"error: {cache}: shard 1 (rows 40-80): array logits/dense differs from its digest (a lost "
                         f"or changed zarr chunk); repair with `distillery verify {cache} --repair` (needs the "
                         f"teacher checkpoint) or re-run the `distillery cache` command that made it")
    assert bucket_bytes(s3_endpoint) == before  # nothing of the cache rewritten or lost


def test_a_student_task_timeout_is_one_line_naming_the_task_and_its_bound(prefect_harness, small_cache: Path,
                                                                         tmp_path: Path, cli) -> None:
    """`task_timeout = 1` in a sweep file, firing as designed on a recorded run (the only path that has task
    timeouts: without a server the library trains in-process): one line naming the task and what to raise,
    exit 2, no summary written, the cache untouched."""
    from forgery import tree_bytes

    before = tree_bytes(small_cache)
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f"""
cache = "{small_cache}"
out = "{tmp_path / 'run'}"
students = [{{ student = "test_resnet", methods = ["ce"] }}]
task_timeout = 1
[settings]
epochs = 200
workers = 0
""")
    code, out = cli("train", "--sweep", str(sweep), "--device", "cpu")
    # stdout and stderr together: the progress display's closing line on stdout, then the one error line.
    assert code == 2 and "Traceback" not in out and [line for line in out.splitlines() if "error" in line] == [
        "error: task train-test_resnet-ce ran past its timeout (Scope timed out after 1.0 second(s).); raise "
        "task_timeout (seconds: a sweep file's or a deployment's parameter), or leave it out for no bound"], out
    assert not (tmp_path / "run" / "summary.json").exists()
    assert tree_bytes(small_cache) == before
