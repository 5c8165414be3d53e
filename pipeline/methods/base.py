"""The method contract: what a distillation method sees, what it needs, and the registry.

A method (docs/methods.md#compose) is a ``torch.nn.Module`` that turns the student's outputs and the cached
teacher targets of the same view into named, already-weighted loss terms. A run may combine
several methods ("Methods compose", docs/methods.md#compose); the training loss is the sum of every term of every method.

Each method declares the logical targets it ``needs`` from the cache by name (the records of
:mod:`pipeline.cache.targets`); :meth:`Method.check_cache`
refuses a cache that cannot serve them, naming the ``distillery cache`` option (docs/ARCHITECTURE.md#command-line-contract) that would.
Options are keyword-only arguments of the method's ``__init__`` with defaults, set from a spec
string such as ``kd:T=2,alpha=0.5`` (parsed once into a :class:`pipeline.methods.spec.MethodSpec`). A numeric option declares its allowed
values and its meaning where it is declared, ``T: Annotated[float, Range(gt=0), Help("temperature")] = 4.0``;
a spec outside them is refused in one line before a run starts (a numeric option without a range must still
be finite), and `distillery methods` lists every option with its default and help.
"""
from __future__ import annotations

import abc
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from pipeline.cache.targets import FEATMAPS, GAUSSIAN, LOGITS, LSH_CODES, POOLED, TARGETS
from pipeline.methods.registry import _REGISTRY, MethodError, list_methods, method_class
from pipeline.options import Help, Range, declared

__all__ = [
    "LOGITS",
    "POOLED",
    "GAUSSIAN",
    "LSH_CODES",
    "FEATMAPS",
    "TARGETS",
    "Targets",
    "MethodError",
    "at_least_float32",
    "StudentOutputs",
    "TrainingProgress",
    "CacheInfo",
    "StudentInfo",
    "Method",
    "register_method",
    "method_class",
    "list_methods",
]

Targets = Mapping[str, Tensor | tuple[Tensor, ...]]
"""Per-batch teacher targets keyed by logical name; values are detached (they come from the cache)."""

_OPTION_TYPES = (bool, int, float, str)


def at_least_float32(t: Tensor) -> Tensor:
    """``t`` promoted to float32 unless it is already float32 or float64.

    Losses run in full precision even under AMP: fp16/bf16 log-softmax at high temperature loses the
    small tail probabilities that distillation is about, and float64 inputs (tests) stay float64.
    """
    return t.to(torch.promote_types(t.dtype, torch.float32))


@dataclass
class StudentOutputs:
    """What the student's forward pass exposes to the methods.

    ``logits`` (B, C); ``pooled`` (B, D_s) pre-logits after global pooling; ``feature_maps`` maps a
    tapped stage name to its (B, C, H, W) map and is empty unless a method asks for taps.
    """

    logits: Tensor
    pooled: Tensor
    feature_maps: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingProgress:
    """Where training is, for schedules such as DKD's warm-up or WKD's cosine decay.

    ``epoch`` is 0-based; ``step`` is the 0-based optimiser step *within* that epoch, so a streamed
    epoch whose length is only known per epoch still yields a monotone ``epoch_float``.
    """

    epoch: int
    step: int
    steps_per_epoch: int
    total_epochs: int

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1 or self.total_epochs < 1:
            raise ValueError(
                f"steps_per_epoch and total_epochs must be >= 1, got {self.steps_per_epoch} and "
                f"{self.total_epochs}"
            )
        if self.epoch < 0 or not 0 <= self.step < self.steps_per_epoch:
            raise ValueError(
                f"need epoch >= 0 and 0 <= step < steps_per_epoch={self.steps_per_epoch}, "
                f"got epoch={self.epoch}, step={self.step}"
            )

    @property
    def epoch_float(self) -> float:
        """Epochs completed so far, fractional: ``epoch + step / steps_per_epoch``."""
        return self.epoch + self.step / self.steps_per_epoch

    @property
    def fraction(self) -> float:
        """Share of all training steps done, in [0, 1]."""
        return min(self.epoch_float / self.total_epochs, 1.0)


