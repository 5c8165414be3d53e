"""A run directory at an fsspec URL (README "Caches on object storage"): fsspec's in-memory filesystem, no
server; the lock's take-over of a dead holder; checkpoints checked against their listed sha256."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.object_store import boot_id, holder_note, location
from pipeline.train.config import RunSettings, TrainConfig, TrainError
from pipeline.train.loop import check_run, train_student
from pipeline.train.rundir import LOCK, RunDir
from pipeline.train.runs import find_runs


@pytest.fixture
def memory_run(memory_url: str) -> str:
    return f"{memory_url}/runs/x"


def config(cache: Path, out: str, **settings) -> TrainConfig:
    settings = {"epochs": 2, "batch_size": 32, "workers": 0, **settings}
    return TrainConfig(cache=str(cache), student="test_resnet", methods=("ce", "kd"), out=out,
                       settings=RunSettings(**settings))


def objects(url: str) -> dict[str, bytes]:
    root = location(url)
    return {key[len(root.key) + 1:]: root.fs.cat_file(key) for key in root.fs.find(root.key)}


def test_a_run_at_a_url_is_written_whole_and_resumes_like_a_local_one(make_cache, tmp_path: Path, memory_url: str,
                                                                      memory_run: str, interrupted) -> None:
    cache = make_cache(n=96)
    whole = train_student(config(cache, str(tmp_path / "whole")))
    with interrupted():
        train_student(config(cache, memory_run))
    stored = objects(memory_run)
    assert set(stored) == {"config.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.sha256.json"}, stored.keys()
    with pytest.raises(TrainError, match="already holds a run; pass --resume"):
        check_run(config(cache, memory_run))
    resumed = train_student(config(cache, memory_run, resume=True))

    assert resumed.val_accuracy == whole.val_accuracy and resumed.steps == whole.steps
    stored = objects(memory_run)
    assert set(stored) == {"config.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.sha256.json", "student.pt",
                           "summary.json"}  # the lock is gone
    strip = lambda text: [{k: v for k, v in json.loads(line).items() if k != "step_seconds"}  # noqa: E731
                          for line in text.splitlines()]
    assert strip(stored["metrics.jsonl"].decode()) == strip((tmp_path / "whole" / "metrics.jsonl").read_text())
    a = torch.load(tmp_path / "whole" / "student.pt", weights_only=True)
    b = torch.load(io.BytesIO(stored["student.pt"]), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert find_runs([f"{memory_url}/runs"]) == [location(memory_run)]


def test_a_damaged_checkpoint_is_refused_in_one_line(make_cache, memory_run: str) -> None:
    cache = make_cache(n=64)
    train_student(config(cache, memory_run, epochs=1))
    ckpt = location(memory_run) / "checkpoint.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a tensor: torch.load itself would not notice
    ckpt.write_bytes(bytes(data))
    with pytest.raises(TrainError, match=rf"^{ckpt} fails its sha256 \(not in .+checkpoint.sha256.json\): it is "
                                         r"damaged"):
        check_run(config(cache, memory_run, epochs=1, resume=True))
    ckpt.write_bytes(b"PK\x03\x04 not a checkpoint")
    (location(memory_run) / "checkpoint.sha256.json").unlink()  # as a run made before the list existed
    with pytest.raises(TrainError, match=rf"^{ckpt} is not a readable checkpoint \(RuntimeError: "):
        check_run(config(cache, memory_run, epochs=1, resume=True))


def test_the_lock_object_refuses_a_live_holder_and_is_taken_over_from_a_dead_one(make_cache, memory_run: str) -> None:
    cache, run = make_cache(n=64), RunDir(memory_run)
    lock = run.path / LOCK
    with run.locked():
        note = json.loads(lock.read_bytes())
        assert note["pid"] == holder_note()["pid"] and note["host"] == socket.gethostname()
        with pytest.raises(TrainError, match=rf"^{run.path} is in use by another run \(pid {note['pid']} on "
                                             rf"{note['host']} since .+\); wait for it to end or choose another "
                                             r"--out$"):
            train_student(config(cache, memory_run))
    assert not lock.exists()

    elsewhere = {**holder_note(), "host": "elsewhere"}  # another host's holder: no one here can tell it is dead
    lock.write_bytes(json.dumps(elsewhere).encode())
    with pytest.raises(TrainError, match=rf"pid {elsewhere['pid']} on elsewhere .+; if it no longer runs, delete "
                                         rf"{lock}$"):
        check_run(config(cache, memory_run, epochs=1))

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {**holder_note(), "pid": int(gone.stdout), "started": "1"}  # this host and boot, no longer running
    assert dead["boot"] == boot_id() != ""
    lock.write_bytes(json.dumps(dead).encode())
    assert train_student(config(cache, memory_run, epochs=1)).steps == 2
    assert not lock.exists()


# One rank of a run (`python -m pipeline.train.launch CONFIG`) that SIGKILLs itself right after writing its
# first checkpoint: no `finally` runs, so its lock object stays behind, as after a crash or an OOM kill.
KILLED_AFTER_FIRST_CHECKPOINT = """
import os, signal, sys
from pipeline.train import launch
from pipeline.train.rundir import RunDir
save = RunDir.save_checkpoint
def save_then_die(self, state):
    save(self, state)
    os.kill(os.getpid(), signal.SIGKILL)
