"""User options: how a config declares one, and the checks shared by every command (ranges, choices, devices,
output locations).

An option is declared once, where its config declares it, with its range and meaning beside its default:
``batch_size: Annotated[int, Range(ge=1), Help("samples per optimiser step")] = 64`` (a method's option the
same way, as an ``__init__`` keyword). The CLI and the Prefect flows read the default (`default_of`) and the
help (`help_of`) from there; :class:`Config` checks the range. Each check raises :class:`OptionError`, one line
naming the option, the value and what is allowed, so a bad option stops a command before any work starts and
before anything is written (docs/guide.md#option-checks).
"""

from __future__ import annotations

import inspect
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from pipeline.errors import DistilleryError

if TYPE_CHECKING:  # torch is imported where a device is checked: the CLI starts without it
    import torch


class OptionError(DistilleryError):
    """An option outside its range, a device this machine lacks, or an output location that cannot be written."""


MAX_SEED = (1 << 32) - 1
"""The largest seed: numpy's generators take seeds below 2**32."""
MAX_WORKERS = 64
MAX_BATCH = 1 << 16
MAX_EPOCHS = 100_000
MAX_LR = 10.0
"""The largest learning rate: every optimiser here (AdamW, SGD) diverges far below it on any network."""
MAX_WEIGHT_DECAY = 10.0
"""The largest weight decay: at any learning rate that trains, more erases the weights within a few steps."""
MAX_CLIP_GRAD = 1e4
"""The largest gradient-norm clip: above it no gradient of a network that trains is clipped, the same as none."""
MAX_INPUT_SIZE = 1024
"""The largest render size accepted (teacher or student, from an option or a cache manifest): one 1024 x 1024
RGB view is 12 MiB as float32 and a batch of them fills a GPU; 100000 would ask for 120 GB per view."""


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
        bounds = [f"{op} {bound if isinstance(bound, int) else format(bound, 'g')}"  # an int seed bound in full
                  for op, bound in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
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

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        # A config field's bounds in its JSON schema: the Prefect UI's parameter form shows and checks them.
        schema = handler(core_schema)
        bounds = {"exclusiveMinimum": self.gt, "minimum": self.ge, "exclusiveMaximum": self.lt, "maximum": self.le}
        return {**schema, **{key: bound for key, bound in bounds.items() if bound is not None}}


@dataclass(frozen=True)
class Help:
    """What an option means, declared next to it: ``T: Annotated[float, Range(gt=0), Help("temperature")] = 4.0``
    (`distillery methods` prints it beside the option's default; a config field's is its CLI option's help and
    its flow parameter's description in the Prefect UI)."""

    text: str

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        return {**handler(core_schema), "description": self.text}


_D = TypeVar("_D", Range, Help)


def declared(annotation: Any, kind: type[_D]) -> _D | None:
    """The ``kind`` marker of an ``Annotated[...]`` annotation, or of a pydantic field's metadata (a list);
    None without one."""
    if isinstance(annotation, list):
        markers: Iterable[Any] = annotation
    else:
        markers = get_args(annotation)[1:] if get_origin(annotation) is Annotated else ()
    return next((m for m in markers if isinstance(m, kind)), None)


def default_of(config: Any, name: str) -> Any:
    """The default that ``config`` (a pydantic model or a function) declares for ``name``: what a
    command-line option or a flow parameter shows, so no default is stated twice."""
    if isinstance(config, type) and issubclass(config, BaseModel):
        return config.model_fields[name].get_default(call_default_factory=True)
    return inspect.signature(config).parameters[name].default


def help_of(config: type[BaseModel], name: str) -> str:
    """What option ``name`` of ``config`` means (its ``Help``): a command-line option's help, so no help text is
    stated twice. A field without one is a declaration mistake (TypeError, when the CLI is imported)."""
    found = declared(config.model_fields[name].metadata, Help)
    if found is None:
        raise TypeError(f"{config.__name__}.{name} needs its meaning declared next to it: Annotated[..., Help('...')]")
    return found.text


def _choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal[...]`` field allows (None: not a choice)."""
    return get_args(annotation) if get_origin(annotation) is Literal else None


class Config(BaseModel):
    """Base of the library's configs: built by keyword, immutable, unknown keys refused, and a bad value is the
    one line of a :class:`DistilleryError` (`one_line_error`), never pydantic's multi-line report.

    A field declares what it allows in its type: a choice as ``Literal[...]``, a numeric range as ``Range`` in
    ``Annotated[...]`` (with its ``Help``); this base refuses a value outside either in one line naming the
    option (``--batch-size must be >= 1, not 0``). A subclass checks what no field can say alone in a
    ``model_validator`` that raises its own ``DistilleryError``; a nested config (a dict from config.json) is
    checked the same way.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise one_line_error(e) from None

    @model_validator(mode="before")
    @classmethod
    def _declared_choices(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                allowed = _choices(field.annotation)
                if allowed is not None and name in data and data[name] not in allowed:
                    raise OptionError(f"{option_name(name)} must be one of {', '.join(map(str, allowed))}, "
                                      f"not {data[name]!r}")
        return data

    @model_validator(mode="after")
    def _declared_ranges(self) -> Config:
        for name, field in type(self).model_fields.items():
            allowed = declared(field.metadata, Range)
            if allowed is not None:
                allowed.check(option_name(name), getattr(self, name))
        return self


def option_name(field: str) -> str:
    """A config field's command-line spelling: ``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


def one_line_error(error: ValidationError) -> DistilleryError:
    """A pydantic config's first validation error as the one line a user sees: a :class:`DistilleryError`
    raised by one of its validators as it was, a type error as ``--option: what pydantic says`` (the option
    named by its field, a nested config's too: ``--lr``, not ``--optim-lr``)."""
    first = error.errors()[0]
    original = first.get("ctx", {}).get("error")
    if isinstance(original, DistilleryError):
        return original
    field = next((str(part) for part in reversed(first["loc"]) if isinstance(part, str)), "value")
    return OptionError(f"{option_name(field)}: {first['msg'].lower()}, not {first.get('input')!r}")


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
