"""Teacher construction: its spec and the frozen tapped timm model, its weights from a `TeacherCheckpoint` or
brought by the user (`pipeline.teacher.weights`), its logits optionally mapped to the dataset's classes.

Nothing else in the library constructs a teacher (docs/ARCHITECTURE.md#layers). A teacher is described by a
`TeacherSpec`; `build_teacher` turns it into a `Teacher` module whose forward returns all taps from one
trunk pass (`pipeline.nets.tapped.tapped_forward`, the student's own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict, Field
from torch import nn

from pipeline.cache.manifest import TeacherSection
from pipeline.checksums import sha256_file
from pipeline.nets.tapped import ModelError, TappedOutputs, create_timm_model, resolve_tap, tap_indices, tapped_forward
from pipeline.options import Config
from pipeline.teacher.checkpoint import TeacherCheckpoint
from pipeline.teacher.class_map import ClassMap
from pipeline.teacher.weights import resolve_weights, weights_file

WEIGHTS_FIELDS = ("weights", "weights_sha256", "weights_revision", "preprocessing", "class_map", "class_map_sha256")
"""Written to a manifest only when set: a cache made without them keeps its identity (fingerprint)."""


class TeacherError(ModelError):
    """A teacher that cannot be built or used as asked; the message says what to do."""


class CheckpointChanged(TeacherError):
    """The checkpoint at a cache's recorded path is not the file that made the cache (sha256 differs)."""


class TeacherSpec(Config):
    """Everything that determines a teacher's outputs (part of a cache's identity)."""

    model_config = ConfigDict(protected_namespaces=())  # `model_kwargs` is timm's name, not pydantic's

    model: str
    num_classes: int
    in_chans: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    taps: tuple[str, ...] = ()
    head: bool = True
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None  # --weights as given (a state dict file or hf-hub:ORG/NAME[@REVISION])
    weights_sha256: str | None = None  # of the file the weights were loaded from: identity
    weights_revision: str | None = None  # the Hub snapshot's commit
    preprocessing: dict[str, Any] | None = None  # the weights' `Preprocessing` (what the renders follow)
    class_map: dict[str, Any] | None = None  # `ClassMap.to_dict`: logits mapped to the dataset's classes
    class_map_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `teacher` section (JSON types: lists for the tuples)."""
        out = self.model_dump(mode="json")
        return {k: v for k, v in out.items() if not (k in WEIGHTS_FIELDS and v is None)}

    def __hash__(self) -> int:  # model_kwargs is a dict; hash what identifies the teacher
        return hash((self.model, self.checkpoint_sha256, self.weights_sha256, self.class_map_sha256, self.taps,
                     self.input_size, self.head))

    def class_map_of(self, teacher_classes: int) -> ClassMap | None:
        """The recorded class map, checked against the teacher's logit width."""
        if self.class_map is None:
            return None
        return ClassMap.parse(self.class_map, "the cache's class map", list(self.class_map["classes"]),
                              teacher_classes)


def manifest_teacher_spec(teacher: TeacherSection) -> TeacherSpec:
    """The spec recorded in a cache manifest's `teacher` section (its descriptive extras left out)."""
    return TeacherSpec(**{k: v for k, v in teacher.to_dict().items() if k not in ("stages", "pooled_dim")})


def check_cache_checkpoint(spec: TeacherSpec) -> None:
    """Refuse to rebuild a cache's teacher from anything but the checkpoint that made the cache.

    Raises TeacherError when there is no checkpoint (or weights) to load, CheckpointChanged when the file at
    the recorded path (or the weights' file) has another sha256 than the one recorded.
    """
    if spec.weights is not None:
        path = weights_file(spec.weights, spec.model)
        if sha256_file(path) != spec.weights_sha256:
            raise CheckpointChanged(f"the teacher weights {spec.weights} ({path}) changed since the cache was "
                                    f"made (sha256 differs)")
        return
    if spec.checkpoint is None:
        raise TeacherError(f"the cache's teacher {spec.model} has no checkpoint (random weights), so it cannot "
                           f"be rebuilt")
    if not Path(spec.checkpoint).is_file():
        raise TeacherError(f"the cache's teacher checkpoint {spec.checkpoint} is not found (the path is "
                           f"relative to where `distillery cache` ran); run from there")
    if sha256_file(spec.checkpoint) != spec.checkpoint_sha256:
        raise CheckpointChanged(f"the teacher checkpoint {spec.checkpoint} changed since the cache was made "
                                f"(sha256 differs)")


class Teacher(nn.Module):
    """A frozen timm model returning logits, pooled features and the tapped stage maps in one pass."""

    def __init__(self, model: nn.Module, taps: tuple[str, ...], head: bool = True,
                 class_map: ClassMap | None = None) -> None:
        super().__init__()
        self.model = model
        self.taps = taps
        self.head = head
        self.class_map = class_map
        self._tap_indices = tap_indices(model, taps)

    def forward(self, x: torch.Tensor) -> TappedOutputs:
        out = tapped_forward(self.model, x, self.taps, self._tap_indices, self.head)
        if self.class_map is None or out.logits is None:
            return out
        # Mapped here, before anything is stored: every logit method reads dataset-class logits.
        return TappedOutputs(logits=self.class_map.select(out.logits), pooled=out.pooled, maps=out.maps)


def build_teacher(spec: TeacherSpec, device: str | torch.device = "cpu") -> Teacher:
    """Construct the teacher described by `spec`, load its checkpoint or weights, freeze it, eval mode."""
    if spec.weights is not None:  # the file's sha256 is checked by `check_cache_checkpoint` (verify, repair)
        model = resolve_weights(spec.weights, spec.model, num_classes=spec.num_classes if spec.head else 0,
                                in_chans=spec.in_chans, **spec.model_kwargs).model
    else:
        model = create_timm_model(spec.model, spec.num_classes, spec.in_chans, spec.input_size, **spec.model_kwargs)
    if spec.checkpoint is not None:
        ckpt = TeacherCheckpoint.load(spec.checkpoint)
        if ckpt.model != spec.model:
            raise TeacherError(f"checkpoint {spec.checkpoint} holds a '{ckpt.model}', not a '{spec.model}'; "
                               f"pass --teacher {ckpt.model}")
        try:
            model.load_state_dict(ckpt.state_dict)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise TeacherError(f"checkpoint {spec.checkpoint} does not fit {spec.model} with "
                               f"{spec.num_classes} classes and {spec.in_chans} channels: {first}") from e
    if not spec.head:
        model.reset_classifier(0)
    for t in spec.taps:
        resolve_tap(model, t)
    class_map = spec.class_map_of(spec.num_classes) if spec.head else None
    teacher = Teacher(model, spec.taps, head=spec.head, class_map=class_map).to(device).eval()
    teacher.requires_grad_(False)
    return teacher
