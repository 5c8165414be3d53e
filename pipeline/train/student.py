"""Students: any timm model, with the taps the methods read (docs/ARCHITECTURE.md#layers `train/`, docs/methods.md#compose).

The student is built with the same `create_timm_model` as the teacher and read through the same
`tapped_forward` (`pipeline.nets.tapped`), so a method sees `StudentOutputs` with
logits, pooled pre-logits and named stage maps whatever the architecture.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.methods.base import StudentInfo, StudentOutputs
from pipeline.nets.tapped import create_timm_model, resolve_tap, stage_names, tap_indices, tapped_forward


class Student(nn.Module):
    """A timm model whose forward returns `StudentOutputs`.

    `self.model` is the plain timm model: its state dict is what a run saves as `student.pt`.
    `taps` name stages (or indices, `-1` = deepest) whose maps are returned in `feature_maps`.
    """

    def __init__(self, name: str, num_classes: int, in_chans: int, input_size: int,
                 taps: tuple[str | int, ...] = ()) -> None:
        super().__init__()
        self.name = name
        self.model = create_timm_model(name, num_classes, in_chans, input_size)
        self.taps = tuple(resolve_tap(self.model, t) for t in taps)
        self._tap_indices = tap_indices(self.model, self.taps)
        # Pre-logit width is not always `num_features` (e.g. MobileNetV3's conv head) and map sizes depend on
        # the input size: measure both on a probe.
        with torch.no_grad():
            was_training = self.model.training
            self.model.eval()
            probe = self(torch.zeros(1, in_chans, input_size, input_size))
            _, stages = self.model.forward_intermediates(torch.zeros(1, in_chans, input_size, input_size),
                                                         indices=list(range(len(stage_names(self.model)))))
            self.model.train(was_training)
        self.stage_shapes = tuple(tuple(m.shape[1:]) for m in stages)
        self.pooled_dim = int(probe.pooled.shape[-1])
        self.feature_shapes = {name: tuple(m.shape[1:]) for name, m in probe.feature_maps.items()}
        self.requested_taps = tuple(taps)

    def forward(self, x: torch.Tensor) -> StudentOutputs:
        out = tapped_forward(self.model, x, self.taps, self._tap_indices)
        return StudentOutputs(logits=out.logits, pooled=out.pooled, feature_maps=out.maps)

    def info(self) -> StudentInfo:
        """What methods are built from: the pooled width and each requested tap's stage and map shape."""
        taps = {t: name for t, name in zip(self.requested_taps, self.taps) if isinstance(t, int)}
        return StudentInfo(pooled_dim=self.pooled_dim, taps=taps, feature_shapes=self.feature_shapes,
                           stage_shapes=self.stage_shapes)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
