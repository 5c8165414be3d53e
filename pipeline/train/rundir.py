"""A student run's directory (docs/ARCHITECTURE.md §10): the files users and scripts read, and the checkpoint.

```
RUNDIR/config.json      the TrainConfig
RUNDIR/metrics.jsonl    one line per step and one per epoch: epoch, step, loss, per-term losses, ...
RUNDIR/summary.json     the run's result (see `loop.train_student`), written last: the run is complete
RUNDIR/student.pt       final student weights, a plain timm state dict
RUNDIR/checkpoint.pt    written every epoch, for --resume (student, method modules, optimiser, schedule)
RUNDIR/checkpoint.sha256.json  the sha256 checkpoint.pt may have: the one being written and the one before
RUNDIR/run.lock         held while a run trains here; run.lock.json names the process holding it
```

RUNDIR is a local directory or an fsspec URL (`s3://bucket/runs/x`, `memory://...`: README "Caches on
object storage"). Every file is written whole: locally under a temp name and renamed, on object storage by
one PUT, which the store makes visible all at once; so a killed run leaves whole files only. The one file
appended to, a local metrics.jsonl, may end in a torn line, which a resumed run drops (it redoes that
epoch); at a URL it is PUT whole each epoch.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import pickle
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import atomic_write_text
from pipeline.cache.manifest import identity_mismatch
from pipeline.checksums import sha256_bytes
from pipeline.object_store import ObjectPath, location, write_whole_bytes
from pipeline.train.config import TrainConfig, TrainError

CONFIG, METRICS, SUMMARY, STUDENT, CHECKPOINT = "config.json", "metrics.jsonl", "summary.json", "student.pt", "checkpoint.pt"
CHECKPOINT_SHA256 = "checkpoint.sha256.json"
LOCK, HOLDER = "run.lock", "run.lock.json"


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22), None if it is not running:
    with the boot id, what tells a live holder from a dead one whose pid was reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _holder() -> dict[str, Any]:
    """This process, as a lock names its holder."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "boot": _boot_id(), "started": _process_start(os.getpid())}


def _describe(holder: Any) -> str:
    try:
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}: {holder['command']}"
    except (KeyError, TypeError):
        return "another process"


def _dead_here(holder: Any) -> bool:
    """Whether `holder` is a process of this host, this boot, that no longer runs: its lock is stale."""
    try:
        return (holder["host"] == socket.gethostname() and bool(holder["boot"]) and holder["boot"] == _boot_id()
                and holder["started"] is not None and _process_start(int(holder["pid"])) != holder["started"])
    except (KeyError, TypeError, ValueError):
        return False


