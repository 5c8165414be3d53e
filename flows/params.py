"""`distillery train --sweep FILE.toml`: the `train-students` flow's parameters read from a file.

The flows take the library's own config models as parameters (`RunSettings`, `StudentSpec`, `CacheRequest`,
`FitConfig`): one model per concept, whose `Help` annotations are the descriptions the Prefect UI shows.
No `from __future__ import annotations` in `flows/`: a served flow is cloudpickled into the process that
runs it, and string annotations would have to be resolved there (they cannot be, so every scheduled run
failed at parameter validation).
"""

import tomllib
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError

from pipeline.errors import DistilleryError
from pipeline.train.config import RunSettings, StudentSpec, TrainError


class SweepFile(BaseModel):
    """`distillery train --sweep FILE.toml`: the `train-students` flow's parameters, written as a deployment's
    ``[deployment.parameters]`` holds them (deploy/nightly.toml): ``cache``, ``out``, ``sweep``, ``students =
    [{ student = ..., methods = [...] }, ...]``, ``task_timeout``, a ``[settings]`` table (`RunSettings`) and
    its ``[settings.optim]`` table (`OptimConfig`)."""

    model_config = ConfigDict(extra="forbid")

    cache: Optional[str] = None
    out: Optional[str] = None
    sweep: Optional[str] = None
    students: list[StudentSpec] = []
    settings: RunSettings = Field(default_factory=RunSettings)
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
            # A library config's own check (a range, a method spec) as its one line, pydantic's message otherwise.
            original = err.get("ctx", {}).get("error")
            message = str(original) if isinstance(original, DistilleryError) else err["msg"]
            raise TrainError(f"--sweep {path}: {'.'.join(map(str, err['loc']))}: {message}") from None

