"""Flow parameters as pydantic models: what the Prefect UI shows (descriptions, choices) and validates.

No `from __future__ import annotations` in `flows/`: a served flow is cloudpickled into the process that
runs it, and string annotations would have to be resolved there (they cannot be, so every scheduled run
failed at parameter validation). The library's own config objects keep their checks; these models only
describe and carry the values, then build the library object (whose errors are one line).
"""

import tomllib
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError

from pipeline.options import default_of
from pipeline.train.config import RunSettings, StudentSpec, TrainError
from pipeline.train.optim import OptimConfig

_OPTIM_FIELDS = tuple(OptimConfig.model_fields)


def _run(name: str):  # noqa: ANN202 - any field's type
    """A `RunSettings` default: declared there once, shown by the Prefect UI and the CLI from here."""
    return default_of(RunSettings, name)


def _optim(name: str):  # noqa: ANN202
    return default_of(OptimConfig, name)


class Student(BaseModel):
    """One student of a sweep."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    student: str = Field(description="timm model name, e.g. resnet18 or test_resnet")
    methods: list[str] = Field(min_length=1, description="distillation methods, composed: ce, kd:T=2, dkd, "
                                                         "fitnet, ... (README, 'Methods')")

    def spec(self) -> StudentSpec:
        return StudentSpec(student=self.student, methods=tuple(self.methods))


class TrainSettings(BaseModel):
    """Training settings shared by every student of a sweep (`pipeline.train.config.RunSettings`)."""

    # A misspelt key in a deployment spec, or a field the library adds and this model lacks, fails loudly.
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(_run("epochs"), ge=1, description="training epochs")
    seed: int = Field(_run("seed"), ge=0, description="student seed (initialisation, shuffling)")
    batch_size: int = Field(_run("batch_size"), ge=1, description="samples per optimiser step")
    optimizer: Literal["adamw", "sgd"] = Field(_optim("optimizer"), description="optimiser")
    lr: float = Field(_optim("lr"), gt=0, description="peak learning rate (cosine schedule after a linear warm-up)")
    weight_decay: float = Field(_optim("weight_decay"), ge=0, description="weight decay (not on norms and biases)")
    momentum: float = Field(_optim("momentum"), ge=0, description="SGD momentum (sgd only)")
    warmup_epochs: float = Field(_optim("warmup_epochs"), ge=0, description="epochs of linear learning-rate warm-up")
    clip_grad: Optional[float] = Field(_optim("clip_grad"), gt=0, description="clip the gradient norm to this value")
    input_size: Optional[int] = Field(_run("input_size"), ge=8, description="student render size (default: the "
                                                                            "teacher's)")
    online_teacher: bool = Field(_run("online_teacher"), description="compute the targets live from the teacher "
                                                                     "(the cached run's twin, for comparison)")
    workers: int = Field(_run("workers"), ge=0, description="DataLoader worker processes streaming the cache (0: none)")
    shuffle_buffer: int = Field(_run("shuffle_buffer"), ge=1, description="samples held for the within-buffer shuffle")
    eval_every: int = Field(_run("eval_every"), ge=1, description="evaluate every this many epochs (and after the last)")
    device: str = Field(_run("device"), description="auto | cpu | cuda | cuda:N")
    resume: bool = Field(_run("resume"), description="continue from the run directory's checkpoint")
    on_bad_image: Literal["fail", "skip"] = Field(_run("on_bad_image"), description="an undecodable val image of an "
                                                  "image folder: 'fail' names it, 'skip' leaves it out")

    def run_settings(self) -> RunSettings:
        """The library's settings (its checks raise a one-line `DistilleryError`)."""
        values = self.model_dump()
        try:
            optim = OptimConfig(**{k: values.pop(k) for k in _OPTIM_FIELDS})
        except ValueError as e:  # OptimConfig's own checks, reported like every other bad option
            raise TrainError(str(e)) from None
        return RunSettings(optim=optim, **values)

    @classmethod
    def of(cls, settings: RunSettings) -> "TrainSettings":
        values = settings.model_dump()
        return cls(**values.pop("optim"), **values)


class SweepFile(BaseModel):
    """`distillery train --sweep FILE.toml`: the `train-students` flow's parameters, written as a deployment's
    ``[deployment.parameters]`` holds them (deploy/nightly.toml): ``cache``, ``out``, ``sweep``, ``students =
    [{ student = ..., methods = [...] }, ...]``, ``task_timeout`` and a ``[settings]`` table."""

    model_config = ConfigDict(extra="forbid")

    cache: Optional[str] = None
    out: Optional[str] = None
    sweep: Optional[str] = None
    students: list[Student] = []
    settings: TrainSettings = TrainSettings()
    task_timeout: Optional[PositiveFloat] = None

    @classmethod
    def load(cls, path: Path) -> "SweepFile":
        """Read and check ``path``; any problem is one line naming the file and the field."""
        try:
            return cls(**tomllib.loads(path.read_text()))
        except OSError as e:
            raise TrainError(f"--sweep {path}: cannot read it ({e.strerror}); see deploy/nightly.toml's "
                             f"train-students parameters for the format") from None
        except tomllib.TOMLDecodeError as e:
            raise TrainError(f"--sweep {path} is not valid TOML: {e}") from None
        except ValidationError as e:
            err = e.errors()[0]
            raise TrainError(f"--sweep {path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None

