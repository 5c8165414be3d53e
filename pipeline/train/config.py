"""What a student run is: its configuration, and how a sweep of students maps to run directories.

A run trains one student architecture with a list of methods against one teacher cache (docs/ARCHITECTURE.md#data-flow, docs/methods.md#compose: "methods compose") and writes one run directory (docs/ARCHITECTURE.md#command-line-contract). `RunSettings` is what every student of a
sweep shares; `plan_runs` turns a sweep into one `TrainConfig` per student.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import Field, model_validator

from pipeline.data.datasets import check_bad_image_policy
from pipeline.errors import DistilleryError
from pipeline.methods import resolve_method_spec
from pipeline.object_store import location
from pipeline.options import Config, Range, check_device, check_ranges
from pipeline.train.optim import OptimConfig


class TrainError(DistilleryError):
    """A student run that cannot go ahead as asked; the message says what is wrong and what to do."""


class RunSettings(Config):
    """Training settings shared by every student of a sweep."""

    epochs: int = 10
    seed: int = 0
    batch_size: int = 64
    optim: OptimConfig = Field(default_factory=OptimConfig)
    input_size: int | None = None  # student render size; default: the teacher's
    online_teacher: bool = False  # compute the targets live from the teacher instead of the cache
    workers: int = 1  # DataLoader workers decoding and rendering the stream (0: in the main process)
    shuffle_buffer: int = 1024  # samples held for the within-buffer shuffle
    eval_every: int = 1  # evaluate on the val split every this many epochs (and always after the last)
    device: str = "auto"
    resume: bool = False  # continue from the run directory's checkpoint, if there is one
    on_bad_image: str = "fail"  # an undecodable val image of an image folder: "fail" (name it) or "skip"

    RANGES: ClassVar[dict[str, Range]] = {
        "epochs": Range(ge=1), "seed": Range(ge=0), "batch_size": Range(ge=1), "input_size": Range(ge=8),
        "workers": Range(ge=0), "shuffle_buffer": Range(ge=1), "eval_every": Range(ge=1)}

    @model_validator(mode="after")
    def _check(self) -> RunSettings:
        check_ranges(vars(self), self.RANGES)
        check_bad_image_policy(self.on_bad_image)
        return self

    def check_machine(self) -> None:
        """What only the machine that trains can tell: whether it has the requested device."""
        check_device(self.device)


class StudentSpec(Config):
    """One student of a sweep: a timm architecture and the methods it is trained with."""

    student: str
    methods: tuple[str, ...]

    @model_validator(mode="after")
    def _check(self) -> StudentSpec:
        if not self.methods:
            raise TrainError(f"student {self.student} has no --method; give at least one, e.g. --method ce")
        for spec in self.methods:  # an unknown method or an option out of range, before any cache is opened
            resolve_method_spec(spec)
        return self

    @property
    def slug(self) -> str:
        """`resnet18` + (`ce`, `kd:T=2`) -> `resnet18-ce+kd-T2`: safe as a directory name."""
        methods = "+".join(re.sub(r"[:,]", "-", m).replace("=", "") for m in self.methods)
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{self.student}-{methods}")


class TrainConfig(Config):
    """One student run: written to RUNDIR/config.json and stored in every checkpoint."""

    cache: str
    student: str
    methods: tuple[str, ...]
    out: str
    settings: RunSettings = Field(default_factory=RunSettings)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        StudentSpec(student=self.student, methods=self.methods)  # the same checks as a sweep's
        return self

    def to_dict(self) -> dict[str, Any]:
        """config.json's object (JSON types: the methods a list)."""
        return self.model_dump(mode="json")

    def identity(self) -> dict[str, Any]:
        """What must match for `--resume` to continue a run: everything that changes its result.

        The run directory, the device and the resume flag itself may differ, and so may --on-bad-image: it
        decides which val images are evaluated, never what is trained (and runs made before it existed resume).
        """
        d = self.to_dict()
        del d["out"]
        for key in ("device", "resume", "on_bad_image"):
            del d["settings"][key]
        return d


def plan_runs(cache: str, students: list[StudentSpec], out: str, settings: RunSettings) -> list[TrainConfig]:
    """One config per student. A single student writes into `out`; several each into
    `out/<student>-<methods>-s<seed>/` (docs/ARCHITECTURE.md#command-line-contract)."""
    if not students:
        raise TrainError("no student given; pass --student TIMM_NAME at least once")
    slugs = [s.slug for s in students]
    if len(set(slugs)) != len(slugs):
        raise TrainError(f"the same student and methods are listed twice: {sorted(slugs)}")
    if len(students) == 1:
        outs = [out]
    else:
        outs = [str(location(out) / f"{s.slug}-s{settings.seed}") for s in students]
    return [TrainConfig(cache=cache, student=s.student, methods=s.methods, out=o, settings=settings)
            for s, o in zip(students, outs)]
