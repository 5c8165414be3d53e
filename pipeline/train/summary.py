"""What a finished student run reports: `TrainSummary`, the library's result and RUNDIR/summary.json
(docs/ARCHITECTURE.md#command-line-contract).

The file keeps its keys and their order (other tools and `distillery runs` read it as JSON); a summary
read from an older run lacks keys added since, which read as None and are not written back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.bounded import read_json
from pipeline.errors import DistilleryError
from pipeline.object_store import ObjectPath, location


class SummaryError(DistilleryError):
    """A summary.json that is not a student run's summary; the message names the file."""


SUMMARY_LIMIT = 1 << 20  # the project writes a few KiB


class TrainSummary(BaseModel):
    """One run's result; `train_student` returns it and writes it as summary.json. The fields are described
    in `pipeline.train.loop.train_student`."""

    model_config = ConfigDict(extra="allow", frozen=True)  # keys written by a newer version are kept

    student: str
    methods: list[str]
    seed: int
    epochs: int | None = None
    val_accuracy: float | None
    train_seconds: float
    mean_step_seconds: float
    peak_rss_bytes: int
    cache: str | None = None
    online_teacher: bool | None = None
    params: int
    teacher: str | None = None
    dataset: str | None = None
    num_samples: int | None = None
    input_size: int | None = None
    batch_size: int | None = None
    steps: int | None = None
    final_loss: float | None = None
    device: str | None = None
    out: str | None = None
    val_skipped_images: list[str] | None = None
    environment: dict[str, Any] | None = None
    world_size: int | None = None
    finished_at: str | None = None  # ISO 8601 UTC, to the second: what `distillery runs --by date` groups by
    first_step_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """summary.json's object: every key this run set, in the order above."""
        return self.model_dump(exclude_unset=True)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def read(cls, path: str | Path | ObjectPath) -> TrainSummary:
        """RUNDIR/summary.json (`path`: local or a URL), refused in one line when it is not a run's summary."""
        hint = "it was not written by `distillery train`"
        value = read_json(location(path), SUMMARY_LIMIT, SummaryError, hint)
        try:
            return cls.model_validate(value)
        except ValidationError as e:
            first = e.errors()[0]
            raise SummaryError(f"{path} is not a student run's summary ({'.'.join(map(str, first['loc']))}: "
                               f"{first['msg'].lower()}); it was not written by `distillery train`") from None
