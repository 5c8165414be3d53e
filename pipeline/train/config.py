"""What a student run is: its configuration.

A run trains one student architecture with a list of methods against one teacher cache (docs/ARCHITECTURE.md#data-flow, docs/methods.md#compose: "methods compose") and writes one run directory (docs/ARCHITECTURE.md#command-line-contract). `RunSettings` is what every student of a
sweep shares; `pipeline.train.layout.plan_runs` turns a sweep into one `TrainConfig` per student.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from pipeline.data.datasets import BAD_IMAGE_POLICIES
from pipeline.errors import DistilleryError
from pipeline.methods import MethodError, MethodSpec
from pipeline.options import (MAX_BATCH, MAX_EPOCHS, MAX_INPUT_SIZE, MAX_SEED, MAX_WORKERS, Config, Help, Range,
                              check_device)
from pipeline.train.optim import OptimConfig


class TrainError(DistilleryError):
    """A student run that cannot go ahead as asked; the message says what is wrong and what to do."""


class RunSettings(Config):
    """Training settings shared by every student of a sweep: the `train-students` flow's ``settings`` parameter
    (a sweep file's ``[settings]`` table, the optimiser's in ``[settings.optim]``) and the options of
    `distillery train`, each declared here once with its range and meaning."""

    epochs: Annotated[int, Range(ge=1, le=MAX_EPOCHS), Help("training epochs")] = 10
    seed: Annotated[int, Range(ge=0, le=MAX_SEED), Help("student seed (initialisation, shuffling)")] = 0
    batch_size: Annotated[int, Range(ge=1, le=MAX_BATCH), Help("samples per optimiser step")] = 64
    optim: Annotated[OptimConfig, Help("the optimiser and its learning-rate schedule")] = Field(
        default_factory=OptimConfig)
    input_size: Annotated[int | None, Range(ge=8, le=MAX_INPUT_SIZE),
                          Help("student render size (default: the teacher's)")] = None
    online_teacher: Annotated[bool, Help("compute the targets live from the teacher (the cached run's twin, for "
                                         "comparison)")] = False
    workers: Annotated[int, Range(ge=0, le=MAX_WORKERS),
                       Help("DataLoader worker processes streaming the cache (0: none)")] = 1
    shuffle_buffer: Annotated[int, Range(ge=1, le=1 << 20), Help("samples held for the within-buffer shuffle")] = 1024
    eval_every: Annotated[int, Range(ge=1), Help("evaluate every this many epochs (and after the last)")] = 1
    device: Annotated[str, Help("auto | cpu | cuda | cuda:N")] = "auto"
    resume: Annotated[bool, Help("continue from the run directory's checkpoint")] = False
    on_bad_image: Annotated[Literal[BAD_IMAGE_POLICIES], Help("an undecodable val image of an image folder: 'fail' "
                                                             "names it, 'skip' leaves it out")] = "fail"

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Every setting by its flat name, the optimiser's included (``lr``, not ``optim.lr``): how the
        options of `distillery train` name them."""
        return (*(name for name in cls.model_fields if name != "optim"), *OptimConfig.model_fields)

    def with_options(self, **options: Any) -> RunSettings:
        """These settings with some replaced, each named as `option_names` lists it (a sweep file's settings
        overridden by the options given on the command line); checked as any other."""
        optim = {name: options.pop(name) for name in list(options) if name in OptimConfig.model_fields}
        return RunSettings(**{**self.model_dump(), **options, "optim": {**self.optim.model_dump(), **optim}})

    def check_machine(self) -> None:
        """What only the machine that trains can tell: whether it has the requested device."""
        check_device(self.device)


class StudentSpec(Config):
    """One student of a sweep: a timm architecture and the methods it is trained with (an entry of the
    `train-students` flow's ``students`` parameter)."""

    student: Annotated[str, Help("timm model name, e.g. resnet18 or test_resnet")]
    # Each spec parsed here, once (an unknown method or an option out of range fails before any cache is opened).
    methods: Annotated[tuple[MethodSpec, ...], Help("distillation methods, composed: ce, kd:T=2, dkd, fitnet, ... "
                                                    "(`distillery methods` lists them)")]

    @model_validator(mode="after")
    def _check(self) -> StudentSpec:
        if not self.methods:
            raise TrainError(f"student {self.student} has no --method; give at least one, e.g. --method ce")
        names = [spec.name for spec in self.methods]
        twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
        if twice is not None:
            raise MethodError(f"method {twice!r} is given twice; give it once with the options you want")
        return self

    @property
    def taps(self) -> tuple[int, ...]:
        """The student stages its methods read, deepest first."""
        return tuple(sorted({tap for spec in self.methods for tap in spec.taps}))

    @property
    def slug(self) -> str:
        """`resnet18` + (`ce`, `kd:T=2`) -> `resnet18-ce+kd-T2`: safe as a directory name."""
        return run_slug(self.student, self.methods)


def run_slug(student: str, methods: Iterable[MethodSpec | str]) -> str:
    """`StudentSpec.slug` from a student and its methods as a summary records them (their text)."""
    joined = "+".join(re.sub(r"[:,]", "-", str(m)).replace("=", "") for m in methods)
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{student}-{joined}")


class TrainConfig(Config):
    """One student run: written to RUNDIR/config.json and stored in every checkpoint."""

    cache: str
    student: str
    methods: tuple[MethodSpec, ...]  # config.json holds their text
    out: str
    settings: RunSettings = Field(default_factory=RunSettings)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        StudentSpec(student=self.student, methods=self.methods)  # a sweep's checks (the specs are parsed already)
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

