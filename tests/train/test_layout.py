"""One layout for one student or many: OUT/<student>-<methods>-s<seed>/, resume per student, the flat layout of
earlier versions resumed in place or refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.train.config import RunSettings, StudentSpec, TrainError
from pipeline.train.layout import plan_runs, run_dir_name

CE = StudentSpec(student="resnet18", methods=("ce",))
CE_KD = StudentSpec(student="resnet18", methods=("ce", "kd:T=2,alpha=0.5"))


def started(run_dir: Path) -> Path:
    """A run directory as a run leaves it after it starts (config.json written)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    return run_dir


def test_one_student_and_several_get_the_same_shape(tmp_path: Path) -> None:
    settings = RunSettings(seed=3)
    [single] = plan_runs("c", [CE], str(tmp_path / "x"), settings)
    assert single.out == str(tmp_path / "x" / "resnet18-ce-s3") and [str(m) for m in single.methods] == ["ce"]
    runs = plan_runs("c", [CE, CE_KD], str(tmp_path / "x"), settings)
    assert [r.out for r in runs] == [str(tmp_path / "x" / "resnet18-ce-s3"),
                                     str(tmp_path / "x" / "resnet18-ce+kd-T2-alpha0.5-s3")]
    assert run_dir_name("resnet18", ["ce", "kd:T=2,alpha=0.5"], 3) == "resnet18-ce+kd-T2-alpha0.5-s3"
    [url] = plan_runs("c", [CE], "memory://runs/x", settings)
    assert url.out == "memory:///runs/x/resnet18-ce-s3"
    with pytest.raises(TrainError, match="listed twice"):
        plan_runs("c", [CE] * 2, "o", settings)
    with pytest.raises(TrainError, match="no student"):
        plan_runs("c", [], "o", settings)


def test_a_student_added_beside_an_earlier_run_starts_while_resume_continues_the_earlier(tmp_path: Path) -> None:
    started(tmp_path / "runs" / "resnet18-ce-s0")
    resumed, added = plan_runs("c", [CE, CE_KD], str(tmp_path / "runs"), RunSettings(resume=True))
    assert resumed.settings.resume and not added.settings.resume
    [alone] = plan_runs("c", [CE_KD], str(tmp_path / "runs"), RunSettings())  # beside it, without --resume
    assert alone.out == str(tmp_path / "runs" / "resnet18-ce+kd-T2-alpha0.5-s0")


@pytest.mark.parametrize("where", ["missing", "empty", "other seed"])
def test_resume_where_none_of_the_students_has_a_run_is_one_line(tmp_path: Path, where: str) -> None:
    out = tmp_path / "runs"
    if where == "empty":
        out.mkdir()
    if where == "other seed":
        started(out / "resnet18-ce-s0")
    with pytest.raises(TrainError) as e:
        plan_runs("c", [CE], str(out), RunSettings(resume=True, seed=1))
    assert str(e.value) == (f"--resume: {out} holds no run of these students to continue (no config.json or "
                            f"checkpoint.pt in resnet18-ce-s1); check --out, the students' methods and --seed, or "
                            f"drop --resume to start new runs there")


def test_a_flat_run_of_earlier_versions_resumes_in_place_and_is_never_nested_into(tmp_path: Path) -> None:
    flat = started(tmp_path / "kd")
    [resumed] = plan_runs("c", [CE], str(flat), RunSettings(resume=True))
    assert resumed.out == str(flat) and resumed.settings.resume
    refusal = (f"{flat} holds a run written straight into it (the layout before every student got its own "
               f"subdirectory); continue it with --resume and its one --student, or choose another --out")
    for students, resume in (([CE], False), ([CE, CE_KD], True), ([CE, CE_KD], False)):
        with pytest.raises(TrainError) as e:
            plan_runs("c", students, str(flat), RunSettings(resume=resume))
        assert str(e.value) == refusal
