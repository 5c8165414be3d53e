"""Checks on user options shared by every command's config: ranges, devices and output locations.

Each check raises :class:`OptionError`, one line naming the option, the value and what is allowed, so a
bad option stops a command before any work starts and before anything is written (README, "Command line").
"""

from __future__ import annotations

import inspect
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import DistilleryError

if TYPE_CHECKING:  # torch is imported where a device is checked: the CLI starts without it
    import torch


class OptionError(DistilleryError):
    """An option outside its range, a device this machine lacks, or an output location that cannot be written."""


@dataclass(frozen=True)
class Range:
    """Allowed interval of a numeric option: any of ``gt``, ``ge``, ``lt``, ``le``; NaN and inf are never in it.

    Declared next to an option, e.g. a method's ``T: Annotated[float, Range(gt=0)] = 4.0``.
    """

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def describe(self) -> str:
        bounds = [f"{op} {bound:g}" for op, bound in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
                  if bound is not None]
        return " and ".join(bounds) or "finite"

    def contains(self, value: float) -> bool:
        return (math.isfinite(value)
                and (self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def check(self, name: str, value: float | None, error: type[DistilleryError] = OptionError) -> None:
        """Raise ``error`` (one line naming ``name``) unless ``value`` (None: not given) lies in the range."""
        if value is not None and not self.contains(value):
            raise error(f"{name} must be {self.describe()}, not {value}")


@dataclass(frozen=True)
class Help:
    """What an option means, declared next to it: ``T: Annotated[float, Range(gt=0), Help("temperature")] = 4.0``
    (`distillery methods` prints it beside the option's default)."""

    text: str


def default_of(config: Any, name: str) -> Any:
    """The default that ``config`` (a pydantic model or a function) declares for ``name``: what a
    command-line option or a flow parameter shows, so no default is stated twice."""
    if isinstance(config, type) and issubclass(config, BaseModel):
        return config.model_fields[name].get_default(call_default_factory=True)
    return inspect.signature(config).parameters[name].default


class Config(BaseModel):
    """Base of the library's configs: built by keyword, immutable, unknown keys refused, and a bad value is the
    one line of a :class:`DistilleryError` (`one_line_error`), never pydantic's multi-line report.

    A subclass checks what a field's type cannot say (ranges, choices) in a ``model_validator`` that raises its
    own ``DistilleryError``; a nested config (a dict from config.json) is checked the same way.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise one_line_error(e) from None


def check_ranges(values: dict[str, float | None], ranges: dict[str, Range], prefix: str = "--") -> None:
    """Check each named value against its range; names become option spellings (``batch_size`` -> ``--batch-size``)."""
    for name, allowed in ranges.items():
        allowed.check(prefix + name.replace("_", "-"), values[name])


def one_line_error(error: ValidationError) -> DistilleryError:
    """A pydantic config's first validation error as the one line a user sees: a :class:`DistilleryError`
    raised by one of its validators as it was, a type error as ``--option: what pydantic says``."""
    first = error.errors()[0]
    original = first.get("ctx", {}).get("error")
    if isinstance(original, DistilleryError):
        return original
    option = "--" + "-".join(str(part) for part in first["loc"]).replace("_", "-")
    return OptionError(f"{option}: {first['msg'].lower()}, not {first.get('input')!r}")


def check_device(device: str) -> None:
    """``auto``, ``cpu``, or an accelerator this machine has (``cuda``, ``cuda:N`` with N < the device count)."""
    import torch

    if device in ("auto", "cpu"):
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise OptionError(f"--device {device!r} is not a device; use auto, cpu or cuda[:N]") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OptionError(f"--device {device}: this machine has no CUDA device; use --device cpu (or auto)")
        if parsed.index is not None and parsed.index >= count:
            raise OptionError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif parsed.type != "cpu":
        raise OptionError(f"--device {device}: only cpu and cuda devices are supported; use auto, cpu or cuda[:N]")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_can_create_in(directory: Path, option: str, target: Path) -> None:
    """``directory`` exists: it must be a directory this process may create files in (tried, not guessed:
    permission bits say nothing for root, read-only mounts or ACLs)."""
    if not directory.is_dir():
        raise OptionError(f"{option} {target}: {directory} is a file, not a directory; choose another {option}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".distillery-probe.", dir=directory)
    except OSError as e:
        raise OptionError(f"{option} {target}: cannot write in {directory} ({e.strerror}); choose a writable "
                          f"{option}") from None
    os.close(fd)
    os.unlink(probe)


def check_output_dir(path: str | Path, option: str = "--out") -> None:
    """``path`` is, or can be created as, a directory this process can write in; nothing is created."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise OptionError(f"{option} {path} is a file, not a directory; choose another {option}")
    _check_can_create_in(_nearest_existing(target), option, Path(path))


def check_output_file(path: str | Path, option: str = "--out") -> None:
    """``path`` can be written as a file: not a directory, and its (nearest existing) parent is writable."""
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        raise OptionError(f"{option} {path} is a directory; give a file path such as {Path(path) / 'teacher.pt'}")
    _check_can_create_in(_nearest_existing(target.parent), option, Path(path))


def resolve_device(device: str) -> torch.device:
    """`auto` (CUDA when torch sees a GPU, else CPU) or a device this machine has (`check_device`: one line
    otherwise, not a CUDA traceback from deep inside a run)."""
    import torch

    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
