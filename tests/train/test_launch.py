"""Distributed students launched by torchrun (docs/operations.md#distributed-students): real torchrun,
2 processes on gloo over 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.layout import block_sizes
from pipeline.cache.reader import TeacherCache
from pipeline.data.views import epoch_views
from pipeline.train.config import TrainConfig, TrainError
from pipeline.train.ddp import ID_LOG_ENV
from pipeline.train.launch import launch
from pipeline.train.loop import check_run
from pipeline.train.stream import rank_parts, split_parts, stream_batches

BATCH = 32
TRAIN = ["train", "--student", "test_resnet", "--method", "ce", "--method", "tcs", "--epochs", "2", "--batch-size",
         str(BATCH), "--device", "cpu", "--workers", "0"]  # DataLoader workers per rank: test_stream.py


@pytest.fixture(scope="module")
def uneven_cache(cache_request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """250 digits in shards of 100 and blocks of 60: 2 ranks get 100 and 150 samples, so at batch 32 one
    rank has 4 batches and the other 5 (the padding step runs)."""
    from pipeline.teacher.cache_pass import run_cache_pass

    out = tmp_path_factory.mktemp("cache") / "digits-uneven"
    run_cache_pass(cache_request(out, subset=250, views=2, shard_size=100, block_size=60))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], ids: Path, log: Path) -> subprocess.Popen:
    """`torchrun --nproc-per-node 2 -m flows.cli ARGS` on 127.0.0.1."""
    env = {**os.environ, ID_LOG_ENV: str(ids)}
    with open(log, "w") as output:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                                 "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "flows.cli", *args],
                                env=env, stdout=output, stderr=subprocess.STDOUT)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, and wait until all are dead: torchrun starts each rank in a
    session of its own, so the launcher's process group does not hold them (Linux: /proc/PID/task/TID/children).
    A rank dies some time after its SIGKILL; until then it holds the run directory's lock."""
    def tree(p: int) -> list[int]:  # a child is listed under the thread that started it
        found = []
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                found += [int(c) for c in children.read_text().split()]
            except FileNotFoundError:  # the thread ended meanwhile
                pass
        return [p, *(d for c in found for d in tree(c))]

    def alive(p: int) -> bool:
        # A killed process's threads exit one by one, the leader's often first: its files, and with them the
        # run's lock, are released when the last thread has exited, leaving at most a zombie leader.
        states = []
        for stat in Path(f"/proc/{p}/task").glob("*/stat"):
            try:
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # that thread is gone
                pass
        return any(state not in "ZX" for state in states)

    pids = tree(pid)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:  # ended meanwhile
            pass
    deadline = time.monotonic() + 30
    while any(map(alive, pids)):
        assert time.monotonic() < deadline, f"processes {[p for p in pids if alive(p)]} outlived SIGKILL by 30 s"
        time.sleep(0.05)


class StepGate:
    """Holds torchrun's ranks mid-epoch, however loaded the machine: each rank's id log is a FIFO, whose
    per-step open() blocks until this side reads it. A rank's reader stops after its first record of `epoch`,
    so the rank waits at its next step of that epoch (the other one at the step's all-reduce) until killed."""

    def __init__(self, ids: Path, epoch: int) -> None:
        ids.mkdir()
        self.records: dict[int, list[dict]] = {0: [], 1: []}
        self.readers = []
        for rank in (0, 1):
            os.mkfifo(ids / f"rank-{rank}.jsonl")
            reader = threading.Thread(target=self._read, args=(ids / f"rank-{rank}.jsonl", rank, epoch), daemon=True)
            reader.start()
            self.readers.append(reader)

    def _read(self, fifo: Path, rank: int, epoch: int) -> None:
        while True:
            with open(fifo) as f:  # one writer's open, one step's record, its close
                records = [json.loads(line) for line in f]
            self.records[rank].extend(records)
            if any(r["epoch"] >= epoch for r in records):
                return

    @property
    def holding(self) -> bool:
        return not any(reader.is_alive() for reader in self.readers)


