"""`TrainSummary`: summary.json read and written with its keys as they are (other tools read the file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import DistilleryError
from pipeline.train.summary import SummaryError, TrainSummary

# A summary written before `environment`, `world_size` and `val_skipped_images` existed, plus a key this
# version does not know (a newer writer's).
OLD = {"student": "resnet18", "methods": ["ce", "kd:T=2"], "seed": 3, "epochs": 2, "val_accuracy": 0.5,
       "train_seconds": 12.5, "mean_step_seconds": 0.25, "peak_rss_bytes": 1024, "cache": "/c", "params": 11,
       "final_loss": 0.75, "someday": {"x": 1}}


def test_an_older_summary_reads_by_attribute_and_writes_back_the_keys_it_had(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(OLD, indent=2))
    summary = TrainSummary.read(path)
    assert summary.val_accuracy == 0.5 and summary.methods == ["ce", "kd:T=2"] and summary.world_size is None
    assert summary.to_json() == path.read_text()


@pytest.mark.parametrize("edit, culprit", [
    (lambda d: d.pop("val_accuracy"), "val_accuracy: field required"),
    (lambda d: d.update(seed="three"), "seed: input should be a valid integer"),
])
def test_a_summary_that_is_not_a_runs_is_one_line_naming_the_file(tmp_path: Path, edit, culprit: str) -> None:
    data = dict(OLD)
    edit(data)
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SummaryError, match=culprit) as e:
        TrainSummary.read(path)
    assert isinstance(e.value, DistilleryError) and str(path) in str(e.value) and "\n" not in str(e.value)
