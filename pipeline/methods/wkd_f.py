"""WKD-F: Wasserstein distance between per-cell diagonal Gaussians of feature maps (docs/ARCHITECTURE.md §6.4).

Lv et al., NeurIPS'24. The teacher pass caches, for its tapped stage, the mean and std of every channel
in each cell of a G x G grid (``--tap STAGE --grid G``; ``pipeline.stats.gaussian.grid_gaussian``). The
student's map (its deepest stage unless the ``stage`` option says otherwise) goes through a learned
projector to the teacher's Cf channels and then through the same ``grid_gaussian``, so both sides use
identical cell boundaries (adaptive pooling) and ``std = sqrt(unbiased var + 1e-5)``. For diagonal Gaussians the squared 2-Wasserstein distance is
``||mu_s - mu_t||^2 + ||sigma_s - sigma_t||^2``; WKD weights the mean part by gamma.

Only G and Cf must agree between teacher and student: the maps may differ in size and channels. Each
of the student's cells needs at least 2 positions (unbiased variance), which is checked when the method
is built; a map too small for the cache's grid is refused with what to change.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated

import torch
from torch import Tensor, nn

from pipeline.stats.gaussian import grid_gaussian
from pipeline.options import Range

from .base import (
    GAUSSIAN,
    CacheInfo,
    Method,
    MethodError,
    StudentInfo,
    StudentOutputs,
    Targets,
    TrainingProgress,
    at_least_float32,
    register_method,
)
from .schedules import cosine_decay

PROJECTORS = ("conv1x1", "bottleneck")


def _conv_bn(c_in: int, c_out: int, kernel: int, relu: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    return [*layers, nn.ReLU(inplace=True)] if relu else layers


def build_projector(kind: str, c_in: int, c_out: int, hidden: int, relu: bool) -> nn.Sequential:
    """Student channels -> teacher channels (§6.4): ``conv1x1`` is conv1x1+BN(+ReLU) (small nets);
    ``bottleneck`` is 1x1 -> 3x3 -> 1x1 through ``hidden`` channels, each conv+BN, ReLU between, and the
    last ReLU only when ``relu`` (large nets). Spatial size is kept."""
    if kind == "conv1x1":
        return nn.Sequential(*_conv_bn(c_in, c_out, 1, relu))
    if kind == "bottleneck":
        return nn.Sequential(
            *_conv_bn(c_in, hidden, 1, True), *_conv_bn(hidden, hidden, 3, True), *_conv_bn(hidden, c_out, 1, relu)
        )
    raise MethodError(f"method 'wkd_f': projector must be one of {', '.join(PROJECTORS)}, not {kind!r}")


def gaussian_w2_terms(
    mean_s: Tensor, std_s: Tensor, mean_t: Tensor, std_t: Tensor
) -> tuple[Tensor, Tensor]:
    """``(sum (mu_s - mu_t)^2, sum (sigma_s - sigma_t)^2)``, each divided by ``N * G^2`` (§6.4).

    Inputs are (N, G*G, C); the sum runs over cells and channels, so the two parts add up to the squared
    W2 between the diagonal Gaussians, averaged over samples and cells.
    """
    scale = mean_s.shape[0] * mean_s.shape[1]
    mean_term = (at_least_float32(mean_s) - at_least_float32(mean_t)).square().sum() / scale
    std_term = (at_least_float32(std_s) - at_least_float32(std_t)).square().sum() / scale
    return mean_term, std_term


@register_method
class WKDF(Method):
    """``w_F(progress) * (gamma * mean part + std part)`` of the squared W2 between per-cell diagonal
    Gaussians of the projected student map and the cached teacher map (§6.4).

    Needs a cache made with ``--tap STAGE --grid G``. Options (defaults: the ImageNet ResNet-34 ->
    ResNet-18 setting of the paper; CIFAR-100 used weight=0.08, gamma=4 with G=1):

    - ``weight`` w_F before decay (0.02).
    - ``gamma`` weight of the mean part against the std part (2).
    - ``projector`` ``conv1x1`` (default, small students) or ``bottleneck`` (the paper's ImageNet choice).
    - ``hidden`` bottleneck width (256).
    - ``relu`` end the projector with a ReLU (True, right for post-ReLU teacher stages such as ResNet's;
      turn off when the tapped teacher map can be negative).
    - ``decay_start`` epoch E0 after which w_F is cosine-decayed to 0 at the end of training (0: over the
      whole run; at or beyond the number of epochs: constant).
    - ``stage`` the student stage read, counted from the deepest (-1, the paper's choice; -2 for the one
      before, e.g. when the deepest map is too small for the cache's grid).

    Terms: ``wkd_f_mean`` and ``wkd_f_std``, both already weighted. The projector trains with the student
    and is dropped at inference.
    """

    name = "wkd_f"
    needs = frozenset({GAUSSIAN})
    student_taps = (-1,)

    def __init__(
        self,
        cache: CacheInfo,
        student: StudentInfo,
        *,
        weight: Annotated[float, Range(ge=0)] = 0.02,
        gamma: Annotated[float, Range(ge=0)] = 2.0,
        projector: str = "conv1x1",
        hidden: Annotated[int, Range(ge=1)] = 256,
        relu: bool = True,
        decay_start: Annotated[float, Range(ge=0)] = 0.0,
        stage: int = -1,
    ) -> None:
        super().__init__(cache, student)
        self.taps_for({"stage": stage})  # the same refusal as when the run picks its taps
        cells, channels = cache.target_shapes[GAUSSIAN]
        self.grid = math.isqrt(cells)
        if self.grid * self.grid != cells:
            raise MethodError(f"method 'wkd_f': the cache's Gaussians have {cells} cells, not a square grid")
        self.stage = student.taps[stage]
        c_in, height, width = student.feature_shapes[self.stage]
        try:
            # The function the forward pass uses decides whether the student's cells are large enough.
            grid_gaussian(torch.zeros(1, 1, height, width), self.grid)
        except ValueError:
            raise MethodError(
                f"method 'wkd_f': the student's map at stage {stage} ({self.stage}) is {height}x{width}, too "
                f"small for the cache's {self.grid}x{self.grid} grid (each cell needs >= 2 positions for the "
                f"unbiased variance); train with a larger --input-size, read an earlier stage (wkd_f:stage=-2) "
                f"or use a cache made with a smaller --grid"
            ) from None
        self.projector = build_projector(projector, c_in, channels, hidden, relu)
        self.weight = weight
        self.gamma = gamma
        self.decay_start = decay_start

    @classmethod
    def taps_for(cls, options: Mapping[str, bool | int | float | str]) -> tuple[int, ...]:
        """``(stage,)``."""
        return (cls.stage_option(options),)

    def forward(
        self, student: StudentOutputs, targets: Targets, labels: Tensor, progress: TrainingProgress
    ) -> dict[str, Tensor]:
        mean_s, std_s = grid_gaussian(self.projector(student.feature_maps[self.stage]), self.grid)
        mean_t, std_t = targets[GAUSSIAN]
        mean_term, std_term = gaussian_w2_terms(mean_s, std_s, mean_t, std_t)
        w = self.weight * cosine_decay(progress, self.decay_start)
        return {"wkd_f_mean": w * self.gamma * mean_term, "wkd_f_std": w * std_term}
