"""A student run's directory (DESIGN.md §10): the files users and scripts read, and the checkpoint.

```
RUNDIR/config.json      the TrainConfig
RUNDIR/metrics.jsonl    one line per step and one per epoch: epoch, step, loss, per-term losses, ...
RUNDIR/summary.json     the run's result (see `loop.train_student`)
RUNDIR/student.pt       final student weights, a plain timm state dict
RUNDIR/checkpoint.pt    written every epoch, for --resume (student, method modules, optimiser, schedule)
```

Every file is written under a temp name and renamed, so a killed run leaves whole files only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import atomic_write, atomic_write_text
from pipeline.cache.manifest import identity_mismatch
from pipeline.train.config import TrainConfig, TrainError

CONFIG, METRICS, SUMMARY, STUDENT, CHECKPOINT = "config.json", "metrics.jsonl", "summary.json", "student.pt", "checkpoint.pt"


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

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
        metrics = self.path / METRICS
        kept = [line for line in metrics.read_text().splitlines()
                if json.loads(line)["epoch"] < resumed_epoch] if metrics.exists() else []
        atomic_write_text(metrics, "".join(line + "\n" for line in kept))

    def log(self, records: list[dict[str, Any]]) -> None:
        with open(self.path / METRICS, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write(self.path / CHECKPOINT, lambda f: torch.save(state, f))

    def finish(self, student_state: dict[str, torch.Tensor], summary: dict[str, Any]) -> None:
        atomic_write(self.path / STUDENT, lambda f: torch.save(student_state, f))
        atomic_write_text(self.path / SUMMARY, json.dumps(summary, indent=2))
