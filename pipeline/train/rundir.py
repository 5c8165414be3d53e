"""A student run's directory (docs/ARCHITECTURE.md §10): the files users and scripts read, and the checkpoint.

```
RUNDIR/config.json      the TrainConfig
RUNDIR/metrics.jsonl    one line per step and one per epoch: epoch, step, loss, per-term losses, ...
RUNDIR/summary.json     the run's result (see `loop.train_student`)
RUNDIR/student.pt       final student weights, a plain timm state dict
RUNDIR/checkpoint.pt    written every epoch, for --resume (student, method modules, optimiser, schedule)
RUNDIR/run.lock         flock-ed while a run trains here; run.lock.json names the process holding it
```

Every file is written under a temp name and renamed, so a killed run leaves whole files only; the one
file appended to, metrics.jsonl, may end in a torn line, which a resumed run drops (it redoes that epoch).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import atomic_write, atomic_write_text
from pipeline.cache.manifest import identity_mismatch
from pipeline.train.config import TrainConfig, TrainError

CONFIG, METRICS, SUMMARY, STUDENT, CHECKPOINT = "config.json", "metrics.jsonl", "summary.json", "student.pt", "checkpoint.pt"
LOCK, HOLDER = "run.lock", "run.lock.json"


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock while a run writes it: a second run on the same --out (resumed or
        not, from any process on this machine) is refused in one line naming the holder, never interleaved.

        ``flock`` on RUNDIR/run.lock: the kernel drops it when the holder exits however it dies, so a killed
        run never leaves a stale lock behind.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            self._acquire(fd)
            atomic_write_text(self.path / HOLDER, json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                 "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
            try:
                yield
            finally:
                (self.path / HOLDER).unlink(missing_ok=True)
        finally:
            os.close(fd)  # releases the lock

    def check_unlocked(self) -> None:
        """Refuse (TrainError) if a run holds the directory's lock now; takes and writes nothing."""
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            self._acquire(fd)
        finally:
            os.close(fd)

    def _acquire(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads((self.path / HOLDER).read_text())
                who = f"pid {holder['pid']} on {holder['host']} since {holder['since']}: {holder['command']}"
            except (OSError, ValueError, KeyError, TypeError):  # the holder is between lock and note
                who = "another process"
            raise TrainError(f"{self.path} is in use by another run ({who}); wait for it to end or choose "
                             f"another --out") from None

    def load_checkpoint(self, config: TrainConfig, identity: dict[str, Any]) -> dict[str, Any] | None:
        """The checkpoint to continue from: None for a fresh run; refuses to mix runs.

        Without --resume an existing run is never overwritten; with it, the checkpoint's `identity`
        (the config but for run directory, device and the flag itself, plus the cache's fingerprint)
        must equal this run's.
        """
        ckpt_path = self.path / CHECKPOINT
        if not config.settings.resume:
            if (self.path / CONFIG).exists() or ckpt_path.exists():
                raise TrainError(f"{self.path} already holds a run; pass --resume to continue it or choose "
                                 f"another --out")
            return None
        if not ckpt_path.exists():
            return None
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        diff = identity_mismatch(ckpt["identity"], identity, stored_as="checkpoint")
        if diff:
            raise TrainError(f"cannot --resume {self.path}: its checkpoint was made with a different {diff}; "
                             f"use the same options or another --out")
        return ckpt

    def start(self, config: TrainConfig, resumed_epoch: int) -> None:
        """Write config.json; keep only the metrics of the epochs the checkpoint already holds."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / CONFIG, json.dumps(config.to_dict(), indent=2))
        kept = [line for line, record in self._metric_lines() if record["epoch"] < resumed_epoch]
        atomic_write_text(self.path / METRICS, "".join(line + "\n" for line in kept))

    def _metric_lines(self) -> list[tuple[str, dict[str, Any]]]:
        """metrics.jsonl's lines with their records. A torn last line (a run killed while appending an
        epoch's records, whose checkpoint therefore predates them) is dropped; anything else unreadable
        is refused, naming the line."""
        metrics = self.path / METRICS
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        parsed = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not (isinstance(record, dict) and isinstance(record.get("epoch"), int)):
                if number == len(lines):
                    break
                raise TrainError(f"{metrics} line {number} is not a metrics record; restore the file or start "
                                 f"the run again in another --out")
            parsed.append((line, record))
        return parsed

    def log(self, records: list[dict[str, Any]]) -> None:
        with open(self.path / METRICS, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write(self.path / CHECKPOINT, lambda f: torch.save(state, f))

    def finish(self, student_state: dict[str, torch.Tensor], summary: dict[str, Any]) -> None:
        atomic_write(self.path / STUDENT, lambda f: torch.save(student_state, f))
        atomic_write_text(self.path / SUMMARY, json.dumps(summary, indent=2))
