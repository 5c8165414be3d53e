"""`distillery runs`: finding run directories, grouping seeds, mean ± std, the plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.train.config import RunSettings, TrainConfig, TrainError
from pipeline.train.optim import OptimConfig
from pipeline.train.runs import (compare_runs, find_runs, formatted_rows, group_label, group_rows,
                                 load_run)


def write_run(path: Path, methods: tuple[str, ...], seed: int, accuracy: float, seconds: float, lr: float | None = None,
              student: str = "test_resnet") -> Path:
    """A finished run directory: summary.json, and config.json when `lr` is given."""
    path.mkdir(parents=True)
    summary = {"student": student, "methods": list(methods), "seed": seed, "epochs": 5, "val_accuracy": accuracy,
               "train_seconds": seconds, "mean_step_seconds": seconds / 100, "peak_rss_bytes": 400 * 2 ** 20 + seed,
               "cache": "runs/cache", "online_teacher": False, "params": 370_000}
    (path / "summary.json").write_text(json.dumps(summary))
    if lr is not None:
        config = TrainConfig(cache="runs/cache", student=student, methods=methods, out=str(path),
                             settings=RunSettings(epochs=5, seed=seed, optim=OptimConfig(lr=lr), device="cpu"))
        (path / "config.json").write_text(json.dumps(config.to_dict()))
    return path


def test_find_runs_takes_run_directories_and_searches_folders(tmp_path: Path) -> None:
    a = write_run(tmp_path / "sweep" / "a", ("ce",), 0, 0.8, 10)
    b = write_run(tmp_path / "sweep" / "deeper" / "b", ("ce",), 1, 0.8, 10)
    c = write_run(tmp_path / "c", ("ce",), 2, 0.8, 10)
    (tmp_path / "sweep" / "unfinished").mkdir()
    assert find_runs([tmp_path / "sweep", c, a]) == sorted([a, b, c])
    with pytest.raises(TrainError, match="no summary.json under"):
        find_runs([tmp_path / "sweep" / "unfinished"])
    with pytest.raises(TrainError, match="is not a directory"):
        find_runs([tmp_path / "missing"])


def test_seeds_of_one_setting_form_one_row_with_mean_and_sample_std(tmp_path: Path) -> None:
    accuracies = {("ce",): [0.80, 0.84, 0.83], ("ce", "kd"): [0.90, 0.86]}
    for methods, values in accuracies.items():
        for seed, acc in enumerate(values):
            write_run(tmp_path / f"{'+'.join(methods)}-s{seed}", methods, seed, acc, 10 + seed)
    rows = group_rows(compare_runs([tmp_path]))
    assert [(r.methods, r.seeds) for r in rows] == [("ce", [0, 1, 2]), ("ce+kd", [0, 1])]
    for row, values in zip(rows, accuracies.values()):
        assert row.mean.val_accuracy == pytest.approx(np.mean(values))
        assert row.std.val_accuracy == pytest.approx(np.std(values, ddof=1))
        assert row.mean.train_seconds == pytest.approx(10 + (len(values) - 1) / 2)
    text = formatted_rows(rows)
    assert text[1]["val accuracy"] == f"88.00 ± {100 * np.std([0.90, 0.86], ddof=1):.2f} %"
    assert text[0]["seeds"] == "0,1,2" and text[0]["params"] == "0.37 M" and text[0]["peak RSS"] == "400 ± 0 MiB"


def test_runs_that_differ_in_more_than_the_seed_are_separate_rows_naming_the_difference(tmp_path: Path) -> None:
    for seed in (0, 1):
        write_run(tmp_path / f"lr1-s{seed}", ("ce", "kd"), seed, 0.9, 10, lr=1e-3)
    write_run(tmp_path / "lr2-s0", ("ce", "kd"), 0, 0.8, 10, lr=2e-3)
    groups = compare_runs([tmp_path])
    assert sorted(len(g.runs) for g in groups) == [1, 2]
    rows = group_rows(groups)
    assert {r.setup["settings.optim.lr"] for r in rows} == {1e-3, 2e-3}
    assert [list(r.setup) for r in rows] == [["settings.optim.lr"]] * 2  # out and the seed never split a group
    assert load_run(tmp_path / "lr1-s0").setup == load_run(tmp_path / "lr1-s1").setup


def test_single_runs_print_without_std_and_are_labelled_for_a_plot(tmp_path: Path) -> None:
    write_run(tmp_path / "a", ("ce",), 0, 0.8, 10)
    write_run(tmp_path / "b", ("ce",), 0, 0.9, 20, student="resnet10t")
    rows = group_rows(compare_runs([tmp_path]))
    assert [(r["student"], r["val accuracy"]) for r in formatted_rows(rows)] == [("resnet10t", "90.00 %"),
                                                                              ("test_resnet", "80.00 %")]
    assert [group_label(r) for r in rows] == ["resnet10t ce (1 seeds)", "test_resnet ce (1 seeds)"]


def test_a_summary_not_written_by_train_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "summary.json").write_text(json.dumps({"student": "a", "methods": ["ce"]}))
    with pytest.raises(TrainError, match="lacks"):
        compare_runs([tmp_path])


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.unlink() or os.mkfifo(p), "is not a regular file"),
    (lambda p: p.write_bytes(b"\xff\xfe{}"), "is not UTF-8 text"),
    (lambda p: p.write_text("[" * 50_000 + "]" * 50_000), "nests deeper than 32 levels"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "val_accuracy": "high"})), "wrong type"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "seed": float("nan")})), "not valid JSON"),
    (lambda p: os.truncate(p, 100 * 2 ** 30), "more than the 1 MiB"),  # a sparse 100 GiB file: refused by size
])
def test_a_hostile_summary_is_one_line_naming_it(tmp_path: Path, damage, message: str) -> None:
    run = write_run(tmp_path / "r", ("ce",), 0, 0.5, 10.0)
    damage(run / "summary.json")
    with pytest.raises(TrainError, match=message) as e:
        compare_runs([tmp_path])
    assert "\n" not in str(e.value) and str(run / "summary.json") in str(e.value)


def test_a_bad_config_json_is_blamed_on_the_file_not_on_an_option(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", ("ce",), 0, 0.5, 10.0, lr=1e-3)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "methods": ["kd:T=-1"]}))
    with pytest.raises(TrainError, match="config.json is not a run's config") as e:
        compare_runs([tmp_path])
    assert "\n" not in str(e.value)


def test_nightly_runs_group_by_date_or_flow_run_and_show_the_trend(tmp_path: Path) -> None:
    """22 nights of one setting are one row by config, one row a night by date (in date order, so a
    regression shows), and one row a flow run by the folder holding the run."""
    for night, accuracy in enumerate((0.61, 0.62, 0.55)):
        run = write_run(tmp_path / f"nightly-{night}" / "test_resnet-ce-s0", ("ce",), 0, accuracy, 10.0)
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "finished_at": f"2026-12-0{night + 1}T02:00:00+00:00"}))

    (one,) = group_rows(compare_runs([tmp_path]))
    assert one.seeds == [0, 0, 0] and one.group == ""
    by_date = group_rows(compare_runs([tmp_path], by="date"))
    assert [(r.group, r.mean.val_accuracy) for r in by_date] == [
        ("2026-12-01", 0.61), ("2026-12-02", 0.62), ("2026-12-03", 0.55)]
    assert [r["group"] for r in formatted_rows(by_date)] == ["2026-12-01", "2026-12-02", "2026-12-03"]
    by_flow = group_rows(compare_runs([tmp_path], by="flow-run"))
    assert [r.group for r in by_flow] == ["nightly-0", "nightly-1", "nightly-2"]
    with pytest.raises(TrainError, match="--by must be one of config, date, flow-run, not 'week'"):
        compare_runs([tmp_path], by="week")


def test_a_run_without_finished_at_is_dated_by_its_summary_file(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", ("ce",), 0, 0.5, 10.0)
    os.utime(run / "summary.json", (1_764_990_000, 1_764_990_000))  # 2025-12-06 UTC
    assert load_run(run).finished == "2025-12-06"


def test_one_student_several_and_an_old_flat_run_are_read_alike(tmp_path: Path) -> None:
    """`train --out` gives one student and several the same shape (`plan_runs`); a run written straight into
    its --out by an earlier version is read too, and grouped by flow run under its own folder's name."""
    from pipeline.train.config import StudentSpec
    from pipeline.train.layout import plan_runs

    settings = RunSettings(seed=1)
    one = plan_runs("c", [StudentSpec(student="test_resnet", methods=("ce",))], str(tmp_path / "one"), settings)
    two = plan_runs("c", [StudentSpec(student="test_resnet", methods=("ce",)),
                          StudentSpec(student="test_resnet", methods=("ce", "kd"))], str(tmp_path / "two"), settings)
    for config in one + two:
        write_run(Path(config.out), tuple(map(str, config.methods)), 1, 0.8, 10.0)
    flat = write_run(tmp_path / "old", ("ce",), 1, 0.7, 10.0)
    assert [p.relative_to(tmp_path).parent for p in find_runs([tmp_path / "one", tmp_path / "two"])] == [
        Path("one"), Path("two"), Path("two")]
    assert find_runs([tmp_path]) == sorted([Path(c.out) for c in one + two] + [flat])
    by_flow = group_rows(compare_runs([tmp_path], by="flow-run"))
    assert sorted((r.group, r.methods) for r in by_flow) == [("old", "ce"), ("one", "ce"), ("two", "ce"),
                                                             ("two", "ce+kd")]
