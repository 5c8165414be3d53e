"""`--online-teacher`: the cache's targets computed live, for comparing a run with its cached twin.

The teacher is rebuilt from the cache manifest's own spec (`build_teacher`, the one place a teacher is
constructed) and run on the very views the student sees. Its outputs then go through the cache's storage
round trip (the stored dtype, the top-k code), so the twin differs from the cached run only in where
the targets come from, not in their precision (docs/ARCHITECTURE.md#data-flow, docs/cache-format.md#contract; issue 3 "cached == online").
"""

from __future__ import annotations

import torch

from pipeline.cache.reader import TeacherCache
from pipeline.cache.targets import TARGETS, Served
from pipeline.methods.base import Targets
from pipeline.teacher.forward import teacher_forward
from pipeline.nets.tapped import TappedOutputs
from pipeline.teacher.model import TeacherError, TeacherSpec, build_teacher, check_cache_checkpoint, manifest_teacher_spec
from pipeline.train.config import TrainError


class OnlineTeacher:
    """Callable: a batch of teacher-size inputs -> the targets the cache would hold for them."""

    def __init__(self, cache: TeacherCache, targets: frozenset[str], device: torch.device) -> None:
        self.spec = self.check(cache, targets)
        self.targets, self.device = targets, device
        self.storage = cache.manifest.storage
        self.num_classes = cache.num_classes
        self.dtypes = {name: getattr(torch, meta.dtype) for name, meta in cache.manifest.arrays.items()}
        self.teacher = build_teacher(self.spec, device)

    @staticmethod
    def check(cache: TeacherCache, targets: frozenset[str]) -> TeacherSpec:
        """The cache's teacher spec, if it can be rebuilt live and give `targets`; else a one-line error."""
        unsupported = sorted(t for t in targets if TARGETS[t].produce is None)
        if unsupported:
            raise TrainError(f"--online-teacher cannot compute {unsupported} live; train from the cache instead")
        manifest = cache.manifest
        spec = manifest_teacher_spec(manifest.teacher)
        try:
            check_cache_checkpoint(spec)
        except TeacherError as e:
            raise TrainError(f"{e}; --online-teacher needs the teacher that made the cache") from None
        for name in sorted(targets):
            if TARGETS[name].first_view_only(manifest.storage):
                raise TrainError(f"this cache stores view-0 {TARGETS[name].description} only; --online-teacher "
                                 f"cannot reproduce them for augmented views")
        return spec

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    def _served(self, name: str, out: TappedOutputs) -> Served:
        """Target `name` produced from the teacher's outputs, through the cache's stored dtypes (and top-k code)."""
        stored = {n: v.to(self.dtypes[n]) for n, v in TARGETS[name].produce(out, self.storage).items()}
        return TARGETS[name].serve(stored, self.num_classes)

    def __call__(self, x: torch.Tensor) -> Targets:
        out = teacher_forward(self.teacher, x, self.device)
        return {name: self._served(name, out) for name in sorted(self.targets)}
