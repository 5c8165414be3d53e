"""Flow parameters as pydantic models: what the Prefect UI shows (descriptions, choices) and validates.

No `from __future__ import annotations` in `flows/`: a served flow is cloudpickled into the process that
runs it, and string annotations would have to be resolved there (they cannot be, so every scheduled run
failed at parameter validation). The library's own config objects keep their checks; these models only
describe and carry the values, then build the library object (whose errors are one line).
"""

import dataclasses
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from pipeline.train.config import RunSettings, StudentSpec, TrainError
from pipeline.train.optim import OptimConfig

_OPTIM_FIELDS = tuple(f.name for f in dataclasses.fields(OptimConfig))


class Student(BaseModel):
    """One student of a sweep."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    student: str = Field(description="timm model name, e.g. resnet18 or test_resnet")
    methods: list[str] = Field(min_length=1, description="distillation methods, composed: ce, kd:T=2, dkd, "
                                                         "fitnet, ... (README, 'Methods')")

    def spec(self) -> StudentSpec:
        return StudentSpec(self.student, tuple(self.methods))


class TrainSettings(BaseModel):
    """Training settings shared by every student of a sweep (`pipeline.train.config.RunSettings`)."""

    # A misspelt key in a deployment spec, or a field the library adds and this model lacks, fails loudly.
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1, description="training epochs")
    seed: int = Field(0, ge=0, description="student seed (initialisation, shuffling)")
    batch_size: int = Field(64, ge=1, description="samples per optimiser step")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="optimiser")
    lr: float = Field(2e-3, gt=0, description="peak learning rate (cosine schedule after a linear warm-up)")
    weight_decay: float = Field(0.05, ge=0, description="weight decay (not on norms and biases)")
    momentum: float = Field(0.9, ge=0, description="SGD momentum (sgd only)")
    warmup_epochs: float = Field(1.0, ge=0, description="epochs of linear learning-rate warm-up")
    clip_grad: Optional[float] = Field(None, gt=0, description="clip the gradient norm to this value")
    input_size: Optional[int] = Field(None, ge=8, description="student render size (default: the teacher's)")
    online_teacher: bool = Field(False, description="compute the targets live from the teacher (the cached "
                                                    "run's twin, for comparison)")
    workers: int = Field(1, ge=0, description="DataLoader worker processes streaming the cache (0: none)")
    shuffle_buffer: int = Field(1024, ge=1, description="samples held for the within-buffer shuffle")
    eval_every: int = Field(1, ge=1, description="evaluate every this many epochs (and after the last)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    resume: bool = Field(False, description="continue from the run directory's checkpoint")
    on_bad_image: Literal["fail", "skip"] = Field("fail", description="an undecodable val image of an image "
                                                  "folder: 'fail' names it, 'skip' leaves it out")

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
        values = dataclasses.asdict(settings)
        return cls(**values.pop("optim"), **values)