RunDir.save_checkpoint = save_then_die
sys.exit(launch.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_run_on_s3_is_killed_resumed_listed_and_refuses_a_second_writer(prefect_harness, s3_endpoint, cli, make_cache,
                                                                          tmp_path: Path, monkeypatch) -> None:
    import s3fs

    bucket = s3_endpoint.bucket
    local_cache = make_cache(n=96)
    s3fs.S3FileSystem().put(str(local_cache), f"{bucket}/cache", recursive=True)
    shutil.rmtree(local_cache)
    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory would land here
    cache, runs, key = f"s3://{bucket}/cache", f"s3://{bucket}/runs/x", "runs/x/test_resnet-ce+kd-s0/"
    out = runs + "/test_resnet-ce+kd-s0"  # the student's run directory in --out
    train = ("train", "--cache", cache, "--student", "test_resnet", "--method", "ce", "--method", "kd", "--epochs",
             "2", "--batch-size", "32", "--workers", "0", "--device", "cpu", "--out", runs)

    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_FIRST_CHECKPOINT, json.dumps(config(
        cache, out, device="cpu").to_dict())], cwd=tmp_path, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = {k.removeprefix(key) for k in s3_endpoint.keys() if k.startswith("runs/x/")}
    assert run == {"config.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.sha256.json", "run.lock"}
    code, text = cli(*train)
    assert code == 2 and "already holds a run; pass --resume" in text, text
    code, text = cli(*train[:-1], "s3://no-such-bucket/runs/x")
    assert code == 2 and "error: --out s3://no-such-bucket/runs/x: cannot write there" in text, text

    code, text = cli(*train, "--resume")  # takes over the dead process's lock, continues from epoch 1
    assert code == 0, text
    run = {k.removeprefix(key) for k in s3_endpoint.keys() if k.startswith("runs/x/")}
    assert run == {"config.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.sha256.json", "student.pt",
                   "summary.json"}
    epochs = [json.loads(line)["epoch"] for line in (location(out) / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert epochs == [0, 1]  # the killed process's epoch 0, then the resumed epoch 1
    summary = json.loads((location(out) / "summary.json").read_text())
    assert summary["out"] == out and summary["steps"] == 6 and summary["epochs"] == 2
    assert not any(tmp_path.iterdir()), "nothing of the run may land on local disk"

    code, text = cli("runs", f"s3://{bucket}/runs")
    assert code == 0 and "1 runs, 1 settings" in text and "ce+kd" in text, text

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.train.rundir import RunDir\n"
                               "with RunDir(sys.argv[1]).locked():\n    print('held', flush=True); time.sleep(60)",
                               out], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        code, text = cli(*train, "--resume")
        assert code == 2, text
        assert re.fullmatch(rf"error: {re.escape(out)} is in use by another run \(pid {holder.pid} on "
                            rf"{socket.gethostname()} since .+\); wait for it to end or choose another --out\n",
                            text), text
        with pytest.raises(FileExistsError):  # the server refuses a second create (If-None-Match: *), no race
            (location(out) / "run.lock").create(b"{}")
    finally:
        holder.kill()
        holder.wait()


def test_resume_on_a_directory_with_no_run_is_one_line(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "mistyped")
    cfg = TrainConfig(cache="c", student="test_resnet", methods=("ce",), out=str(tmp_path / "mistyped"),
                      settings=RunSettings(resume=True))
    with pytest.raises(TrainError, match="holds no run to continue") as e:
        run.load_checkpoint(cfg, cfg.identity())
    assert "\n" not in str(e.value) and not (tmp_path / "mistyped").exists()
    (tmp_path / "mistyped").mkdir()
    (tmp_path / "mistyped" / "config.json").write_text("{}")  # killed before its first checkpoint: starts over
    assert run.load_checkpoint(cfg, cfg.identity()) is None
