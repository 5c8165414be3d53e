"""Run directories (issue 29, class 9, its run-directory part): a run never writes into a teacher cache, and
`distillery runs` reads every file of a run directory as untrusted (bounded, regular files only, one line
naming the file, never blaming an option nobody gave)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from forgery import tree_bytes
from pipeline.train.config import TrainError
from pipeline.train.rundir import RunDir
from pipeline.train.runs import find_runs, load_run
from test_cache_faults import cli_error, run_cli


@pytest.mark.parametrize("inside", ["", "arrays.zarr", "shards/run", "arrays.zarr/samples/new"])
def test_a_run_directory_inside_the_cache_is_refused(small_cache: Path, inside: str) -> None:
    out = small_cache / inside if inside else small_cache
    with pytest.raises(TrainError, match="lies inside the --cache .*choose another --out"):
        RunDir(out).check_outside_caches(small_cache)


def test_a_run_directory_inside_another_cache_is_refused(small_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match=f"lies inside the teacher cache {small_cache}"):
        RunDir(small_cache / "arrays.zarr" / "run").check_outside_caches(tmp_path / "other")
    RunDir(tmp_path / "run").check_outside_caches(small_cache)  # beside it: fine


def test_train_out_in_the_cache_writes_nothing_there(forged: Path) -> None:
    before = tree_bytes(forged)
    line = cli_error(run_cli("train", "--cache", str(forged), "--student", "test_resnet", "--method", "kd",
                             "--epochs", "1", "--device", "cpu", "--out", str(forged / "arrays.zarr")))
    assert "lies inside the --cache" in line
    assert tree_bytes(forged) == before


def summary_dir(root: Path) -> Path:
    run = root / "run"
    run.mkdir(parents=True)
    return run


def test_runs_never_blocks_on_a_fifo_summary(tmp_path: Path) -> None:
    os.mkfifo(summary_dir(tmp_path) / "summary.json")
    with pytest.raises(TrainError, match="summary.json is not a regular file"):
        [load_run(p) for p in find_runs([str(tmp_path)])]


@pytest.mark.parametrize("content, expected", [
    ("[" * 50_000 + "]" * 50_000, "nests deeper than 32 levels"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
    ('{"student": "x"}', "lacks ["),
    ('{"student": 1, "methods": "kd"}', "lacks ["),
])
def test_runs_names_a_malformed_summary_in_one_line(tmp_path: Path, content, expected) -> None:
    path = summary_dir(tmp_path) / "summary.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TrainError) as caught:
        load_run(path.parent)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_a_bad_config_json_is_blamed_on_the_file_not_on_cache(tmp_path: Path) -> None:
    run = summary_dir(tmp_path)
    summary = {"student": "s", "methods": ["kd"], "seed": 0, "params": 1}
    from pipeline.train.runs import MEASURES
    (run / "summary.json").write_text(json.dumps({**summary, **{m: 1.0 for m in MEASURES}}))
    (run / "config.json").write_text(json.dumps({"cache": ["x"], "student": "s", "methods": ["kd"], "out": str(run)}))
    line = cli_error(run_cli("runs", str(tmp_path)))
    assert line.startswith(f"error: {run / 'config.json'} is not a run's config (--cache: input should be a valid string")
