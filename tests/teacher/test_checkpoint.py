"""The teacher checkpoint: the on-disk keys every `fit-teacher` has written, a typed round trip, one-line refusals."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.teacher.checkpoint import CHECKPOINT_FORMAT, CheckpointError, TeacherCheckpoint

KEYS = {"format", "model", "state_dict", "num_classes", "in_chans", "input_size", "mean", "std", "dataset",
        "val_accuracy", "train_fingerprint", "config"}


def refused(path: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        TeacherCheckpoint.load(path)
    line = str(e.value)
    assert "\n" not in line and line.startswith((f"checkpoint {path} ", f"{path} "))
    return line


def test_fit_teacher_writes_the_format_keys_as_plain_values(digits_teacher: Path) -> None:
    raw = torch.load(digits_teacher, weights_only=True)  # tensors and plain values only: no pickled classes
    assert set(raw) == KEYS and raw["format"] == CHECKPOINT_FORMAT
    assert raw["model"] == "test_resnet" and raw["input_size"] == 32 and isinstance(raw["mean"], list)
    ckpt = TeacherCheckpoint.load(digits_teacher)
    assert ckpt.model == "test_resnet" and ckpt.input_size == 32 and ckpt.in_chans == 1 and len(ckpt.mean) == 1
    assert 0.0 <= ckpt.val_accuracy <= 1.0 and ckpt.dataset == "digits" and ckpt.config["epochs"] == 2
    assert isinstance(ckpt.train_fingerprint, str)


def test_save_then_load_gives_the_same_checkpoint(digits_teacher: Path, tmp_path: Path) -> None:
    ckpt = TeacherCheckpoint.load(digits_teacher)
    ckpt.save(tmp_path / "sub" / "again.pt")
    again = TeacherCheckpoint.load(tmp_path / "sub" / "again.pt")
    assert replace(again, state_dict={}) == replace(ckpt, state_dict={})
    assert again.state_dict.keys() == ckpt.state_dict.keys()
    assert all(torch.equal(again.state_dict[k], v) for k, v in ckpt.state_dict.items())


def test_a_checkpoint_fitted_before_the_fingerprint_was_recorded_loads(digits_teacher: Path, tmp_path: Path) -> None:
    raw = torch.load(digits_teacher, weights_only=True)
    del raw["train_fingerprint"]
    torch.save(raw, tmp_path / "old.pt")
    assert TeacherCheckpoint.load(tmp_path / "old.pt").train_fingerprint is None


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw.pop("format"), f"is not in the {CHECKPOINT_FORMAT} format"),
    (lambda raw: raw.pop("state_dict"), "lacks state_dict"),
    (lambda raw: raw.update({"extra\nkey": 1}), r"has keys the .* format does not have \('extra\\nkey'\)"),
    (lambda raw: raw.update(num_classes="10"), "has a str as num_classes"),
    (lambda raw: raw.update(num_classes=True), "has a bool as num_classes"),
    (lambda raw: raw.update(input_size=0), "has input_size 0, not a positive count"),
    (lambda raw: raw.update(mean=[0.5, 0.5]), "has a mean that is not 1 numbers"),
    (lambda raw: raw.update(state_dict={"w": [1.0]}), "has a state_dict that is not names to tensors"),
])
def test_a_checkpoint_that_is_not_the_format_is_refused_in_one_line(digits_teacher: Path, tmp_path: Path, edit,
                                                                    message: str) -> None:
    raw = torch.load(digits_teacher, weights_only=True)
    edit(raw)
    torch.save(raw, tmp_path / "edited.pt")
    line = refused(tmp_path / "edited.pt")
    assert re.search(message, line), line
    assert line.endswith("; expected a `distillery fit-teacher` checkpoint")


def test_unreadable_files_are_refused_in_one_line(tmp_path: Path) -> None:
    assert "does not exist; train one with `distillery fit-teacher" in refused(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "is not a readable torch checkpoint" in refused(tmp_path / "junk.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    assert "holds a list, not a dict" in refused(tmp_path / "list.pt")
    (tmp_path / "dir.pt").mkdir()
    assert refused(tmp_path / "dir.pt").startswith(f"{tmp_path / 'dir.pt'} is not a regular file")


def test_code_in_a_checkpoint_does_not_run(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"format": CHECKPOINT_FORMAT, "model": Payload()}, tmp_path / "evil.pt")
    assert "is not a readable torch checkpoint (UnpicklingError" in refused(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()


def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "teacher.pt"
    os.mkfifo(fifo)
    code = (f"from pipeline.teacher.checkpoint import TeacherCheckpoint, CheckpointError\n"
            f"try: TeacherCheckpoint.load({str(fifo)!r})\nexcept CheckpointError as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == f"{fifo} is not a regular file; expected a `distillery fit-teacher` checkpoint"


def test_a_file_over_the_cap_is_refused_from_its_size(tmp_path: Path) -> None:
    sparse = tmp_path / "huge.pt"
    with open(sparse, "wb") as f:
        f.truncate(17 * 2 ** 30)  # holes: reading it would take all the memory
    assert "18,253,611,008 bytes, more than the 16384 MiB" in refused(sparse)