class RunDir:
    def __init__(self, path: str | Path | ObjectPath) -> None:
        self.path = location(path)
        self._metrics: str | None = None  # at a URL: metrics.jsonl as last PUT (object stores do not append)
        self._checkpoint_sha256: str | None = None  # of checkpoint.pt as this run last read or wrote it

    @property
    def remote(self) -> bool:
        return isinstance(self.path, ObjectPath)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock while a run writes it: a second run on the same --out (resumed or
        not, from any process) is refused in one line naming the holder, never interleaved.

        Locally ``flock`` on RUNDIR/run.lock: the kernel drops it when the holder exits however it dies, so
        a killed run never leaves a stale lock behind. At a URL, the run.lock object created exclusively
        (`ObjectPath.create`) and removed at the end (`_lock_object`).
        """
        if self.remote:
            with self._lock_object():
                yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            self._acquire(fd)
            atomic_write_text(self.path / HOLDER, json.dumps(_holder()))
            try:
                yield
            finally:
                (self.path / HOLDER).unlink(missing_ok=True)
        finally:
            os.close(fd)  # releases the lock

    def check_unlocked(self) -> None:
        """Refuse (TrainError) if a run holds the directory's lock now; takes and writes nothing."""
        if self.remote:
            holder = self._lock_holder()
            if holder is not None and not _dead_here(holder[1]):
                raise self._in_use(holder[1])
            return
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
            try:  # the holder may be between lock and note
                holder = json.loads((self.path / HOLDER).read_text())
            except (OSError, ValueError):
                holder = None
            raise self._in_use(holder) from None

    def _in_use(self, holder: Any) -> TrainError:
        # A live holder on this host is certain; any other, a person must judge.
        here = isinstance(holder, dict) and holder.get("host") == socket.gethostname()
        remedy = f"; if it no longer runs, delete {self.path / LOCK}" if self.remote and not here else ""
        return TrainError(f"{self.path} is in use by another run ({_describe(holder)}); wait for it to end or "
                          f"choose another --out{remedy}")

    def _lock_holder(self) -> tuple[bytes, Any] | None:
        """The run.lock object's bytes and the holder they name (None if unreadable), or None without one."""
        try:
            data = (self.path / LOCK).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return data, json.loads(data)
        except ValueError:
            return data, None

    @contextmanager
    def _lock_object(self) -> Iterator[None]:
        """The run.lock object, created exclusively, naming this process; removed when the run ends.

        An object store drops no lock when its holder dies. A lock left by a dead process of this host and
        boot (its pid gone or started at another time) is taken over; one from another host is refused,
        naming it, for a person to judge. Takers on one host are serialised by an flock in the temp
        directory, so two never both delete a stale lock and create their own; other hosts never take over.
        """
        lock, note = self.path / LOCK, json.dumps(_holder()).encode()
        try:
            try:
                lock.create(note)
            except FileExistsError:
                self._take_over(lock, note)
        except OSError as e:
            raise TrainError(f"cannot write the run's lock {lock} ({type(e).__name__}: {e}); choose a writable "
                             f"--out") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)

    def _take_over(self, lock: ObjectPath, note: bytes) -> None:
        key = hashlib.sha256(str(lock).encode()).hexdigest()[:24]
        local = Path(tempfile.gettempdir()) / f"distillery-run-lock-{key}"
        fd = os.open(local, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            holder = self._lock_holder()
            if holder is not None:
                if not _dead_here(holder[1]):
                    raise self._in_use(holder[1])
                lock.unlink(missing_ok=True)
            try:
                lock.create(note)
            except FileExistsError:  # another host created it after the stale one went: it is live
                raise self._in_use((self._lock_holder() or (b"", None))[1]) from None
        finally:
            os.close(fd)

    def load_checkpoint(self, config: TrainConfig, identity: dict[str, Any]) -> dict[str, Any] | None:
        """The checkpoint to continue from: None for a fresh run; refuses to mix runs.

        Without --resume an existing run is never overwritten; with it, the checkpoint's `identity`
        (the config but for run directory, device and the flag itself, plus the cache's fingerprint)
        must equal this run's. The checkpoint is untrusted: read as tensors and plain data only
        (`weights_only`), and its sha256 must be one checkpoint.sha256.json lists (a run made before
        that file existed has none to check).
        """
        ckpt_path = self.path / CHECKPOINT
        if not config.settings.resume:
            if (self.path / CONFIG).exists() or ckpt_path.exists():
                raise TrainError(f"{self.path} already holds a run; pass --resume to continue it or choose "
                                 f"another --out")
            return None
        if not ckpt_path.exists():
            return None
        data = ckpt_path.read_bytes()
        digest = sha256_bytes(data)
        listed = self.path / CHECKPOINT_SHA256
        if listed.exists():
            try:
                allowed = json.loads(listed.read_text())["sha256"]
            except (ValueError, KeyError, TypeError):
                allowed = []
            if digest not in allowed:
                raise TrainError(f"{ckpt_path} fails its sha256 (not in {listed}): it is damaged; start the run "
                                 f"again in another --out")
        try:
            ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            diff = identity_mismatch(ckpt["identity"], identity, stored_as="checkpoint")
        except (RuntimeError, pickle.UnpicklingError, ValueError, EOFError, KeyError, TypeError) as e:
            raise TrainError(f"{ckpt_path} is not a readable checkpoint ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); start the run again in another "
                             f"--out") from None
        if diff:
            raise TrainError(f"cannot --resume {self.path}: its checkpoint was made with a different {diff}; "
                             f"use the same options or another --out")
        self._checkpoint_sha256 = digest
        return ckpt

    def start(self, config: TrainConfig, resumed_epoch: int) -> None:
        """Write config.json; keep only the metrics of the epochs the checkpoint already holds."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_whole_bytes(self.path / CONFIG, json.dumps(config.to_dict(), indent=2).encode())
        kept = [line for line, record in self._metric_lines() if record["epoch"] < resumed_epoch]
        self._write_metrics("".join(line + "\n" for line in kept))

    def _write_metrics(self, text: str) -> None:
        write_whole_bytes(self.path / METRICS, text.encode())
        if self.remote:
            self._metrics = text

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
        lines = "".join(json.dumps(r) + "\n" for r in records)
        if self.remote:
            self._write_metrics((self._metrics or "") + lines)
            return
        with open(self.path / METRICS, "a") as f:
            f.write(lines)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """checkpoint.pt, its sha256 listed first: checkpoint.sha256.json names the new digest and the one
        before, so whichever checkpoint a kill between the two writes leaves, its digest is listed."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        digest = sha256_bytes(data)
        listed = [digest] + ([self._checkpoint_sha256] if self._checkpoint_sha256 else [])
        write_whole_bytes(self.path / CHECKPOINT_SHA256, json.dumps({"sha256": listed}).encode())
        write_whole_bytes(self.path / CHECKPOINT, data)
        self._checkpoint_sha256 = digest

    def finish(self, student_state: dict[str, torch.Tensor], summary: dict[str, Any]) -> None:
        """student.pt, then summary.json: the summary, written last, is what marks the run complete."""
        buffer = io.BytesIO()
        torch.save(student_state, buffer)
        write_whole_bytes(self.path / STUDENT, buffer.getvalue())
        write_whole_bytes(self.path / SUMMARY, json.dumps(summary, indent=2).encode())
