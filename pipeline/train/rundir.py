"""A student run's directory (docs/ARCHITECTURE.md#command-line-contract): the files users and scripts read, and the checkpoint.

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
import io
import json
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.atomic import atomic_write_text
from pipeline.bounded import parse_json, read_json, read_text
from pipeline.cache.layout import ARRAYS_NAME
from pipeline.cache.manifest import MANIFEST_NAME, identity_mismatch
from pipeline.checksums import sha256_bytes
from pipeline.object_store import ObjectLock, ObjectPath, describe_holder, holder_note, location, write_whole_bytes
from pipeline.train.config import TrainConfig, TrainError

if TYPE_CHECKING:  # a run's files are listed and compared (`distillery runs`) without torch
    import torch

CONFIG, METRICS, SUMMARY, STUDENT, CHECKPOINT = "config.json", "metrics.jsonl", "summary.json", "student.pt", "checkpoint.pt"
CHECKPOINT_SHA256 = "checkpoint.sha256.json"
LOCK, HOLDER = "run.lock", "run.lock.json"
SMALL_FILE_LIMIT = 64 << 10  # the lock note and the checkpoint digests: well under 1 KiB as written
METRICS_LIMIT = 1 << 30  # a line of ~200 bytes per step: 1 GiB is ~5 M steps


class RunDir:
    def __init__(self, path: str | Path | ObjectPath) -> None:
        self.path = location(path)
        self._metrics: str | None = None  # at a URL: metrics.jsonl as last PUT (object stores do not append)
        self._checkpoint_sha256: str | None = None  # of checkpoint.pt as this run last read or wrote it

    @property
    def remote(self) -> bool:
        return isinstance(self.path, ObjectPath)

    def holds_run(self) -> bool:
        """Whether a run was started here (its config or a checkpoint exists): what `--resume` continues."""
        return (self.path / CONFIG).exists() or (self.path / CHECKPOINT).exists()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock while a run writes it: a second run on the same --out (resumed or
        not, from any process) is refused in one line naming the holder, never interleaved.

        Locally ``flock`` on RUNDIR/run.lock: the kernel drops it when the holder exits however it dies, so
        a killed run never leaves a stale lock behind. At a URL, the run.lock object (`ObjectLock`: a dead
        holder's on this host is taken over).
        """
        if self.remote:
            with self._object_lock().held():
                yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            self._acquire(fd)
            atomic_write_text(self.path / HOLDER, json.dumps(holder_note()))
            try:
                yield
            finally:
                (self.path / HOLDER).unlink(missing_ok=True)
        finally:
            os.close(fd)  # releases the lock

    def check_outside_caches(self, cache: str | Path | ObjectPath) -> None:
        """Refuse (TrainError) a run directory that is, or lies inside, the teacher cache `cache` or any other
        cache (a folder with `manifest.json` and `arrays.zarr`): a run's files are no part of a cache, and a
        cache is not the run's to write in (docs/cache-format.md#security)."""
        out, root = self.path.resolve(), location(cache).resolve()
        if type(out) is type(root) and out.is_relative_to(root):
            where = f"the --cache {root}"
        elif isinstance(out, Path) and (found := next((d for d in (out, *out.parents) if (d / MANIFEST_NAME).is_file()
                                                        and (d / ARRAYS_NAME).is_dir()), None)):
            where = f"the teacher cache {found}"
        else:
            return
        raise TrainError(f"--out {self.path} lies inside {where}; a run writes its files outside every cache: "
                         f"choose another --out")

    def check_unlocked(self) -> None:
        """Refuse (TrainError) if a run holds the directory's lock now; takes and writes nothing."""
        if self.remote:
            self._object_lock().check_free()
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
                holder = read_json(self.path / HOLDER, SMALL_FILE_LIMIT, TrainError, "")
            except TrainError:
                holder = None
            raise TrainError(self._in_use(describe_holder(holder))) from None

    def _in_use(self, holder: str) -> str:
        return f"{self.path} is in use by another run ({holder}); wait for it to end or choose another --out"

    def _object_lock(self) -> ObjectLock:
        return ObjectLock(self.path / LOCK, TrainError, self._in_use, "choose a writable --out")

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
            if self.holds_run():
                raise TrainError(f"{self.path} already holds a run; pass --resume to continue it or choose "
                                 f"another --out")
            return None
        if not ckpt_path.exists():
            if not (self.path / CONFIG).exists():  # a mistyped directory would otherwise train from scratch
                raise TrainError(f"--resume: {self.path} holds no run to continue (no {CONFIG} or {CHECKPOINT}); "
                                 f"check the --out path, or drop --resume to start a new run there")
            return None  # killed before its first checkpoint: the run starts over
        data = ckpt_path.read_bytes()
        digest = sha256_bytes(data)
        listed = self.path / CHECKPOINT_SHA256
        if listed.exists():
            try:
                allowed = read_json(listed, SMALL_FILE_LIMIT, TrainError, "")["sha256"]
            except (TrainError, KeyError, TypeError):
                allowed = []
            if digest not in allowed:
                raise TrainError(f"{ckpt_path} fails its sha256 (not in {listed}): it is damaged; start the run "
                                 f"again in another --out")
        import torch

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
        hint = "restore the file or start the run again in another --out"
        lines = read_text(metrics, METRICS_LIMIT, TrainError, hint).splitlines() if metrics.exists() else []
        parsed = []
        for number, line in enumerate(lines, 1):
            try:
                record = parse_json(line, f"{metrics} line {number}", TrainError, hint)
            except TrainError:
                record = None
            if not (isinstance(record, dict) and isinstance(record.get("epoch"), int)):
                if number == len(lines):
                    break
                raise TrainError(f"{metrics} line {number} is not a metrics record; {hint}")
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
        import torch

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
        import torch

        buffer = io.BytesIO()
        torch.save(student_state, buffer)
        write_whole_bytes(self.path / STUDENT, buffer.getvalue())
        write_whole_bytes(self.path / SUMMARY, json.dumps(summary, indent=2).encode())