def _log_records(ids: Path) -> dict[int, list[dict]]:
    return {rank: [json.loads(line) for line in (ids / f"rank-{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)}


def _seen(records: dict[int, list[dict]]) -> dict[int, list[tuple[int, int, int]]]:
    """epoch -> (rank, id, view) of every logged sample."""
    seen: dict[int, list[tuple[int, int, int]]] = {}
    for rank, logged in records.items():
        for record in logged:
            seen.setdefault(record["epoch"], []).extend((rank, i, v) for i, v in zip(record["ids"], record["views"]))
    return seen


def _assert_exactly_once(seen: list[tuple[int, int, int]], cache: TeacherCache, epoch: int) -> None:
    ranks, ids, views = map(np.array, zip(*seen, strict=True))
    assert sorted(ids.tolist()) == sorted(cache.read("samples/ids").tolist())  # every id once, across ranks
    assert set(ranks.tolist()) == {0, 1}
    np.testing.assert_array_equal(views, epoch_views(0, epoch, ids, cache.num_views))


def test_two_processes_see_every_id_once_per_epoch_and_resume_after_a_kill(uneven_cache: Path, tmp_path: Path) -> None:
    cache = TeacherCache(uneven_cache)
    counts = [stream_batches(split_parts(rank_parts(block_sizes(cache.manifest.shards, 60), r, 2), 1), BATCH)
              for r in (0, 1)]
    assert counts[0] != counts[1]  # the ranks' uneven ends are part of what is tested
    out, first, second = tmp_path / "runs" / "test_resnet-ce+tcs-s0", tmp_path / "ids-1", tmp_path / "ids-2"
    args = [*TRAIN, "--cache", str(uneven_cache), "--out", str(tmp_path / "runs")]  # the student's run: `out`

    log = tmp_path / "torchrun.log"
    gate = StepGate(first, epoch=1)
    run = _torchrun(args, first, log)
    deadline = time.monotonic() + 120
    # Kill both ranks and torchrun while epoch 1 is held at its second step (epoch 0 is checkpointed by then).
    while not gate.holding:
        assert run.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "epoch 1 did not start within 120 s"
        time.sleep(0.2)
    assert (out / "checkpoint.pt").exists()
    _kill_tree(run.pid)
    run.wait()
    assert not (out / "summary.json").exists()
    killed = _seen(gate.records)
    _assert_exactly_once(killed[0], cache, epoch=0)
    assert 0 < len(killed[1]) < cache.num_samples  # killed mid-epoch

    # `--nproc 2`: the CLI checks the run, then launches torchrun itself; the resumed run redoes epoch 1 only.
    resumed = subprocess.run([sys.executable, "-m", "flows.cli", *args, "--resume", "--nproc", "2"],
                             env={**os.environ, ID_LOG_ENV: str(second)}, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    seen = _seen(_log_records(second))
    assert list(seen) == [1]
    _assert_exactly_once(seen[1], cache, epoch=1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2 and summary["steps"] == 2 * max(counts)
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1]

    # A resume with another number of processes is refused before anything starts (the global batch differs).
    config = TrainConfig(**{**json.loads((out / "config.json").read_text()), "settings": {
        **json.loads((out / "config.json").read_text())["settings"], "resume": True}})
    with pytest.raises(TrainError, match=r"different world_size \(checkpoint: 2, requested: null\)"):
        check_run(config, world_size=1)


@pytest.mark.parametrize("quiet", [True, False])
def test_a_run_whose_ranks_fail_is_one_train_error(quiet: bool, tmp_path: Path) -> None:
    config = TrainConfig(cache=str(tmp_path / "missing"), student="test_resnet", methods=("ce",),
                         out=str(tmp_path / "run"))
    said = r"its ranks said: error \(rank 0\): .*missing" if quiet else "its ranks' output above says why"
    with pytest.raises(TrainError, match=rf"1-process run of test_resnet into .* failed \(exit 1\); {said}"):
        launch(config, 1, quiet=quiet)