@dataclass(frozen=True)
class CacheInfo:
    """What a method may know about the cache when it is built (read off the manifest, docs/cache-format.md#contract).

    ``available`` holds the logical target names the cache's loader can serve; ``pooled_dim`` is the
    teacher's pooled feature size D_t, required whenever :data:`POOLED` is available.
    ``target_shapes`` gives each served target's per-sample shape (batch axis left out; for
    :data:`GAUSSIAN` the shape of the mean, ``(G*G, Cf)``). ``statistics`` holds the cache's
    dataset-level arrays (docs/cache-format.md#contract ``stats/...``, keyed without the ``stats/`` prefix, e.g. ``pca/components``)
    as float32/int64 tensors. ``root`` names the cache directory in messages; None when the info is built by
    hand. ``teacher_tail`` loads ScaleKD's frozen teacher tail (spec, state dict) through the cache's reader,
    which checks its sha256 (called only by a method that needs it); None when the info is built by hand.
    """

    num_classes: int
    pooled_dim: int | None
    available: frozenset[str]
    target_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    statistics: Mapping[str, Tensor] = field(default_factory=dict)
    root: str | None = None
    teacher_tail: Callable[[], tuple[dict[str, Any], dict[str, Tensor]]] | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if POOLED in self.available and not (self.pooled_dim and self.pooled_dim > 0):
            raise ValueError(f"a cache serving {POOLED!r} needs a positive pooled_dim, got {self.pooled_dim}")


@dataclass(frozen=True)
class StudentInfo:
    """What a method may know about the student when it is built.

    ``pooled_dim`` is the student's pre-logit width D_s. ``taps`` maps each stage index a method asked
    for in ``student_taps`` (``-1`` = deepest stage, ``-2`` the one before, ...) to the stage's name,
    and ``feature_shapes`` maps that name to the (C, H, W) of its map at the training input size; the
    map itself arrives in :attr:`StudentOutputs.feature_maps` under the same name. ``stage_shapes`` holds
    every stage's (C, H, W), shallowest first, so a refusal can name the stage that would fit.
    """

    pooled_dim: int
    taps: Mapping[int, str] = field(default_factory=dict)
    feature_shapes: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)
    stage_shapes: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.pooled_dim < 1:
            raise ValueError(f"pooled_dim must be >= 1, got {self.pooled_dim}")
        missing = sorted(set(self.taps.values()) - self.feature_shapes.keys())
        if missing:
            raise ValueError(f"no feature shape for tapped stages {missing}")


