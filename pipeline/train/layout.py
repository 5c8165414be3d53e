"""Where the students of one `--out` train: one layout for one student or many
(docs/ARCHITECTURE.md#command-line-contract).

Every student, alone or in a sweep, gets its own run directory `OUT/<student>-<methods>-s<seed>/`, so a
later sweep adds students beside an earlier one's and `distillery runs OUT` reads one shape. A directory
that itself holds a run is the flat layout of earlier versions (one student straight in `--out`): its one
student resumes it in place with `--resume`; anything else is refused in one line, so a sweep never nests
its runs inside an old run.
"""

from __future__ import annotations

from collections.abc import Iterable

from pipeline.methods import MethodSpec
from pipeline.object_store import check_output_location, location
from pipeline.train.config import RunSettings, StudentSpec, TrainConfig, TrainError, run_slug
from pipeline.train.rundir import CHECKPOINT, CONFIG, RunDir


def run_dir_name(student: str, methods: Iterable[MethodSpec | str], seed: int) -> str:
    """`resnet18` with (`ce`, `kd:T=2`), seed 0 -> `resnet18-ce+kd-T2-s0`: the student's directory in --out."""
    return f"{run_slug(student, methods)}-s{seed}"


def plan_runs(cache: str, students: list[StudentSpec], out: str, settings: RunSettings) -> list[TrainConfig]:
    """One config per student, each run directory `out/<student>-<methods>-s<seed>/`.

    With `settings.resume`, a student whose directory holds no run yet starts there (a student added to a
    sweep rerun with --resume), as long as one of them holds a run; none holding one is one line (a mistyped
    --out or seed would otherwise train from scratch). An `out` holding a run itself (the flat layout) is
    resumed in place by a single student with --resume and refused otherwise.
    """
    if not students:
        raise TrainError("no student given; pass --student TIMM_NAME at least once")
    slugs = [s.slug for s in students]
    if len(set(slugs)) != len(slugs):
        raise TrainError(f"the same student and methods are listed twice: {sorted(slugs)}")
    check_output_location(out)  # a bad --out is named as given, before any of its subdirectories
    if RunDir(out).holds_run():
        if settings.resume and len(students) == 1:
            return [TrainConfig(cache=cache, student=students[0].student, methods=students[0].methods, out=out,
                                settings=settings)]
        raise TrainError(f"{out} holds a run written straight into it (the layout before every student got its own "
                         f"subdirectory); continue it with --resume and its one --student, or choose another --out")
    outs = [str(location(out) / run_dir_name(s.student, s.methods, settings.seed)) for s in students]
    started = [RunDir(o).holds_run() for o in outs]
    if settings.resume and not any(started):
        expected = ", ".join(run_dir_name(s.student, s.methods, settings.seed) for s in students)
        raise TrainError(f"--resume: {out} holds no run of these students to continue (no {CONFIG} or {CHECKPOINT} "
                         f"in {expected}); check --out, the students' methods and --seed, or drop --resume to start "
                         f"new runs there")
    return [TrainConfig(cache=cache, student=s.student, methods=s.methods, out=o,
                        settings=settings.model_copy(update={"resume": settings.resume and begun}))
            for s, o, begun in zip(students, outs, started)]
