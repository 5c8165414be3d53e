"""`--online-teacher`: the cache's targets computed live, for comparing a run with its cached twin.

The teacher is rebuilt from the cache manifest's own spec (`build_teacher`, the one place a teacher is
constructed) and run on the very views the student sees. Its outputs then go through the cache's storage
round trip (the stored dtype, the top-k code), so the twin differs from the cached run only in where
the targets come from, not in their precision (docs/ARCHITECTURE.md §2, §4; issue 3 "cached == online").
"""

from __future__ import annotations

import torch

from pipeline.cache.codecs import topk_decode, topk_encode
from pipeline.cache.store import TeacherCache
from pipeline.methods.base import FEATMAPS, GAUSSIAN, LOGITS, POOLED, Targets
from pipeline.stats.gaussian import grid_gaussian
from pipeline.teacher.cache_pass import teacher_forward
from pipeline.teacher.model import TeacherError, TeacherSpec, build_teacher, check_cache_checkpoint, manifest_teacher_spec
from pipeline.train.config import TrainError

ONLINE_TARGETS = frozenset({LOGITS, POOLED, GAUSSIAN, FEATMAPS})


class OnlineTeacher:
    """Callable: a batch of teacher-size inputs -> the targets the cache would hold for them."""

    def __init__(self, cache: TeacherCache, targets: frozenset[str], device: torch.device) -> None:
        self.spec = self.check(cache, targets)
        self.targets, self.device = targets, device
        self.storage = cache.manifest.storage_spec()
        self.dtypes = {name: getattr(torch, meta["dtype"]) for name, meta in cache.manifest.arrays.items()}
        self.teacher = build_teacher(self.spec, device)

    @staticmethod
    def check(cache: TeacherCache, targets: frozenset[str]) -> TeacherSpec:
        """The cache's teacher spec, if it can be rebuilt live and give `targets`; else a one-line error."""
        unsupported = sorted(targets - ONLINE_TARGETS)
        if unsupported:
            raise TrainError(f"--online-teacher cannot compute {unsupported} live; train from the cache instead")
        manifest = cache.manifest
        spec = manifest_teacher_spec(manifest.teacher)
        try:
            check_cache_checkpoint(spec)
        except TeacherError as e:
            raise TrainError(f"{e}; --online-teacher needs the teacher that made the cache") from None
        if POOLED in targets and manifest.storage["pooled_views"] != "all":
            raise TrainError("this cache stores view-0 pooled features only; --online-teacher cannot "
                             "reproduce them for augmented views")
        return spec

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    def _stored(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """`value` as the cache stores `name`, back in float32."""
        return value.float().to(self.dtypes[name]).float()

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.storage.topk is None:
            return self._stored("logits/dense", logits)
        values, indices, tail = topk_encode(logits.float(), self.storage.topk)
        return topk_decode(self._stored("logits/topk_values", values), indices,
                           self._stored("logits/tail_logsumexp", tail), logits.shape[-1])

    def __call__(self, x: torch.Tensor) -> Targets:
        out = teacher_forward(self.teacher, x, self.device)
        targets: dict[str, torch.Tensor | tuple[torch.Tensor, ...]] = {}
        if LOGITS in self.targets:
            targets[LOGITS] = self._logits(out.logits)
        if POOLED in self.targets:
            targets[POOLED] = self._stored("features/pooled", out.pooled)
        if GAUSSIAN in self.targets:
            mean, std = grid_gaussian(out.maps[self.storage.tap].float(), self.storage.grid)
            targets[GAUSSIAN] = (self._stored("gaussian/mean", mean), self._stored("gaussian/std", std))
        if FEATMAPS in self.targets:  # served in the stored dtype, as the stream serves them
            targets[FEATMAPS] = out.maps[self.storage.tap].to(self.dtypes[f"featmaps/{self.storage.tap}"])
        return targets