class Method(torch.nn.Module, metaclass=abc.ABCMeta):
    """Base class of every distillation method.

    Subclasses set ``name`` and ``needs``, declare their options as keyword-only ``__init__``
    arguments with defaults (bool, int, float or str), and create learnable parts (projectors,
    maps) in ``__init__`` so that the optimiser trains them together with the student.
    ``student_taps`` lists the student stages (indices from the deepest, ``-1``) whose feature maps
    the method reads; the run taps the union over its methods (see :class:`StudentInfo`). A method
    whose stage is an option overrides :meth:`taps_for`.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    student_taps: ClassVar[tuple[int, ...]] = ()
    trains_logits: ClassVar[bool] = False
    """Whether the method's loss reaches the student's logits, and so trains its classifier (CE, KD, ...).
    A run of methods that all leave it False (``tcs`` alone: its head's classifier gets no gradient) ends
    with the classifier at initialisation, at chance; see :meth:`trains_classifier`."""

    def __init__(self, cache: CacheInfo, student: StudentInfo) -> None:
        super().__init__()
        # Checked here rather than where a spec builds it, so that direct construction cannot skip it.
        self.check_cache(cache)

    @abc.abstractmethod
    def forward(
        self,
        student: StudentOutputs,
        targets: Targets,
        labels: Tensor,
        progress: TrainingProgress,
    ) -> dict[str, Tensor]:
        """Return named scalar loss terms, already weighted.

        Term names start with the method's name (``"kd"``, ``"dkd_tckd"``) so they stay distinct
        when the terms of all methods in a run are summed and logged side by side.
        """

    def adopt_student(self, model: torch.nn.Module) -> None:
        """Called once after the method is built, with the student's plain timm model (before any weights
        are loaded or training starts). A method whose head replaces the student's (TCS, docs/methods.md#tcs) installs
        it here, so the student's logits, every other method and the per-epoch evaluation go through it.
        Default: nothing.
        """

    def export_student(self, model: torch.nn.Module) -> bool:
        """Called once after training, before the final evaluation and before ``student.pt`` is written:
        turn whatever :meth:`adopt_student` installed back into plain timm form with the same outputs
        (TCS folds its map, mask and classifier into one linear head). Returns whether ``model`` changed
        (the run then evaluates the exported model again). Default: nothing, False.
        """
        return False

    @classmethod
    def taps_for(cls, options: Mapping[str, bool | int | float | str]) -> tuple[int, ...]:
        """The student stages read when built with ``options`` (given ones only); ``student_taps`` by default."""
        return cls.student_taps

    @classmethod
    def stage_option(cls, options: Mapping[str, bool | int | float | str]) -> int:
        """The ``stage`` option of a method that reads one student stage (-1, the deepest, by default);
        a stage counted from the shallow end is refused: stages count from the deepest."""
        stage = int(options.get("stage", -1))
        if stage >= 0:
            raise MethodError(f"method {cls.name!r}: stage counts from the deepest stage (-1, -2, ...), not {stage}")
        return stage

    @classmethod
    def trains_classifier(cls, options: Mapping[str, bool | int | float | str]) -> bool:
        """Whether the method built with ``options`` (given ones only) trains the classifier: ``trains_logits``."""
        return cls.trains_logits

    @classmethod
    def option_help(cls) -> dict[str, str]:
        """Each option's meaning, as declared next to it (``Help``)."""
        return {p.name: _declared(p, Help).text for p in _option_parameters(cls)}

    @classmethod
    def options(cls) -> dict[str, bool | int | float | str]:
        """The method's options and their defaults, in declaration order."""
        return {p.name: p.default for p in _option_parameters(cls)}

    @classmethod
    def option_ranges(cls) -> dict[str, Range]:
        """Each numeric option's declared :class:`Range` (an undeclared one: any finite value)."""
        return {p.name: _declared(p, Range) or Range() for p in _option_parameters(cls)
                if type(p.default) in (int, float)}

    @classmethod
    def check_cache(cls, cache: CacheInfo) -> None:
        """Raise :class:`MethodError` (one line) if ``cache`` cannot serve every target in ``needs``."""
        missing = sorted(cls.needs - cache.available)
        if missing:
            what = " and ".join(TARGETS[t].description for t in missing)
            how = " and ".join(TARGETS[t].cache_option for t in missing)
            raise MethodError(
                f"method {cls.name!r} needs {what}, which this cache does not store; "
                f"re-run `distillery cache` with {how}"
            )


_M = TypeVar("_M", bound=type[Method])


def _option_parameters(cls: type[Method]) -> list[inspect.Parameter]:
    # Everything after (self, cache, student) is an option; annotations evaluated, for their Range.
    return list(inspect.signature(cls.__init__, eval_str=True).parameters.values())[3:]


_D = TypeVar("_D", Range, Help)


def _declared(p: inspect.Parameter, kind: type[_D]) -> _D | None:
    """The ``kind`` marker in the option's ``Annotated[...]`` annotation (None without one)."""
    return declared(p.annotation, kind)


def register_method(cls: _M) -> _M:
    """Class decorator adding a :class:`Method` subclass to the registry under ``cls.name``.

    Checks the declaration up front so that a malformed method fails at import, not mid-run.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or ":" in name:
        raise TypeError(f"{cls.__qualname__} must set a non-empty class attribute `name` without ':'")
    if name in _REGISTRY:
        raise TypeError(f"method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    if any(not isinstance(t, int) or t >= 0 for t in cls.student_taps):
        raise TypeError(f"method {name!r}: student_taps are negative stage indices (-1 = deepest stage)")
    unknown = cls.needs - TARGETS.keys()
    if unknown:
        raise TypeError(
            f"method {name!r} needs unknown targets {sorted(unknown)}; register them in pipeline.cache.targets"
        )
    for p in _option_parameters(cls):
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or not isinstance(p.default, _OPTION_TYPES):
            raise TypeError(
                f"option {p.name!r} of method {name!r} must be keyword-only with a bool/int/float/str default"
            )
    defaults = cls.options()
    for option, allowed in cls.option_ranges().items():
        if not allowed.contains(defaults[option]):
            raise TypeError(f"the default {defaults[option]} of option {option!r} of method {name!r} is outside "
                            f"its range ({allowed.describe()})")
    undocumented = [p.name for p in _option_parameters(cls) if _declared(p, Help) is None]
    if undocumented:
        raise TypeError(f"option {undocumented[0]!r} of method {name!r} needs its meaning declared next to it: "
                        f"Annotated[..., Help('...')]")
    _REGISTRY[name] = cls
    return cls
